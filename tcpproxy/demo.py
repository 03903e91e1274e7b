"""`make run`: echo backends for the config's loopback targets, then (once they listen) tcpproxy.

So that `echo hello | nc -N localhost 6300` answers on a machine with nothing
else running. Targets that are not on loopback are left to exist elsewhere.

Started as root, tcpproxy serves as another user (or as root without
capabilities) after setup, and then may no longer signal the echo backends,
which stay root's. So they also stop when their standard input, a pipe this
process holds, closes: when it ends, whoever it serves as, however it stops.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tcpproxy.cli import main as tcpproxy_main
from tcpproxy.cli_common import fail, read_config
from tcpproxy.config import ConfigError

ECHO_STOP_TIMEOUT = 5.0  # seconds for the echo backends to stop once told to
ECHO_START_TIMEOUT = 5.0  # seconds to wait for them to listen before tcpproxy starts


def loopback_ports(config_path: Path) -> list[int]:
    _, config = read_config(config_path)
    ports = set()
    for app in config.apps:
        for target in app.targets:
            host = target.host
            try:
                local = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = False
            if local:
                ports.add(target.port)
    return sorted(ports)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = (
        Path(args[args.index("--config") + 1]) if "--config" in args else Path("config.json")
    )
    try:
        ports = loopback_ports(config_path)
    except ConfigError as exc:
        return fail("tcpproxy", str(exc))
    echo = subprocess.Popen(
        [sys.executable, "-m", "tcpproxy.echo", "--until-stdin-closes", *map(str, ports)],
        stdin=subprocess.PIPE,
    )
    try:
        _wait_listening(ports, echo)  # else tcpproxy's first probes find them down
        return tcpproxy_main(args)
    finally:
        _stop(echo)


def _wait_listening(ports: Sequence[int], echo: subprocess.Popen[bytes]) -> None:
    """Until every port answers on 127.0.0.1, the echo process ends (a port taken:
    it said so), or ECHO_START_TIMEOUT passes; tcpproxy starts either way."""
    deadline = time.monotonic() + ECHO_START_TIMEOUT
    waiting = list(ports)
    while waiting and echo.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
            continue
        waiting.pop(0)


def _stop(echo: subprocess.Popen[bytes]) -> None:
    """Close its standard input (it stops at end of file) and wait for it."""
    assert echo.stdin is not None
    echo.stdin.close()
    echo.wait(timeout=ECHO_STOP_TIMEOUT)


if __name__ == "__main__":
    raise SystemExit(main())
