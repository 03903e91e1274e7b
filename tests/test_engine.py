"""The epoll engine in-process: its loop must notice what its helper tasks change."""

from __future__ import annotations

import socket

import trio

from tcpproxy.config import AppConfig, Config, Target
from tcpproxy.proxy import Proxy
from tests.test_connect import Blackhole

PORT = 1  # the app's port: connections are handed to dispatch(), nothing listens


class LookupResolver:
    """Nothing cached: every connection's name is resolved on the engine's lookup task."""

    def __init__(self, addresses: list[tuple[int, tuple]]) -> None:
        self.addresses = addresses

    def cached(self, host: str, port: int) -> None:
        return None

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        await trio.sleep(0.05)  # answered while the loop sleeps
        return self.addresses

    def forget(self) -> None:
        pass


async def test_the_stagger_armed_by_a_lookup_wakes_the_loop() -> None:
    """A name whose first address drops SYNs: the lookup task arms the happy-eyeballs
    stagger; the sleeping loop must wake for it, not only at the connect timeout."""
    hole = Blackhole()
    live = socket.socket()
    client = None
    try:
        live.bind(("127.0.0.1", 0))
        live.listen()
        live.setblocking(False)
        resolver = LookupResolver([
            (socket.AF_INET, hole.address), (socket.AF_INET, live.getsockname()),
        ])  # fmt: skip
        app = AppConfig("A", (PORT,), (Target("db.test", 5432),), connect_timeout=5.0)
        async with trio.open_nursery() as nursery:
            proxy = Proxy(
                Config(apps=(app,)), nursery, max_connections=10, resolver=resolver,  # type: ignore[arg-type]
                use_splice=False, engine="epoll",
            )  # fmt: skip
            assert proxy.engine is not None
            await nursery.start(proxy.engine.run)
            ours, client = socket.socketpair()
            ours.setblocking(False)
            proxy.slots.acquire_nowait()  # as an accept loop does
            proxy.dispatch(ours, PORT, ("127.0.0.1", 40000))
            with trio.move_on_after(2.5) as waited:  # well within the 5 s connect timeout
                await trio.lowlevel.wait_readable(live)
            assert not waited.cancelled_caught, "the second address was not tried in time"
            live.accept()[0].close()
            nursery.cancel_scope.cancel()
    finally:
        hole.close()
        live.close()
        if client is not None:
            client.close()
