"""Noticing config changes however the file or its directory is replaced.

Real tcpproxy processes for what users do (a Kubernetes ConfigMap mount, a
directory removed and recreated); `watch_config` itself under trio for the
stat() backstop and a directory that is missing for a while.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import trio

from tcpproxy.sources import file as watch
from tcpproxy.sources.file import POLL_INTERVAL, watch_config
from tests.helpers import TIMEOUT, app, free_port, running_tcpproxy, which_backend, write_config


def configmap_update(mount: Path, apps: list[dict], stamp: str) -> None:
    """Publish a new version as the kubelet does: a fresh timestamped directory,
    a new `..data` symlink renamed over the old one, then the old directory removed."""
    fresh = mount / f"..{stamp}"
    fresh.mkdir()
    write_config(fresh / "config.json", apps)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(fresh.name, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    if old is not None:
        shutil.rmtree(mount / old)
    if not (mount / "config.json").is_symlink():
        os.symlink("..data/config.json", mount / "config.json")


def test_configmap_updates_are_all_applied(tmp_path: Path, backends) -> None:
    a, b, c, d = backends("a"), backends("b"), backends("c"), backends("d")
    port = free_port()
    mount = tmp_path / "config"
    mount.mkdir()
    configmap_update(mount, [app("A", [port], [a.address])], "2026_12_01_00_00_00.1")
    with running_tcpproxy(mount / "config.json") as proxy:
        for i, target in enumerate((b, c, d), start=2):
            mark = proxy.mark()
            configmap_update(
                mount, [app("A", [port], [target.address])], f"2026_12_01_00_00_0{i}.1"
            )
            proxy.wait_for(r"reload \(file changed\).*applied", start=mark)
            assert which_backend(port) == target.name


@pytest.mark.slow
def test_directory_removed_and_recreated_is_watched_again(tmp_path: Path, backends) -> None:
    a, b, c = backends("a"), backends("b"), backends("c")
    port = free_port()
    directory = tmp_path / "conf"
    directory.mkdir()
    config = directory / "config.json"
    write_config(config, [app("A", [port], [a.address])])
    with running_tcpproxy(config) as proxy:
        mark = proxy.mark()
        shutil.rmtree(directory)
        # the file is gone: the running config stays, with one warning and no rejection
        proxy.wait_for(r"WARNING.*config file missing; keeping the running config", start=mark)
        directory.mkdir()
        write_config(config, [app("A", [port], [a.address])])
        assert which_backend(port) == "a"
        after = "\n".join(proxy.lines[mark:])
        assert "rejected" not in after and after.count("config file missing") == 1, after
        for target in (b, c):
            mark = proxy.mark()
            write_config(config, [app("A", [port], [target.address])])
            proxy.wait_for(r"reload \(file changed\).*applied", start=mark)
            assert which_backend(port) == target.name


class Changes:
    """on_change for watch_config: counts calls and wakes a waiting test."""

    def __init__(self) -> None:
        self.count = 0
        self._event = trio.Event()

    def __call__(self, why: str) -> None:
        self.count += 1
        self._event.set()

    async def next(self) -> None:
        self._event = trio.Event()
        await self._event.wait()


async def _blind_awatch(*paths, **kw):
    """An inotify that sees nothing (a network file system, a bind mount)."""
    await trio.sleep_forever()
    yield set()


@pytest.mark.slow
async def test_stat_poll_sees_what_inotify_cannot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(watch.watchfiles, "awatch", _blind_awatch)
    config = tmp_path / "config.json"
    config.write_text("one")
    changes = Changes()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_config, config, changes)
        with trio.fail_after(POLL_INTERVAL * 3 + TIMEOUT / 2):
            for text in ("three", "four!!"):  # sizes differ: mtime alone may not (coarse clock)
                config.write_text(text)
                await changes.next()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_missing_directory_is_waited_for_quietly(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tcpproxy")
    directory = tmp_path / "later"
    config = directory / "config.json"
    changes = Changes()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_config, config, changes)
        await trio.sleep(POLL_INTERVAL * 2.5)
        missing = [r for r in caplog.records if "missing" in r.getMessage()]
        assert len(missing) == 1, caplog.text  # once per episode, not once per retry
        with trio.fail_after(POLL_INTERVAL * 3 + TIMEOUT / 2):
            directory.mkdir()
            config.write_text("{}")
            await changes.next()
            while "watch restarted" not in caplog.text:
                await trio.sleep(0.05)
            changes.count = 0
            config.write_text("{ }")  # now seen by inotify too
            await changes.next()
        nursery.cancel_scope.cancel()
