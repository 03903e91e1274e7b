"""The proxy proper, shared by both binaries: port -> app -> target -> relay.

How a connection arrives (a listener per port, or one socket steered by BPF)
is the binary's business; from `dispatch()` on, both run this code.

Limits:
- `max_connections` (process-wide): each accept loop takes a slot before
  accepting, so at the limit the proxy stops accepting and new connections
  wait in the kernel's listen queue (as HAProxy's maxconn does) instead of
  failing; they are accepted as slots free up.
- An app's `MaxConnections`: a connection over it is closed at once with a
  reset (one listener may serve many apps under bpfproxy, so there is no
  per-app queue to hold it in); a warning is logged at most once per
  LIMIT_LOG_INTERVAL per app.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from tcpproxy.balance import Balancer
from tcpproxy.config import AppConfig, Config, Target
from tcpproxy.connect import describe_error, open_target
from tcpproxy.diff import format_ports
from tcpproxy.errors import ResourceExhausted, TargetUnavailable
from tcpproxy.health import HealthBook
from tcpproxy.metrics import NullMetrics
from tcpproxy.monitor import HealthMonitor
from tcpproxy.proxy_protocol import ProxyHeaderError, build_header, read_header, send_all
from tcpproxy.resolve import Resolver
from tcpproxy.splice import EndReason, RelayStats, abort, relay

__all__ = ["LIMIT_LOG_INTERVAL", "AppRuntime", "Proxy"]

log = logging.getLogger("tcpproxy")

LIMIT_LOG_INTERVAL = 10.0  # seconds between repeated "limit reached" warnings


@dataclass(frozen=True, slots=True)
class AppRuntime:
    """An app as connections see it: its config and its balancer.

    Replaced, never mutated, by a reload that changes the app; connections
    already running keep the one they started with.
    """

    config: AppConfig
    balancer: Balancer


def format_peer(peer: tuple) -> str:
    host, port = peer[0], peer[1]
    if host.startswith("::ffff:") and "." in host:  # IPv4 client on a dual-stack socket
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Proxy:
    """Routes accepted connections to targets and relays them.

    Args:
      config: the initial configuration.
      connections: the nursery that owns every connection task; it outlives
        listeners, so connections drain after their listener stops.
      max_connections: this process's limit of open connections.
      id_prefix: starts every connection id (a worker's "w1-"), so ids are
        unique across the workers' logs.
      share: how many worker processes share the apps' MaxConnections (each
        enforces its part, rounded up).
      resolver: host name resolution (a fresh one when omitted).
      use_splice: relay with splice(2) (default) or copy through a buffer.
    """

    def __init__(
        self,
        config: Config,
        connections: trio.Nursery,
        *,
        max_connections: int,
        share: int = 1,
        id_prefix: str = "",
        metrics: NullMetrics | None = None,
        resolver: Resolver | None = None,
        use_splice: bool = True,
    ) -> None:
        self._connections = connections
        self._resolver = resolver or Resolver()
        self._use_splice = use_splice
        self.max_connections = max_connections
        self._share = share
        self._ids = itertools.count(1)  # connection ids, for every log line about one
        self._id_prefix = id_prefix
        self.slots = trio.Semaphore(max_connections)  # taken by accept loops, given back here
        self.metrics = metrics or NullMetrics()
        self.health = HealthMonitor(HealthBook(), self._resolver, self.metrics)
        self.active: Counter[Target] = Counter()  # open connections per target
        self.active_by_app: Counter[str] = Counter()
        self.active_total = 0
        self._limit_logged: dict[str, float] = {}
        self.config = Config(apps=())
        self._apps: dict[str, AppRuntime] = {}
        self._routes: dict[int, AppRuntime] = {}
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Make `config` the one new connections use.

        Apps whose config is unchanged keep their runtime (and round-robin
        position); established connections are never touched.
        """
        apps: dict[str, AppRuntime] = {}
        for app in config.apps:
            old = self._apps.get(app.name)
            if old is not None and old.config == app:
                apps[app.name] = old
            else:
                balancer = Balancer(app.targets, app.strategy, active=self.active)
                apps[app.name] = AppRuntime(app, balancer)
        self._apps = apps
        self._routes = {port: apps[app.name] for app in config.apps for port in app.ports}
        if config != self.config:
            self._resolver.forget()
        self.config = config
        self.health.apply(config)

    async def _send_header(
        self, target_sock: socket.socket, header: bytes, cfg: AppConfig, stats: RelayStats
    ) -> bool:
        """Send our PROXY header; False (and stats set) if the target failed first."""
        try:
            with trio.fail_after(cfg.connect_timeout):
                await send_all(target_sock, header)
        except (OSError, trio.TooSlowError) as exc:
            stats.reason, stats.error = EndReason.TARGET_EARLY_ERROR, describe_error(exc)
            return False
        return True

    async def _proxy_protocol(
        self, client: socket.socket, peer: tuple, cfg: AppConfig
    ) -> tuple[tuple, bytes]:
        """Read the balancer's header (AcceptProxyProtocol) and build ours
        (SendProxyProtocol): returns the client's real address and our header."""
        destination = client.getsockname()
        if cfg.accept_proxy_protocol:
            source = await read_header(client)
            if source is not None:
                peer = source
        header = b""
        if cfg.send_proxy_protocol:
            header = build_header(cfg.send_proxy_protocol, peer, destination)
        return peer, header

    def status(self) -> dict[str, Any]:
        """A snapshot for /status: apps, ports, targets with health, connections."""
        book = self.health.book
        apps = []
        for app in self.config.apps:
            apps.append({
                "name": app.name,
                "ports": format_ports(app.ports),
                "active": self.active_by_app.get(app.name, 0),
                "targets": [
                    {
                        "address": str(t),
                        "state": "down" if book.is_down(t) else "up",
                        "reason": book.get(t).reason if book.is_down(t) else "",
                        "active": self.active.get(t, 0),
                    }
                    for t in app.targets
                ],
            })  # fmt: skip
        return {"active_connections": self.active_total, "apps": apps}

    def route(self, port: int) -> AppRuntime | None:
        return self._routes.get(port)

    def _warn_limit(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._limit_logged.get(key, -LIMIT_LOG_INTERVAL) >= LIMIT_LOG_INTERVAL:
            self._limit_logged[key] = now
            log.warning(message, *args)

    def dispatch(self, client: socket.socket, port: int, peer: tuple) -> None:
        """Take an accepted connection and the slot its accept loop took.

        Routing happens here, synchronously at accept time, so a reload that
        lands before the connection's task runs cannot strand it.
        """
        app = self._routes.get(port)
        if app is None:  # steered or queued before its port was removed
            cid = f"{self._id_prefix}{next(self._ids)}"
            log.debug("conn %s client=%s port=%d: no app for this port; closing",
                      cid, format_peer(peer), port, extra={"conn": cid})  # fmt: skip
            client.close()
            self.slots.release()
            self.metrics.rejected("-", "no-route")
            return
        name = app.config.name
        if self.active_by_app[name] * self._share >= app.config.max_connections:
            self._warn_limit(
                name, "app %r: MaxConnections (%d) reached; resetting new connections",
                name, app.config.max_connections,
            )  # fmt: skip
            abort(client)
            self.slots.release()
            self.metrics.rejected(name, "over-limit")
            return
        if self.slots.value == 0:
            self._warn_limit(
                "", "max-connections (%d) reached; new connections wait in the listen queue",
                self.max_connections,
            )  # fmt: skip
        self.metrics.accepted(name)
        self.active_total += 1
        self.active_by_app[name] += 1
        cid = f"{self._id_prefix}{next(self._ids)}"
        self._connections.start_soon(self._serve, client, port, peer, app, cid, name="conn")

    async def _serve(
        self, client: socket.socket, port: int, peer: tuple, app: AppRuntime, cid: str
    ) -> None:
        started = time.monotonic()
        stats = RelayStats()
        target: Target | None = None
        target_sock: socket.socket | None = None
        reason = "cancelled"
        metrics = self.metrics
        cfg = app.config
        failed: list[str] | None = None  # targets tried in vain before the one that answered
        health = self.health
        header = b""  # PROXY protocol header for targets
        try:
            if cfg.accept_proxy_protocol or cfg.send_proxy_protocol:
                try:
                    peer, header = await self._proxy_protocol(client, peer, cfg)
                except (ProxyHeaderError, trio.TooSlowError, OSError) as exc:
                    reason = "client-error (PROXY header)"
                    log.warning("conn %s client=%s port=%d: %s", cid, format_peer(peer), port,
                                describe_error(exc), extra={"conn": cid})  # fmt: skip
                    return
            order = app.balancer.order(health.book.is_down)
            while True:
                connecting = time.monotonic()
                try:
                    target_sock, target, failures = await open_target(
                        cfg.name, order, self._resolver, cfg.connect_timeout,
                        on_failure=health.connect_failed_now,
                    )  # fmt: skip
                except TargetUnavailable as exc:
                    reason = "no-target"
                    log.warning("conn %s client=%s port=%d: %s", cid, format_peer(peer), port,
                                exc, extra={"conn": cid})  # fmt: skip
                    return
                except ResourceExhausted as exc:
                    reason = "no-resources"
                    self._warn_limit(
                        "resources",
                        "conn %s client=%s port=%d: %s",
                        cid,
                        format_peer(peer),
                        port,
                        exc,
                    )
                    return
                if failures:
                    failed = (failed or []) + [f"{t}({why})" for t, why in failures]
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("conn %s client=%s port=%d app=%s: connected to %s",
                              cid, format_peer(peer), port, cfg.name, target,
                              extra={"conn": cid})  # fmt: skip
                health.connect_ok(target)
                metrics.connected(cfg.name, target, time.monotonic() - connecting)
                self.active[target] += 1
                try:
                    # A target that fails our PROXY header counts as failing early.
                    if not header or await self._send_header(target_sock, header, cfg, stats):
                        await relay(
                            client, target_sock, stats,
                            use_splice=self._use_splice, idle_timeout=cfg.idle_timeout,
                        )  # fmt: skip
                finally:
                    self.active[target] -= 1
                    if not self.active[target]:
                        del self.active[target]  # bounded: only targets with open connections
                order = order[order.index(target) + 1 :]
                if stats.reason is not EndReason.TARGET_EARLY_ERROR or not order:
                    break
                # The target failed before any byte moved: the client never knew it.
                failed = [*(failed or []), f"{target}({stats.error.lower()})"]
                metrics.ended(cfg.name, target, "target-early-error", 0, 0)
                target_sock.close()
                target_sock = target = None
            reason = stats.reason.value
            if stats.reason is EndReason.TARGET_EARLY_ERROR:
                abort(client)  # no target left to try
            if stats.reason in (
                EndReason.CLIENT_ERROR,
                EndReason.TARGET_ERROR,
                EndReason.TARGET_EARLY_ERROR,
            ):
                reason = f"{reason} ({stats.error})"
        except Exception:  # a bug must cost one connection, not the proxy
            reason = "internal-error"
            log.exception("conn %s client=%s port=%d: internal error", cid, format_peer(peer),
                          port, extra={"conn": cid})  # fmt: skip
        finally:
            self.active_total -= 1
            self.active_by_app[cfg.name] -= 1
            if not self.active_by_app[cfg.name]:
                del self.active_by_app[cfg.name]
            self.slots.release()
            if reason == "cancelled":
                abort(client)  # the proxy cut it short: tell the client it is incomplete
            client.close()
            if target_sock is not None:
                target_sock.close()
            metrics.ended(cfg.name, target, reason.split(" ", 1)[0], stats.up, stats.down)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "conn %s client=%s port=%d app=%s target=%s up=%d down=%d duration=%.3fs "
                    "end=%s%s", cid, format_peer(peer), port, cfg.name, target or "-",
                    stats.up, stats.down, time.monotonic() - started, reason,
                    f" failed-first={','.join(failed)}" if failed else "",
                    extra={"conn": cid},
                )  # fmt: skip
