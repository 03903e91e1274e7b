"""The Reloader: what a file event, a SIGHUP or a read failure does to the config in force."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import trio

from tcpproxy import reload
from tcpproxy.config import Config, ConfigError, parse_config
from tcpproxy.reload import Reloader
from tcpproxy.sources import file as file_source

OLD = b'{"Apps": [{"Name": "A", "Ports": [7001], "Targets": ["127.0.0.1:9"]}]}'
NEW = b'{"Apps": [{"Name": "A", "Ports": [7001, 7002], "Targets": ["127.0.0.1:9"]}]}'
BAD = b'{"Apps": [}'


class Running:
    """The config in force, and the apply function a Reloader calls."""

    def __init__(self) -> None:
        self.config = parse_config(OLD, "test")
        self.applied: list[Config] = []

    async def apply(self, old: Config, new: Config) -> None:
        self.config = new
        self.applied.append(new)


def reloader_for(path: Path, running: Running) -> Reloader:
    path.write_bytes(OLD)
    return Reloader(path, OLD, lambda: running.config, running.apply)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_out_of_descriptors_is_not_a_rejected_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE while reading the file is our shortage: log once, count nothing, retry."""
    path = tmp_path / "config.json"
    running = Running()
    reloader = reloader_for(path, running)
    short = True
    read = file_source.read_stamped

    def read_short(p: Path) -> tuple[bytes, object]:
        if short:
            try:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            except OSError as exc:
                raise ConfigError(str(p), ["cannot read file: Too many open files"]) from exc
        return read(p)

    monkeypatch.setattr(file_source, "read_stamped", read_short)
    monkeypatch.setattr(reload, "SHORTAGE_RETRY", 0.05, raising=False)
    path.write_bytes(NEW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloader.run)
        for _ in range(5):  # directory events while short of descriptors
            reloader.request("file changed")
            await trio.sleep(0.1)
        assert (reloader.rejected, running.applied, reloader.last) == (0, [], "none")
        short = False  # no event after this: the retry alone must apply it
        with trio.fail_after(5):
            while not running.applied:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert (reloader.reloads, reloader.rejected) == (1, 0)
    (message,) = errors(caplog)
    assert "Too many open files" in message and "rejected" not in message, message


async def test_a_path_that_is_not_a_file_is_refused_once_until_sighup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO at the path: every event of its directory (a log file written there,
    after each refusal too) would refuse it again; it is said once, and again at SIGHUP."""
    path = tmp_path / "config.json"
    running = Running()
    reloader = reloader_for(path, running)
    path.unlink()
    os.mkfifo(path)
    assert await reloader._reload("file changed") == "rejected"
    for _ in range(3):  # a neighbour written: not this file
        assert await reloader._reload("file changed") is None
    assert await reloader._reload("SIGHUP") == "rejected"
    assert reloader.rejected == 2
    assert len(errors(caplog)) == 2 and "is a FIFO" in errors(caplog)[0]
    path.unlink()
    path.write_bytes(NEW)
    assert await reloader._reload("file changed") == "applied"
    path.unlink()
    os.mkfifo(path)  # refused once more: a read succeeded in between
    assert await reloader._reload("file changed") == "rejected"


async def test_saving_a_rejected_file_again_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.json"
    running = Running()
    reloader = reloader_for(path, running)
    path.write_bytes(BAD)
    assert await reloader._reload("file changed") == "rejected"
    (message,) = errors(caplog)
    assert "keeping the running config" in message, message
    assert "read again on its next change or SIGHUP" in message, message
    # another file of the directory changed: this one was not saved again
    assert await reloader._reload("file changed") is None
    # saved again, same contents (a later save: a later modification time)
    later = os.stat(path).st_mtime_ns + 10**9
    path.write_bytes(BAD)
    os.utime(path, ns=(later, later))
    assert await reloader._reload("file changed") == "rejected"
    assert reloader.rejected == 2
    path.write_bytes(NEW)
    assert await reloader._reload("file changed") == "applied"
    assert await reloader._reload("file changed") is None  # contents in force: nothing to do
    assert running.applied == [parse_config(NEW, str(path))]


async def test_a_missing_config_file_is_waited_for_not_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`rm -rf` of the config directory and a recreate: no error, no rejection counted;
    one warning per episode, and the file's return applies it."""
    directory = tmp_path / "conf"
    directory.mkdir()
    path = directory / "config.json"
    running = Running()
    reloader = reloader_for(path, running)
    for episode in (1, 2):
        path.unlink()
        directory.rmdir()
        for why in ("file changed", "file changed", "SIGHUP"):  # the watch's events, a HUP
            assert await reloader._reload(why) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == episode, warnings
        assert "config file missing; keeping the running config" in warnings[-1]
        assert str(path) in warnings[-1]
        directory.mkdir()
        path.write_bytes(NEW if episode == 2 else OLD)
        expected = "applied" if episode == 2 else None
        assert await reloader._reload("file changed") == expected
    assert errors(caplog) == []
    assert (reloader.rejected, reloader.reloads) == (0, 1)
    assert running.applied == [parse_config(NEW, str(path))]
