"""Recovery probes: how long they wait, for which target (a stub resolver, virtual time)."""

from __future__ import annotations

import trio

from tcpproxy.config import AppConfig, Config, Target
from tcpproxy.health import HealthBook
from tcpproxy.metrics import NullMetrics
from tcpproxy.probes import HealthMonitor

T = Target("backend.example", 5432)


class HangingResolver:
    """Never answers; records how long each lookup was given (its caller's timeout)."""

    def __init__(self) -> None:
        self.allowed: list[float] = []

    async def resolve(self, host: str, port: int) -> list:
        self.allowed.append(trio.current_effective_deadline() - trio.current_time())
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def app(name: str, port: int, connect_timeout: float) -> AppConfig:
    return AppConfig(name=name, ports=(port,), targets=(T,), connect_timeout=connect_timeout)


async def test_recovery_probes_use_the_largest_connect_timeout_of_the_targets_apps(
    autojump_clock,
) -> None:
    resolver = HangingResolver()
    monitor = HealthMonitor(HealthBook(), resolver, NullMetrics())  # type: ignore[arg-type]
    monitor.apply(Config(apps=(app("slow", 1, 7.0), app("fast", 2, 0.5))))
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        monitor.connect_failed_now(T, "no answer within 7s")
        await trio.sleep(30)  # virtual: a few probes, each given its whole timeout
        assert resolver.allowed, "no recovery probe ran"
        assert set(resolver.allowed) == {7.0}
        # a reload that changes ConnectTimeout applies to the next probe
        resolver.allowed.clear()
        monitor.apply(Config(apps=(app("fast", 2, 0.5),)))
        await trio.sleep(30)
        assert resolver.allowed
        assert set(resolver.allowed) == {0.5}
        nursery.cancel_scope.cancel()
