"""Least-connections with the real Proxy: connections count from the moment they
choose a target, not once connected (a stub resolver holds the connects back)."""

from __future__ import annotations

import socket

import pytest
import trio

from tcpproxy.config import AppConfig, Config, Strategy, Target
from tcpproxy.proxy import Proxy
from tests import inproc

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

PORT = inproc.PORT


class GatedResolver:
    """Every name is 127.0.0.1, answered only once `gate` is set (a slow DNS or path)."""

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        await self.gate.wait()
        return [(socket.AF_INET, ("127.0.0.1", port))]

    def cached(self, host: str, port: int) -> None:
        return None  # never cached: every connection waits for resolve()

    def forget(self) -> None:
        pass


async def wait_until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_burst_of_connecting_clients_spreads_over_least_connections(backends) -> None:
    t0, t1 = backends("t0"), backends("t1")
    targets = (Target("t0.test", t0.port), Target("t1.test", t1.port))
    app = AppConfig("A", (PORT,), targets, strategy=Strategy.LEAST_CONNECTIONS)
    resolver = GatedResolver()
    clients: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            proxy = Proxy(
                Config(apps=(app,)), max_connections=100,
                resolver=resolver, use_splice=False,  # type: ignore[arg-type]
            )  # fmt: skip
            await nursery.start(proxy.engine.run)

            def arrive() -> None:
                clients.append(inproc.arrive(proxy, peer=("127.0.0.1", 40000 + len(clients))))

            arrive()
            resolver.gate.set()
            await wait_until(lambda: t0.accepted + t1.accepted == 1)
            resolver.gate = trio.Event()
            for _ in range(4):  # a burst: all choose while none has connected
                arrive()
            await trio.sleep(0.1)
            resolver.gate.set()
            await wait_until(lambda: t0.accepted + t1.accepted == 5)
            assert sorted(proxy.admission.active.values()) == [2, 3]  # not [1, 4]
            assert sorted((t0.accepted, t1.accepted)) == [2, 3]
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
