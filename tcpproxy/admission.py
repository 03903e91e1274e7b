"""Admission: which app a connection is for, whether it may be served, and what it holds.

Pure bookkeeping (no I/O, no trio): the engine asks, then acts on the
answer. `Admission` owns the routes (port -> `Router`), the limits and
the counts. At accept, `arrive()` answers with a `Ticket` (a slot) or the
reason of a refusal; once the connection is routed (its flow's ROUTE),
`admit_to()` admits it to its app or says why not; the ticket's `release()`
is the one place that gives back what a connection holds. `admit()` does
both at once (a port one app owns).

Rules:
1. Route: the connection's local port picks its router at accept time (a
   reload that lands later cannot strand it), and the router its app. A port
   one app owns routes at once, without a byte (`Router.needs_bytes` False);
   a router of apps sharing a port would be told the client's first bytes.
   A port no app has any more (steered or queued before a reload removed
   it) is refused: "no-route", closed. What is read before routing (the
   PROXY header, the first byte: AcceptProxyProtocol, TrustedProxies,
   FirstByteTimeout) follows the port's settings (`Router.preamble`), on
   which the apps sharing a port must agree.
2. Slots: at most `max_connections` connections of this process at once.
   The engine asks `has_slot()` before each accept: at the limit it stops
   accepting and new connections wait in the kernel's listen queue (as
   HAProxy's maxconn does) instead of failing; they are accepted as slots
   free up. An admitted connection holds one slot.
3. The port's `TrustedProxies` (with AcceptProxyProtocol): a peer outside them
   is refused at accept, before its header is read ("untrusted-proxy"), so nobody who
   can reach the port directly can claim any client address.
4. Once routed, an app's `MaxConnections` (without one: a share of the whole
   proxy's limit, config.app_connection_limit) and its `MaxConnectionsPerSource`
   (per client IP, the peer's at accept): a connection over either is refused
   ("over-limit", "source-limit"), and gives its slot back. One listener may
   serve many apps under bpfproxy, so there is no per-app queue to hold it in.
   With `share` worker processes, each enforces its part, rounded up.
5. A refusal of rules 3-4 is reset by the engine; each kind is warned about
   at most once per LIMIT_LOG_INTERVAL per app (warnlimit.WarnLimiter).
6. One owner gives back: an admitted connection's slot, its place in the
   counts (in total, per app, per source) and its claim on a target (the
   per-target counts least-connections reads, moved by `Ticket.claim` on
   each connect) are given back by `Ticket.release()`, once, whatever path
   the connection ended on; a second call changes nothing.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from tcpproxy.balance import Balancer
from tcpproxy.config import AppConfig, Config, Network, Target, app_connection_limit
from tcpproxy.metrics import NullMetrics
from tcpproxy.warnlimit import WarnLimiter

__all__ = [
    "CLIENT_CLOSED",
    "INSPECT_TIMEOUT",
    "MALFORMED",
    "NO_ROUTE",
    "OVERSIZE",
    "OVER_LIMIT",
    "SOURCE_LIMIT",
    "UNTRUSTED_PROXY",
    "Admission",
    "AppRuntime",
    "Router",
    "Ticket",
    "client_ip",
    "format_peer",
    "is_trusted",
]

log = logging.getLogger("tcpproxy")

# Why `admit` refused, as the metrics label it (tcpproxy_connections_rejected_total)
NO_ROUTE = "no-route"  # rule 1: closed
UNTRUSTED_PROXY = "untrusted-proxy"  # rule 3: reset
OVER_LIMIT = "over-limit"  # rule 4: reset
SOURCE_LIMIT = "source-limit"  # rule 4: reset
# rule 1, a port told apart by name (Hostnames): the client could not be routed
INSPECT_TIMEOUT = "inspect-timeout"  # part of a hello or request head, then silence
CLIENT_CLOSED = "client-closed"  # it closed (or failed) before its name was known
OVERSIZE = "oversize"  # a hello or request head over the sniffer's limit
MALFORMED = "malformed"  # not a well-formed hello or request head


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
    """An address as logged: host:port, [host]:port for IPv6, v4-mapped unmapped."""
    host, port = peer[0], peer[1]
    if host.startswith("::ffff:") and "." in host:  # IPv4 client on a dual-stack socket
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Router:
    """Which app a connection on one port is for (rule 1).

    A port one app without Hostnames owns routes at once, from no byte
    (`needs_bytes` False). Otherwise the engine reads the name the client asks
    for (TLS SNI, HTTP Host: tcpproxy.sniff) and `choose`s by it: the app
    with that name exactly, else the one with a matching ``*.`` wildcard
    (exact beats wildcard), else the port's default (its app without
    Hostnames), else None: no app ("no-route").
    """

    __slots__ = ("_exact", "_wild", "app", "apps", "default", "needs_bytes")

    def __init__(self, apps: Sequence[AppRuntime]) -> None:
        self.apps = tuple(apps)
        defaults = [app for app in apps if not app.config.hostnames]
        self.default = defaults[0] if defaults else None  # config: one at most
        # the port's settings and the name in log lines before routing: its default's
        self.app = self.default if self.default is not None else apps[0]
        self.needs_bytes = len(apps) > 1 or self.default is None
        self._exact: dict[str, AppRuntime] = {}
        self._wild: dict[str, AppRuntime] = {}  # "*.example.com" under "example.com"
        for app in apps:
            for name in app.config.hostnames:
                if name.startswith("*."):
                    self._wild[name[2:]] = app
                else:
                    self._exact[name] = app

    @property
    def preamble(self) -> AppConfig:
        """The settings of what is read before routing: the port's apps agree on them."""
        return self.app.config

    @property
    def names(self) -> list[str]:
        """The names this port tells apart, exact ones first, for /status."""
        return sorted(self._exact) + sorted(f"*.{base}" for base in self._wild)

    def choose(self, name: str | None = None) -> AppRuntime | None:
        """The app for a client that asked for `name` (normalized: lower case, no
        trailing dot; None: it named none), or None if the port has none for it."""
        if name is not None and (self._exact or self._wild):
            app = self._exact.get(name)
            if app is not None:
                return app
            dot = name.find(".")
            if dot > 0:  # a wildcard stands for exactly one label: "a.b.x" is not "*.x"'s
                app = self._wild.get(name[dot + 1 :])
                if app is not None:
                    return app
        return self.default


def _never_down(target: Target) -> bool:
    return False


class Ticket:
    """What one connection holds: a slot, and once admitted its places in the counts.

    `router` and `cid` (its id, for every log line about it) are the
    connection's for its whole life; `app` is its app once admitted to it
    (`Admission.admit_to`), None before. `target` is the target it is counted
    against (None before its first connect).
    """

    __slots__ = ("_admission", "app", "cid", "peer", "router", "source", "target")

    def __init__(self, admission: Admission, router: Router, cid: str, peer: tuple) -> None:
        self._admission: Admission | None = admission  # None once released
        self.router = router
        self.cid = cid
        self.peer = peer  # as accepted (a PROXY header does not change whom it counts as)
        self.app: AppRuntime | None = None
        self.source: tuple[str, str] | None = None  # (app, client IP), if counted per source
        self.target: Target | None = None

    def claim(self, target: Target) -> None:
        """The connection now tries (or uses) `target`: it counts there from now on.

        Called at each connect, from the choice on (so a burst still connecting
        spreads under least-connections: balance rule 3), and on each failover.
        """
        old = self.target
        # identity first: a retry of the same target, and a Target compares in Python
        if target is old or self._admission is None:
            return
        active = self._admission.active
        if old is not None:
            if target == old:
                return
            _uncount(active, old)
        active[target] = active.get(target, 0) + 1
        self.target = target

    def release(self) -> None:
        """Give back the slot and every count (rule 6); a second call changes nothing."""
        admission = self._admission
        if admission is None:
            return
        self._admission = None
        admission.active_total -= 1
        admission._free += 1
        if self.app is None:  # never admitted to an app: the slot was all
            return
        target = self.target
        if target is not None:  # inline, as below: this runs for every connection
            counts = admission.active
            left = counts[target] - 1
            if left:
                counts[target] = left
            else:
                del counts[target]
        name = self.app.config.name
        by_app = admission.active_by_app
        left = by_app[name] - 1
        if left:
            by_app[name] = left
        else:
            del by_app[name]
        if self.source is not None:
            _uncount(admission.active_by_source, self.source)


def _uncount(counts: Counter, key: object) -> None:
    """One fewer for `key`; a count that reaches zero is deleted (bounded: only keys
    with open connections are kept)."""
    left = counts[key] - 1
    if left > 0:
        counts[key] = left
    else:
        del counts[key]


class Admission:
    """The routes, limits and counts of one process (rules 1-6).

    Args:
      max_connections: this process's limit of open connections (its slots).
      share: how many worker processes share the apps' MaxConnections (each
        enforces its part, rounded up).
      id_prefix: starts every connection id (a worker's "w1-"), so ids are
        unique across the workers' logs.
      metrics: counts admissions and refusals.
      warn: the process's limiter of client-triggered warnings.
      is_down: the health book's verdict, which orders each app's targets.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        share: int = 1,
        id_prefix: str = "",
        metrics: NullMetrics | None = None,
        warn: WarnLimiter | None = None,
        is_down: Callable[[Target], bool] = _never_down,
    ) -> None:
        self.max_connections = max_connections
        self._free = max_connections  # slots not held by a connection
        self._share = share
        # the whole proxy's limit (every worker's part): an app without MaxConnections
        # gets a share of it (config.app_connection_limit)
        self._total_limit = max_connections * share
        self._ids = itertools.count(1)  # connection ids, for every log line about one
        self._id_prefix = id_prefix
        self._metrics = metrics or NullMetrics()
        self._warn = warn or WarnLimiter()
        self._is_down = is_down
        # open connections per target, each counted from its choice (Ticket.claim)
        self.active: Counter[Target] = Counter()
        self.active_by_app: Counter[str] = Counter()
        self.active_by_source: Counter[tuple[str, str]] = Counter()  # (app, client IP)
        self.active_total = 0
        self._apps: dict[str, AppRuntime] = {}
        self._routes: dict[int, Router] = {}
        self._routers: dict[tuple[str, ...], Router] = {}  # by the names of its apps
        self._limits: dict[str, int] = {}

    def apply(self, config: Config) -> None:
        """Route new connections by `config` from now on.

        Apps whose config is unchanged keep their runtime (and round-robin
        position) and router; connections already admitted keep theirs and
        their counts.
        """
        apps: dict[str, AppRuntime] = {}
        for app in config.apps:
            old = self._apps.get(app.name)
            if old is not None and (old.config is app or old.config == app):
                apps[app.name] = old
            else:
                balancer = Balancer(app.targets, app.strategy, active=self.active)
                apps[app.name] = AppRuntime(app, balancer, partial(balancer.order, self._is_down))
        self._apps = apps
        # a router per set of apps sharing ports: per app, for ports one app owns
        routers: dict[tuple[str, ...], Router] = {}
        routes: dict[int, Router] = {}
        shared: dict[int, list[str]] = {}
        for app in config.apps:  # dict.fromkeys: at C speed, 20,000 ports take ~1 ms
            for port in routes.keys() & app.ports:  # shared (by Hostnames): routed below
                if port not in shared:
                    shared[port] = [routes[port].app.config.name]
                shared[port].append(app.name)
            routers[(app.name,)] = router = self._router((apps[app.name],))
            routes.update(dict.fromkeys(app.ports, router))
        for port, names in shared.items():
            key = tuple(names)
            found = routers.get(key)
            if found is None:
                routers[key] = found = self._router(tuple(apps[name] for name in names))
            routes[port] = found
        self._routers = routers
        self._routes = routes
        # each app's limit of open connections, worked out once per config, not per connection
        self._limits = {
            app.name: app_connection_limit(app, self._total_limit, len(config.apps))
            for app in config.apps
        }

    def _router(self, apps: tuple[AppRuntime, ...]) -> Router:
        """The router of `apps`: the one in force if they are unchanged."""
        old = self._routers.get(tuple(app.config.name for app in apps))
        if old is not None and old.apps == apps:
            return old
        return Router(apps)

    def route(self, port: int) -> Router | None:
        return self._routes.get(port)

    def has_slot(self) -> bool:
        """Whether a connection accepted now could be admitted (rule 2)."""
        return self._free > 0

    @property
    def free_slots(self) -> int:
        """Slots no connection holds (`max_connections` when none is open)."""
        return self._free

    def admit(self, port: int, peer: tuple) -> Ticket | str:
        """`arrive`, then `admit_to` the app the port's router chooses from no byte
        (a port one app owns): a ticket admitted to its app, or why not (given back)."""
        ticket = self.arrive(port, peer)
        if isinstance(ticket, str):
            return ticket
        app = ticket.router.choose()
        refused = self.admit_to(ticket, app) if app is not None else self.no_route(ticket, port)
        if refused:
            ticket.release()
            return refused
        return ticket

    def arrive(self, port: int, peer: tuple) -> Ticket | str:
        """A connection accepted on `port` from `peer`: its ticket (a slot, its router),
        or why it is refused (NO_ROUTE, UNTRUSTED_PROXY; counted and warned about).

        Takes a slot: only called when `has_slot()`.
        """
        assert self._free > 0, "arrive() without a slot"
        router = self._routes.get(port)
        if router is None:  # steered or queued before its port was removed
            cid = f"{self._id_prefix}{next(self._ids)}"
            log.debug("conn %s client=%s port=%d: no app for this port; closing",
                      cid, format_peer(peer), port, extra={"conn": cid})  # fmt: skip
            self._metrics.rejected("-", NO_ROUTE)
            return NO_ROUTE
        cfg = router.preamble
        if cfg.accept_proxy_protocol and not is_trusted(peer, cfg.trusted_proxies):
            name = cfg.name
            self._warn(
                f"untrusted-proxy {name}",
                "app %r: PROXY header from %s refused: not in TrustedProxies; resetting",
                name, client_ip(peer),
            )  # fmt: skip
            self._metrics.rejected(name, UNTRUSTED_PROXY)
            return UNTRUSTED_PROXY
        self._free -= 1
        self.active_total += 1
        return Ticket(self, router, f"{self._id_prefix}{next(self._ids)}", peer)

    def no_route(self, ticket: Ticket, port: int, name: str = "") -> str:
        """The router found no app for the connection (`name`: the one it asked for):
        NO_ROUTE, counted and warned about (rule 1)."""
        cid = ticket.cid
        asked = f"name {name!r}" if name else "no name"
        self._warn(
            f"no-route {port}",
            "conn %s client=%s port=%d: no app for %s, and the port has no default app "
            "(one without Hostnames); resetting", cid, format_peer(ticket.peer), port, asked,
            extra={"conn": cid},
        )  # fmt: skip
        self._metrics.rejected("-", NO_ROUTE)
        return NO_ROUTE

    def not_inspected(self, ticket: Ticket, port: int, reason: str, why: str) -> None:
        """The client's name could not be read (`reason`: INSPECT_TIMEOUT, CLIENT_CLOSED,
        OVERSIZE, MALFORMED; `why`, in words): counted, warned about (rule 1)."""
        cid = ticket.cid
        self._warn(
            f"{reason} {port}", "conn %s client=%s port=%d: %s: %s; closing", cid,
            format_peer(ticket.peer), port, reason, why, extra={"conn": cid},
        )  # fmt: skip
        self._metrics.rejected("-", reason)

    def admit_to(self, ticket: Ticket, app: AppRuntime) -> str:
        """Admit the connection of `ticket` to `app` (rule 4): "" if admitted, else why
        not (OVER_LIMIT, SOURCE_LIMIT; counted and warned about; the caller ends it,
        its ticket's release gives the slot back)."""
        peer = ticket.peer
        cfg = app.config
        name = cfg.name
        app_limit = self._limits.get(name)
        if app_limit is None:  # removed by a reload while the connection was inspected
            app_limit = app_connection_limit(cfg, self._total_limit, max(len(self._apps), 1))
        if self.active_by_app[name] * self._share >= app_limit:
            default = "" if cfg.max_connections is not None else ", a share of max-connections"
            self._warn(
                f"over-limit {name}",
                "app %r: MaxConnections (%d%s) reached; resetting new connections",
                name, app_limit, default,
            )  # fmt: skip
            self._metrics.rejected(name, OVER_LIMIT)
            return OVER_LIMIT
        source: tuple[str, str] | None = None  # (app, client IP), if counted per source
        if cfg.max_connections_per_source is not None:
            source = (name, client_ip(peer))
            if self.active_by_source[source] * self._share >= cfg.max_connections_per_source:
                self._warn(
                    f"source-limit {name}",
                    "app %r: MaxConnectionsPerSource (%d) reached for %s; resetting its new "
                    "connections", name, cfg.max_connections_per_source, source[1],
                )  # fmt: skip
                self._metrics.rejected(name, SOURCE_LIMIT)
                return SOURCE_LIMIT
            self.active_by_source[source] += 1
        if not self._free:
            self._warn(
                "", "max-connections (%d) reached; new connections wait in the listen queue",
                self.max_connections,
            )  # fmt: skip
        self._metrics.accepted(name)
        self.active_by_app[name] += 1
        ticket.app, ticket.source = app, source
        return ""
