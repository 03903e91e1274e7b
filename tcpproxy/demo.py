"""`make run`: echo backends for the config's loopback targets, then tcpproxy.

So that `echo hello | nc -N localhost 6300` answers on a machine with nothing
else running. Targets that are not on loopback are left to exist elsewhere.

Started as root, tcpproxy serves as another user (or as root without
capabilities) after setup, and then may no longer signal the echo backends,
which stay root's. So they also stop when their standard input, a pipe this
process holds, closes: when it ends, whoever it serves as, however it stops.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tcpproxy.cli import main as tcpproxy_main
from tcpproxy.cli_common import fail, read_config
from tcpproxy.config import ConfigError

ECHO_STOP_TIMEOUT = 5.0  # seconds for the echo backends to stop once told to


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
        return tcpproxy_main(args)
    finally:
        _stop(echo)


def _stop(echo: subprocess.Popen[bytes]) -> None:
    """Close its standard input (it stops at end of file) and wait for it."""
    assert echo.stdin is not None
    echo.stdin.close()
    echo.wait(timeout=ECHO_STOP_TIMEOUT)


if __name__ == "__main__":
    raise SystemExit(main())
