"""systemd notify protocol, against a fake NOTIFY_SOCKET the test owns."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TIMEOUT, ProxyProcess, app, free_ports, write_config


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
