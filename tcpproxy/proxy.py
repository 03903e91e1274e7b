"""The serving core of one process, shared by both binaries, composed and reconfigured.

How a connection arrives (a listener per port, or one socket steered by BPF)
is the binary's business; from the engine's accept on, both run this: the
admission (routes, limits, counts: tcpproxy/admission.py), the health of the
targets and its probes, DNS, the self-loop guard, and the engine that serves
every connection (tcpproxy/engine/), which receives each of them and
nothing else. A reload reaches them all through `apply`.

An app's `FirstByteTimeout`: no target is connected before the client sends
its first byte, and a client silent that long is closed, so silent clients
hold no backend connection (tcpproxy/flow.py rule 1).
"""

from __future__ import annotations

from tcpproxy.admission import Admission
from tcpproxy.config import Config, Target
from tcpproxy.engine import Engine
from tcpproxy.health import HealthBook
from tcpproxy.metrics import NullMetrics
from tcpproxy.probes import HealthMonitor
from tcpproxy.resolve import Resolver
from tcpproxy.selfloop import SelfLoopGuard
from tcpproxy.status import Counts
from tcpproxy.warnlimit import WarnLimiter

__all__ = ["Proxy"]


class Proxy:
    """Admission, health, DNS and the engine of one process, for one config at a time.

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

    Every connection is served by `engine`, whose task the caller starts
    (`engine.run`) in a nursery that outlives the listeners, so connections
    drain after their listener stops.
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
        self.metrics = metrics or NullMetrics()
        self._listen_ports = listen_ports
        self._self_loop = SelfLoopGuard(bind=bind)  # names that resolve to the proxy itself
        self.health = HealthMonitor(
            HealthBook(), self._resolver, self.metrics, check=self._self_loop.check
        )
        warn = WarnLimiter()  # for every warning a client can trigger
        self.admission = Admission(
            max_connections=max_connections, share=share, id_prefix=id_prefix,
            metrics=self.metrics, warn=warn, is_down=self.health.book.is_down,
        )  # fmt: skip
        self.config = Config(apps=())
        self._named: tuple[Config, dict[Target, tuple[str, list[str]]]] | None = None
        self.apply(config)
        self.engine = Engine(
            self.admission, resolver=self._resolver, health=self.health, metrics=self.metrics,
            warn=warn, check=self._self_loop.check, use_splice=use_splice,
        )  # fmt: skip

    def apply(self, config: Config) -> None:
        """Make `config` the one new connections use; established ones are never touched."""
        self.admission.apply(config)
        if config != self.config:
            self._resolver.forget()
        self.config = config
        self._self_loop.ports = config.ports | self._listen_ports
        self.health.apply(config)

    @property
    def active_total(self) -> int:
        """Open connections of this process."""
        return self.admission.active_total

    def counts(self) -> Counts:
        """Open connections and targets marked down, for the /status snapshot: walks the
        targets with connections and those down, not every app's (a poll of 1,000 apps
        spent most of its time writing and hashing each app's targets here)."""
        named = self._named
        if named is None or named[0] is not self.config:
            named = self._named = (self.config, _targets_named(self.config))
        of = named[1]
        admission = self.admission
        by_target: dict[tuple[str, str], int] = {}  # the targets with no connection left out
        for target, active in admission.active.items():
            seen = of.get(target) if active else None
            if seen is not None:
                for app in seen[1]:
                    by_target[(app, seen[0])] = active
        book = self.health.book
        return Counts(
            total=admission.active_total,
            by_app=dict(admission.active_by_app),
            by_target=by_target,
            down={of[t][0]: book.get(t).reason for t in book.down_targets() if t in of},
        )


def _targets_named(config: Config) -> dict[Target, tuple[str, list[str]]]:
    """Each target of `config`: its address as text and the apps that have it."""
    named: dict[Target, tuple[str, list[str]]] = {}
    for app in config.apps:
        for target in app.targets:
            named.setdefault(target, (str(target), []))[1].append(app.name)
    return named
