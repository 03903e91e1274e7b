"""`bpfproxy`: every configured port on one listening socket, steered by sk_lookup."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import click
import trio

from bpfproxy.steered import SteeredListener, check_listen_port
from tcpproxy.cli_common import (
    common_options,
    fit_connection_limit,
    read_config,
    run_cli,
    setup_logging,
)
from tcpproxy.errors import StartupError
from tcpproxy.listeners import open_listener
from tcpproxy.service import run_service

__all__ = ["command", "main"]

log = logging.getLogger("tcpproxy")

DEFAULT_LISTEN_PORT = 8000  # the one socket's own port; it must not be an app port

EPILOG = """\b
Examples:
  sudo bpfproxy -p 8000                  # ./config.json, all its ports on one socket
  sudo bpfproxy -p 8000 -c /etc/tcpproxy.json --log-level debug
  sudo bpfproxy --check                  # can this machine load the program?
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@common_options("bpfproxy")
@click.option(
    "-p",
    "--port",
    "listen_port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_LISTEN_PORT,
    show_default=True,
    help="Port of the one listening socket (served normally; not an app port).",
)
@click.option(
    "--bind",
    metavar="ADDRESS",
    default=None,
    help="Address of the listening socket.  [default: [::] dual-stack, IPv4 and IPv6]",
)
@click.option(
    "--check", is_flag=True,
    help="Compile and load the BPF program without attaching it, then exit.",
)  # fmt: skip
def command(
    config_path: Path,
    listen_port: int,
    bind: str | None,
    check: bool,
    drain_timeout: float,
    max_connections: int | None,
    splice: bool,
    log_level: str,
) -> int:
    """Proxy TCP connections for every port of every app through ONE listening
    socket: an sk_lookup BPF program steers each configured port to it, and the
    connection's destination port picks the app. Needs root (CAP_BPF and
    CAP_NET_ADMIN), Linux 5.9+, bcc and kernel headers."""
    setup_logging(log_level)
    from bpfproxy.dispatcher import Dispatcher, SteeringError, check_environment, compile_check

    try:
        if check:
            compile_check()
            click.echo("bpfproxy: ok: the sk_lookup program compiles and loads on this machine")
            return 0
        check_environment()  # first: "run it with sudo" is what a user must fix first
        data, config = read_config(config_path)
        check_listen_port(listen_port, config)
        limit = fit_connection_limit(max_connections)
        with contextlib.ExitStack() as stack:
            listener = open_listener(bind, listen_port)
            stack.callback(listener.close)
            dispatcher = Dispatcher(listener)
            stack.callback(dispatcher.close)  # runs before listener.close: unsteer first
            frontend = SteeredListener(listener, dispatcher, listen_port)
            frontend.steer(config)
            trio.run(
                lambda: run_service(
                    config_path, data, config, frontend,
                    drain_timeout=drain_timeout,
            max_connections=limit,
            use_splice=splice,
                )
            )  # fmt: skip
    except SteeringError as exc:
        raise StartupError(str(exc)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("bpfproxy", command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
