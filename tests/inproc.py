"""The engine in-process: a Proxy for one app, its loop in the test's nursery,
and clients handed to it as its accept would hand them."""

from __future__ import annotations

import socket
from typing import Any

import trio

from tcpproxy.admission import Ticket
from tcpproxy.config import AppConfig, Config
from tcpproxy.engine import Engine
from tcpproxy.metrics import NullMetrics
from tcpproxy.proxy import Proxy

PORT = 1  # the app's port: connections are handed to the engine, nothing listens
PEER = ("127.0.0.1", 40000)  # the client's address the engine is told


async def serve(nursery: trio.Nursery, *apps: AppConfig, **options: Any) -> tuple[Proxy, Engine]:
    """A Proxy for `apps` (max_connections 10 unless given), its engine running in `nursery`."""
    options.setdefault("max_connections", 10)
    proxy = Proxy(Config(apps=apps), **options)
    await nursery.start(proxy.engine.run)
    return proxy, proxy.engine


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (the proxy's end, non-blocking; the client's end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


def arrive(
    proxy: Proxy, *, tcp: bool = False, peer: tuple = PEER, port: int = PORT
) -> socket.socket:
    """A client accepted on `port` (over loopback TCP if `tcp`, else a socket pair), as
    the engine's accept hands it over; returns the client's end."""
    ours, client = tcp_pair() if tcp else socket.socketpair()
    ours.setblocking(False)
    ticket = proxy.admission.arrive(port, peer)  # the engine routes and admits it
    assert isinstance(ticket, Ticket), ticket
    proxy.engine.start(ours, port, peer, ticket)
    return client


class Ended(NullMetrics):
    """Metrics that keep each ended connection: (app, target, reason, up, down)."""

    def __init__(self) -> None:
        self.ended_connections: list[tuple[str, object, str, int, int]] = []

    def ended(self, app: str, target: object, reason: str, up: int, down: int) -> None:
        self.ended_connections.append((app, target, reason, up, down))

    async def wait(
        self, n: int = 1, timeout: float = 5.0
    ) -> list[tuple[str, object, str, int, int]]:
        """The first `n` ended connections, once there are that many."""
        with trio.fail_after(timeout):
            while len(self.ended_connections) < n:
                await trio.sleep(0.01)
        return self.ended_connections[:n]
