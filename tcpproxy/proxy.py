"""The proxy proper, shared by both binaries: port -> app -> target -> relay.

How a connection arrives (a listener per port, or one socket steered by BPF)
is the binary's business; from `dispatch()` on, both run this code.

Limits:
- `max_connections` (process-wide): each accept loop takes a slot before
  accepting, so at the limit the proxy stops accepting and new connections
  wait in the kernel's listen queue (as HAProxy's maxconn does) instead of
  failing; they are accepted as slots free up.
- An app's `MaxConnections`, and its `MaxConnectionsPerSource` (per client
  IP): a connection over it is closed at once with a reset (one listener
  may serve many apps under bpfproxy, so there is no per-app queue to hold
  it in); a warning is logged at most once per LIMIT_LOG_INTERVAL per app.
- An app's `TrustedProxies` (with AcceptProxyProtocol): a peer outside
  them is reset before its header is read, so nobody who can reach the
  port directly can claim any client address.
- An app's `FirstByteTimeout`: no target is connected before the client
  sends its first byte, and a client silent that long is closed, so silent
  clients hold no backend connection.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from tcpproxy.balance import Balancer
from tcpproxy.config import AppConfig, Config, Network, Target, app_connection_limit
from tcpproxy.engine import Engine
from tcpproxy.health import HealthBook
from tcpproxy.metrics import NullMetrics
from tcpproxy.probes import HealthMonitor
from tcpproxy.resolve import Resolver
from tcpproxy.selfloop import SelfLoopGuard
from tcpproxy.splice import abort
from tcpproxy.status import Counts

__all__ = ["LIMIT_LOG_INTERVAL", "AppRuntime", "Proxy", "WarnLimiter"]

log = logging.getLogger("tcpproxy")

LIMIT_LOG_INTERVAL = 10.0  # seconds between warnings of one kind (per app) a client can trigger
LIMIT_LOG_KEYS = 1024  # kinds of warning remembered at once; stale ones are then forgotten


class WarnLimiter:
    """Logs a warning at most once per `interval` per key, and says how many it held back.

    Every warning a client can trigger goes through one of these, so 2000 bad
    clients cost a few lines, not 2000. The key is the kind of warning and its
    app (never a client address: that would let clients choose the keys).
    """

    def __init__(
        self, interval: float = LIMIT_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed since)

    def __call__(
        self, key: str, message: str, *args: object, extra: dict[str, Any] | None = None
    ) -> bool:
        """Log `message % args` unless `key` was logged within the interval; True if logged.

        `extra` is the log record's structured fields (a connection's id).
        """
        now = self._clock()
        last, suppressed = self._seen.get(key, (-math.inf, 0))
        if now - last < self._interval:
            self._seen[key] = (last, suppressed + 1)
            return False
        if len(self._seen) >= LIMIT_LOG_KEYS:  # bounded: forget the kinds gone quiet
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
        self._seen[key] = (now, 0)
        if suppressed:
            message += " (%d more like this in the last %.0f s not logged)"
            args = (*args, suppressed, now - last)
        log.warning(message, *args, extra=extra)
        return True


@dataclass(frozen=True, slots=True)
class AppRuntime:
    """An app as connections see it: its config and its balancer.

    Replaced, never mutated, by a reload that changes the app; connections
    already running keep the one they started with.
    """

    config: AppConfig
    balancer: Balancer
    # the try order, down targets last: the balancer bound to the health book once
    # per app, not once per connection
    choose: Callable[[], list[Target]] = field(compare=False)


def client_ip(peer: tuple) -> str:
    """The client's IP address as text; an IPv4 client on a dual-stack socket unmapped."""
    host: str = peer[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def is_trusted(peer: tuple, networks: tuple[Network, ...]) -> bool:
    """Whether the peer's address is in one of `networks` (v4-mapped counts as IPv4)."""
    try:
        address = ipaddress.ip_address(client_ip(peer))
    except ValueError:  # not an IP peer: nothing to trust
        return False
    return any(address in network for network in networks)


def format_peer(peer: tuple) -> str:
    host, port = peer[0], peer[1]
    if host.startswith("::ffff:") and "." in host:  # IPv4 client on a dual-stack socket
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Proxy:
    """Routes accepted connections to targets and relays them.

    Args:
      config: the initial configuration.
      max_connections: this process's limit of open connections.
      id_prefix: starts every connection id (a worker's "w1-"), so ids are
        unique across the workers' logs.
      share: how many worker processes share the apps' MaxConnections (each
        enforces its part, rounded up).
      resolver: host name resolution (a fresh one when omitted).
      use_splice: relay with splice(2) (default) or copy through a buffer.
      listen_ports: ports this process listens on besides the apps' (bpfproxy's
        -p): a target resolving to a local address on one of them is refused.
      bind: the address every port listens on (--bind; None: every address),
        which narrows what counts as the proxy itself.

    Every connection is served by `engine` (tcpproxy/engine.py), whose task the
    caller starts (`engine.run`) in a nursery that outlives the listeners, so
    connections drain after their listener stops.
    """

    def __init__(
        self,
        config: Config,
        *,
        max_connections: int,
        share: int = 1,
        id_prefix: str = "",
        metrics: NullMetrics | None = None,
        resolver: Resolver | None = None,
        use_splice: bool = True,
        listen_ports: frozenset[int] = frozenset(),
        bind: str | None = None,
    ) -> None:
        self._resolver = resolver or Resolver()
        self._use_splice = use_splice
        self.max_connections = max_connections
        self._share = share
        # the whole proxy's limit (every worker's part): an app without MaxConnections
        # gets a share of it (config.app_connection_limit)
        self._total_limit = max_connections * share
        self._ids = itertools.count(1)  # connection ids, for every log line about one
        self._id_prefix = id_prefix
        self.slots = trio.Semaphore(max_connections)  # taken by accept loops, given back here
        self.metrics = metrics or NullMetrics()
        self._listen_ports = listen_ports
        self._self_loop = SelfLoopGuard(bind=bind)  # names that resolve to the proxy itself
        self.health = HealthMonitor(
            HealthBook(), self._resolver, self.metrics, check=self._self_loop.check
        )
        # open connections per target, each counted from its choice (balance.Claim)
        self.active: Counter[Target] = Counter()
        self.active_by_app: Counter[str] = Counter()
        self.active_by_source: Counter[tuple[str, str]] = Counter()  # (app, client IP)
        self.active_total = 0
        self._warn_limit = WarnLimiter()  # for every warning a client can trigger
        self.config = Config(apps=())
        self._apps: dict[str, AppRuntime] = {}
        self._routes: dict[int, AppRuntime] = {}
        self.apply(config)
        self.engine = Engine(self, use_splice=use_splice)

    async def serve_listener(
        self,
        listener: socket.socket,
        port: int | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on `listener` until cancelled (then close it), in the engine's loop."""
        with listener:
            self.engine.add_listener(listener, port)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.engine.remove_listener(listener)

    def apply(self, config: Config) -> None:
        """Make `config` the one new connections use.

        Apps whose config is unchanged keep their runtime (and round-robin
        position); established connections are never touched.
        """
        apps: dict[str, AppRuntime] = {}
        for app in config.apps:
            old = self._apps.get(app.name)
            if old is not None and (old.config is app or old.config == app):
                apps[app.name] = old
            else:
                balancer = Balancer(app.targets, app.strategy, active=self.active)
                choose = partial(balancer.order, self.health.book.is_down)
                apps[app.name] = AppRuntime(app, balancer, choose)
        self._apps = apps
        routes: dict[int, AppRuntime] = {}
        for app in config.apps:  # dict.fromkeys: at C speed, 20,000 ports take ~1 ms
            routes.update(dict.fromkeys(app.ports, apps[app.name]))
        self._routes = routes
        # each app's limit of open connections, worked out once per config, not per connection
        self._limits = {
            app.name: app_connection_limit(app, self._total_limit, len(config.apps))
            for app in config.apps
        }
        if config != self.config:
            self._resolver.forget()
        self.config = config
        self._self_loop.ports = config.ports | self._listen_ports
        self.health.apply(config)

    def counts(self) -> Counts:
        """Open connections and targets marked down, for the /status snapshot."""
        book = self.health.book
        targets = {t for app in self.config.apps for t in app.targets}
        return Counts(
            total=self.active_total,
            by_app=dict(self.active_by_app),
            by_target={
                (app.name, str(t)): self.active.get(t, 0)
                for app in self.config.apps
                for t in app.targets
            },
            down={str(t): book.get(t).reason for t in targets if book.is_down(t)},
        )

    def route(self, port: int) -> AppRuntime | None:
        return self._routes.get(port)

    def dispatch(self, client: socket.SocketType, port: int, peer: tuple) -> None:
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
        cfg = app.config
        name = cfg.name
        if cfg.accept_proxy_protocol and not is_trusted(peer, cfg.trusted_proxies):
            self._warn_limit(
                f"untrusted-proxy {name}",
                "app %r: PROXY header from %s refused: not in TrustedProxies; resetting",
                name, client_ip(peer),
            )  # fmt: skip
            self._reject(client, name, "untrusted-proxy")
            return
        app_limit = self._limits[name]
        if self.active_by_app[name] * self._share >= app_limit:
            default = "" if cfg.max_connections is not None else ", a share of max-connections"
            self._warn_limit(
                f"over-limit {name}",
                "app %r: MaxConnections (%d%s) reached; resetting new connections",
                name, app_limit, default,
            )  # fmt: skip
            self._reject(client, name, "over-limit")
            return
        source: tuple[str, str] | None = None  # (app, client IP), if counted per source
        if cfg.max_connections_per_source is not None:
            source = (name, client_ip(peer))
            if self.active_by_source[source] * self._share >= cfg.max_connections_per_source:
                self._warn_limit(
                    f"source-limit {name}",
                    "app %r: MaxConnectionsPerSource (%d) reached for %s; resetting its new "
                    "connections", name, cfg.max_connections_per_source, source[1],
                )  # fmt: skip
                self._reject(client, name, "source-limit")
                return
            self.active_by_source[source] += 1
        if self.slots.value == 0:
            self._warn_limit(
                "", "max-connections (%d) reached; new connections wait in the listen queue",
                self.max_connections,
            )  # fmt: skip
        self.metrics.accepted(name)
        self.active_total += 1
        self.active_by_app[name] += 1
        cid = f"{self._id_prefix}{next(self._ids)}"
        self.engine.start(client, port, peer, app, cid, source)

    def _reject(self, client: socket.SocketType, app: str, reason: str) -> None:
        """Count a connection refused at admission, give back its slot, reset it."""
        self.metrics.rejected(app, reason)
        self.slots.release()
        abort(client)
