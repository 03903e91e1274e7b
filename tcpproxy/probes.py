"""Probing targets: recovery probes for targets marked down, and active checks.

The I/O half of health; `tcpproxy.health` decides what each outcome means.
"""

from __future__ import annotations

import logging

import trio

from tcpproxy.config import Config, HealthCheck, Target
from tcpproxy.connect import LOCAL_ERRNOS, AddressCheck, connect_target, describe_error
from tcpproxy.health import BACKOFF_INITIAL, HealthBook
from tcpproxy.metrics import NullMetrics
from tcpproxy.resolve import Resolver

__all__ = ["HealthMonitor", "probe"]

log = logging.getLogger("tcpproxy")

# seconds a recovery probe's connect may take when no app of the config uses its target
# (otherwise: the largest ConnectTimeout among the apps that use it); the default ConnectTimeout
PROBE_TIMEOUT = 2.0


async def probe(
    target: Target, resolver: Resolver, timeout: float, check: AddressCheck | None = None
) -> tuple[bool | None, str]:
    """One TCP connect to `target`: (True, ""), (False, why), or (None, why) when the
    failure was ours (out of descriptors) and says nothing about the target.
    `check` vetoes addresses as for clients (a probe must not connect to the proxy)."""
    try:
        with trio.fail_after(timeout):
            sock = await connect_target(target, resolver, check=check)
    except trio.TooSlowError as exc:
        return False, describe_error(exc, timeout)
    except OSError as exc:
        return (None if exc.errno in LOCAL_ERRNOS else False), describe_error(exc)
    sock.close()
    return True, ""


class HealthMonitor:
    """Runs the probes `HealthBook` asks for.

    Resource handling: every probe task lives in the nursery of `run()`; a
    reload cancels the active checks of targets that left the config.
    """

    def __init__(
        self,
        book: HealthBook,
        resolver: Resolver,
        metrics: NullMetrics,
        check: AddressCheck | None = None,
    ) -> None:
        self.book = book
        self._check_address = check
        self._resolver = resolver
        self._metrics = metrics
        self._nursery: trio.Nursery | None = None
        self._recovering: set[Target] = set()
        self._checks: dict[tuple[Target, HealthCheck], trio.CancelScope] = {}
        self._config: Config | None = None
        self._probe_timeouts: dict[Target, float] = {}  # per target, from the config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._config is not None:
                    self.apply(self._config)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._recovering.clear()
            self._checks.clear()

    # -- passive ------------------------------------------------------------

    def connect_ok(self, target: Target) -> None:
        message = self.book.connect_ok(target)
        if message:
            log.info("%s", message)
            self._metrics.target_state(target, True)

    def connect_failed_now(self, target: Target, why: str) -> None:
        """A client's connect failed: mark the target down and probe it until it answers."""
        message = self.book.connect_failed(target, why, trio.current_time())
        if message is None:
            return
        log.warning("%s; probing it again in %gs", message, BACKOFF_INITIAL)
        self._state_to_metrics(target)
        if self._nursery is not None and target not in self._recovering:
            self._recovering.add(target)
            self._nursery.start_soon(self._recover, target)

    def _state_to_metrics(self, target: Target) -> None:
        down = self.book.is_down(target)
        self._metrics.target_state(target, not down, self.book.get(target).reason if down else "")

    def probe_timeout(self, target: Target) -> float:
        """The seconds a recovery probe of `target` may take: as long as a client's
        connect may (a target slower than 2 s that its apps allow for is not down)."""
        return self._probe_timeouts.get(target, PROBE_TIMEOUT)

    async def _recover(self, target: Target) -> None:
        try:
            while self.book.is_down(target):
                await trio.sleep_until(self.book.get(target).retry_at)
                if not self.book.is_down(target):
                    break  # a client connection got through meanwhile
                ok, why = await probe(
                    target, self._resolver, self.probe_timeout(target), self._check_address
                )
                if ok is None:  # our own shortage (descriptors): says nothing of the target
                    await trio.sleep(self.book.get(target).backoff)
                    continue
                message = self.book.probe_result(target, ok, trio.current_time(), why=why)
                if message:
                    log.info("%s", message)
                    self._state_to_metrics(target)
        finally:
            self._recovering.discard(target)

    # -- active -------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Run active checks for exactly the (target, HealthCheck) pairs of `config`."""
        self._config = config
        timeouts: dict[Target, float] = {}
        for app in config.apps:
            for target in app.targets:
                timeouts[target] = max(timeouts.get(target, 0.0), app.connect_timeout)
        self._probe_timeouts = timeouts
        targets = set(timeouts)
        self.book.retain(targets)
        for target in targets:
            self._state_to_metrics(target)
        if self._nursery is None:
            return
        wanted = {
            (target, app.health_check)
            for app in config.apps
            if app.health_check is not None
            for target in app.targets
        }
        for key in list(self._checks):
            if key not in wanted:
                self._checks.pop(key).cancel()
        for key in wanted - self._checks.keys():
            scope = trio.CancelScope()
            self._checks[key] = scope
            self._nursery.start_soon(self._check, scope, *key)

    async def _check(self, scope: trio.CancelScope, target: Target, check: HealthCheck) -> None:
        with scope:
            while True:
                ok, why = await probe(target, self._resolver, check.timeout, self._check_address)
                if ok is not None:
                    message = self.book.probe_result(
                        target, ok, trio.current_time(), why=why, rise=check.rise, fall=check.fall
                    )
                    if message:
                        log.warning("%s (health check)", message)
                        self._state_to_metrics(target)
                await trio.sleep(check.interval)
