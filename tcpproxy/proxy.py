"""The proxy proper, shared by both binaries: port -> app -> target -> relay.

How a connection arrives (a listener per port, or one socket steered by BPF)
is the binary's business; from `dispatch()` on, both run this code.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import trio

from tcpproxy.balance import Balancer
from tcpproxy.config import AppConfig, Config, Target
from tcpproxy.connect import open_target
from tcpproxy.errors import TargetUnavailable
from tcpproxy.resolve import Resolver
from tcpproxy.splice import EndReason, RelayStats, abort, relay

__all__ = ["AppRuntime", "Proxy"]

log = logging.getLogger("tcpproxy")


@dataclass(frozen=True, slots=True)
class AppRuntime:
    """An app as connections see it: its config and its balancer.

    Replaced, never mutated, by a reload that changes the app; connections
    already running keep the one they started with.
    """

    config: AppConfig
    balancer: Balancer


def _format_peer(peer: tuple) -> str:
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
      resolver: host name resolution (a fresh one when omitted).
      use_splice: relay with splice(2) (default) or copy through a buffer.
    """

    def __init__(
        self,
        config: Config,
        connections: trio.Nursery,
        *,
        resolver: Resolver | None = None,
        use_splice: bool = True,
    ) -> None:
        self._connections = connections
        self._resolver = resolver or Resolver()
        self._use_splice = use_splice
        self.active: Counter[Target] = Counter()  # open connections per target (least-connections)
        self.active_total = 0
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

    def route(self, port: int) -> AppRuntime | None:
        return self._routes.get(port)

    def dispatch(self, client: trio.socket.SocketType, port: int, peer: tuple) -> None:
        """Take an accepted connection: route it now, serve it in its own task.

        Routing happens here, synchronously at accept time, so a reload that
        lands before the task runs cannot strand the connection.
        """
        app = self._routes.get(port)
        if app is None:  # steered or queued before its port was removed
            log.debug("conn %s port=%d: no app for this port; closing", _format_peer(peer), port)
            client.close()
            return
        self.active_total += 1
        self._connections.start_soon(self._serve, client, port, peer, app)

    async def _serve(
        self, client: trio.socket.SocketType, port: int, peer: tuple, app: AppRuntime
    ) -> None:
        started = time.monotonic()
        stats = RelayStats()
        target: Target | None = None
        target_sock: trio.socket.SocketType | None = None
        reason = "cancelled"
        try:
            cfg = app.config
            try:
                target_sock, target = await open_target(
                    cfg.name, app.balancer.order(), self._resolver, cfg.connect_timeout
                )
            except TargetUnavailable as exc:
                reason = "no-target"
                log.warning("conn %s port=%d: %s", _format_peer(peer), port, exc)
                return
            self.active[target] += 1
            try:
                await relay(client, target_sock, stats, use_splice=self._use_splice)
            finally:
                self.active[target] -= 1
            reason = stats.reason.value
            if stats.reason is not EndReason.DONE:
                reason = f"{reason} ({stats.error})"
        except Exception:  # a bug must cost one connection, not the proxy
            reason = "internal-error"
            log.exception("conn %s port=%d: internal error", _format_peer(peer), port)
        finally:
            self.active_total -= 1
            if reason.startswith("cancelled"):
                abort(client)  # the proxy cut it short: tell the client it is incomplete
            client.close()
            if target_sock is not None:
                target_sock.close()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "conn %s port=%d app=%s target=%s up=%d down=%d duration=%.3fs end=%s",
                    _format_peer(peer), port, app.config.name, target or "-",
                    stats.up, stats.down, time.monotonic() - started, reason,
                )  # fmt: skip
