"""`tcpproxy`: listen on every port of every app and proxy to the app's targets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
import trio

from tcpproxy.cli_common import (
    common_options,
    fit_connection_limit,
    read_config,
    run_cli,
    setup_logging,
)
from tcpproxy.port_listeners import PortListeners
from tcpproxy.service import run_service

__all__ = ["command", "main"]

EPILOG = """\b
Examples:
  tcpproxy                               # ./config.json, every address
  tcpproxy -c /etc/tcpproxy.json --bind 127.0.0.1
  TCPPROXY_CONFIG=prod.json tcpproxy --log-level debug
  kill -HUP $(pidof -x tcpproxy)         # reload now (file changes reload too)
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@common_options("tcpproxy")
@click.option(
    "--bind", metavar="ADDRESS", default=None,
    help="Address to listen on.  [default: every address, IPv4 and IPv6]",
)  # fmt: skip
def command(
    config_path: Path,
    bind: str | None,
    drain_timeout: float,
    max_connections: int | None,
    splice: bool,
    log_level: str,
) -> int:
    """Proxy TCP connections: one listener per port of every app in the config,
    each connection relayed to one of its app's targets. The config is reloaded
    on change without dropping connections; SIGTERM drains, then exits."""
    setup_logging(log_level)
    data, config = read_config(config_path)
    limit = fit_connection_limit(max_connections)
    frontend = PortListeners(bind)
    frontend.open(config)
    trio.run(
        lambda: run_service(
            config_path,
            data,
            config,
            frontend,
            drain_timeout=drain_timeout,
            max_connections=limit,
            use_splice=splice,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("tcpproxy", command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
