"""systemd notify protocol, against a fake NOTIFY_SOCKET the test owns."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpproxy.notify import Notifier
from tests.helpers import (
    TIMEOUT,
    ProxyProcess,
    app,
    free_ports,
    tcpproxy_argv,
    wait_until,
    write_config,
)
from tests.test_upgrade import FakeSystemd as PassCredSystemd
from tests.test_upgrade import gone, kill_started


class FakeSystemd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(TIMEOUT)

    def next(self, *, skip_watchdog: bool = True) -> dict[str, str]:
        while True:
            data = self.sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in data.splitlines())
            if skip_watchdog and set(fields) <= {"WATCHDOG", "STATUS"} and "WATCHDOG" in fields:
                continue
            return fields

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_reload_watchdog_stopping_in_order(tmp_path: Path, backends, workers: str) -> None:
    a, b = backends("a"), backends("b")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [a.address])])
    systemd = FakeSystemd(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"}
    proxy = ProxyProcess(
        [sys.executable, "-m", "tcpproxy", "-c", str(config), "--workers", workers], env=env
    )
    try:
        ready = systemd.next()
        assert ready["READY"] == "1"
        assert "1 apps, 1 ports" in ready["STATUS"]
        assert systemd.next(skip_watchdog=False)["WATCHDOG"] == "1"  # every 0.2 s
        write_config(config, [app("A", [port], [b.address])])
        assert "RELOADING" in systemd.next()
        after = systemd.next()
        assert after["READY"] == "1" and "last reload: applied" in after["STATUS"]
        proxy.send(signal.SIGTERM)
        assert systemd.next()["STOPPING"] == "1"
        assert proxy.proc.wait(TIMEOUT) == 0
    finally:
        proxy.kill()
        systemd.close()
    if workers == "2":  # only the supervisor talks to systemd
        assert "sd_notify failed" not in proxy.output


@pytest.mark.slow
def test_no_notify_socket_is_fine(tmp_path: Path, backends) -> None:
    a = backends("a")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [a.address])])
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config)],
                         env={"NOTIFY_SOCKET": ""})  # fmt: skip
    try:
        proxy.wait_for("started")
        time.sleep(0.2)
        proxy.send(signal.SIGTERM)
        assert proxy.proc.wait(TIMEOUT) == 0
    finally:
        proxy.kill()


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory the serving user (nobody) can read: pytest's are root's, mode 700."""
    path = Path(tempfile.mkdtemp(prefix="tcpproxy-notify-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (it drops it)")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_notify_socket_only_root_may_write_hears_every_process(
    tmp_path: Path, readable_dir: Path, backends, workers: str
) -> None:
    """The notify socket is root's, mode 600, in a mode-700 directory (a service
    manager or a harness running as root, not systemd): the proxy, started as root,
    connects it before it drops to nobody, so READY=1 arrives; the new process an
    upgrade starts, nobody from its start, sends READY=1 and MAINPID= on the socket
    it was handed; STOPPING=1 comes from it at the end."""
    (port,) = free_ports(1)
    config = readable_dir / "config.json"
    write_config(config, [app("A", [port], [backends("b1").address])])
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    systemd = PassCredSystemd(private / "notify.sock")
    systemd.path.chmod(0o600)
    argv = tcpproxy_argv(config, "--user", "nobody", "--workers", workers)
    proxy = ProxyProcess(argv, env=systemd.env)
    first = proxy.proc.pid

    def heard(pid: int, field: str) -> dict[str, str] | None:
        found = [f for sender, f in systemd.received() if sender == pid and field in f]
        return found[0] if found else None

    try:
        proxy.wait_for(r"serving as uid 65534 gid 65534 \(nobody\)")
        assert wait_until(lambda: heard(first, "READY") is not None), proxy.output
        proxy.send(signal.SIGUSR2)
        new = int(proxy.wait_for(r"upgrade: pid (\d+) serves")[1])
        assert wait_until(lambda: heard(new, "MAINPID") is not None), proxy.output
        taken_over = heard(new, "MAINPID")
        assert taken_over is not None and taken_over["MAINPID"] == str(new)
        assert taken_over["READY"] == "1"
        assert proxy.proc.wait(TIMEOUT) == 0
        os.kill(new, signal.SIGTERM)
        assert wait_until(lambda: heard(new, "STOPPING") is not None), proxy.output
        assert wait_until(lambda: gone(new))
        assert heard(first, "STOPPING") is None  # the old one said nothing more
    finally:
        kill_started(proxy)
        systemd.close()
    assert "sd_notify failed" not in proxy.output, proxy.output


def test_a_notify_socket_made_anew_keeps_hearing_every_message(tmp_path: Path) -> None:
    """The service manager's socket is closed and bound again at the same path: the
    connected socket is disconnected by the kernel; the notifier connects again, so
    the next messages (a watchdog ping, STOPPING) still arrive, and an upgrade still
    gets a connected socket to hand over."""
    path = str(tmp_path / "notify")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.connect()
    assert notifier.send("A") and first.recv(64) == b"A"
    first.close()
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(path)
        again.settimeout(5)
        for message in ("B", "WATCHDOG=1", "STOPPING=1"):
            assert notifier.send(message)
            assert again.recv(64) == message.encode()
        assert notifier.fileno() is not None
    notifier.close()
