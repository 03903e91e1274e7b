"""A tiny echo server for demos: `python -m tcpproxy.echo PORT [PORT ...]`.

Echoes every byte back on 127.0.0.1 and forwards half-close, like the
challenge's public echo service.
"""

from __future__ import annotations

import sys
from functools import partial

import trio


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def serve(ports: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        for port in ports:
            nursery.start_soon(partial(trio.serve_tcp, _echo, port, host="127.0.0.1"))


def main() -> None:
    ports = [int(p) for p in sys.argv[1:]]
    print(f"echo backends on 127.0.0.1 ports {' '.join(map(str, ports))}", file=sys.stderr)
    try:
        trio.run(serve, ports)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
