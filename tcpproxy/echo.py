"""A tiny echo server for demos: `python -m tcpproxy.echo PORT [PORT ...]`.

Echoes every byte back on 127.0.0.1 and forwards half-close, like the
challenge's public echo service.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from functools import partial

import click
import trio

from tcpproxy.cli_common import fail, run_cli

__all__ = ["main", "serve"]

PROG = "tcpproxy.echo"


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def serve(ports: Sequence[int], *, until_eof: int | None = None) -> None:
    """Listen on every port first (an OSError if one is taken), say so on stderr,
    then echo until cancelled, or until descriptor ``until_eof`` reads end of file."""
    listeners: list[trio.SocketListener] = []
    for port in ports:
        listeners += await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"echo backends on 127.0.0.1 ports {' '.join(map(str, ports))}", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _echo, listeners)
        if until_eof is not None:
            await _wait_for_eof(until_eof)
            nursery.cancel_scope.cancel()


async def _wait_for_eof(fd: int) -> None:
    """Return once ``fd`` (a pipe's read end) is at end of file: every writer closed it."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 4096):
            return


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ports", metavar="PORT...", nargs=-1, required=True,
                type=click.IntRange(1, 65535))  # fmt: skip
@click.option(
    "--until-stdin-closes", is_flag=True, hidden=True,
    help="Internal (make run): also stop when standard input reaches end of file, that is "
    "when the process that started this one (holding the other end) ends.",
)  # fmt: skip
def command(ports: tuple[int, ...], until_stdin_closes: bool) -> int:
    """Echo every byte back on 127.0.0.1 PORT (each one given), forwarding
    half-close: demo backends for the proxy. Stops on Ctrl-C or SIGTERM."""
    try:
        trio.run(partial(serve, ports, until_eof=0 if until_stdin_closes else None))
    except OSError as exc:  # e.g. a port already in use
        return fail(PROG, f"cannot listen on 127.0.0.1 ports {' '.join(map(str, ports))}: {exc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
