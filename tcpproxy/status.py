"""The /status snapshot: one layout, for a single process and for a supervisor alike.

A single process counts its connections itself (`Proxy.counts`); a
supervisor sums its workers' multiprocess metrics (`counts_from_samples`).
Either way the counts go through `snapshot`, so the JSON has one shape, and
`as_text` renders it for /status.txt. Pure: callers take the counts (on the
event loop) and statusserver.py serves the result.

What the status page adds (rates, ends by reason, connect times, the last
5 minutes) comes from the metrics' totals, sampled every RING_STEP seconds
into a `History` (`totals_from_samples`, both modes alike): a poll reads the
last samples and never walks the metrics itself, and gets an app's entry of the
last poll again while nothing it shows moved.
"""

from __future__ import annotations

import itertools
import math
import time
from array import array
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tcpproxy.config import AppConfig, Config
from tcpproxy.diff import format_ports

__all__ = [
    "RING_SLOTS",
    "RING_STEP",
    "SAMPLED_METRICS",
    "Counts",
    "History",
    "Layout",
    "Loaded",
    "Totals",
    "as_text",
    "counts_from_samples",
    "snapshot",
    "totals_from_samples",
]

ACTIVE_METRIC = "tcpproxy_connections_active"  # gauge per app and target (metrics.py)
UP_METRIC = "tcpproxy_target_up"  # gauge per target: 1 up, 0 marked down (metrics.py)
ACCEPTED_METRIC = "tcpproxy_connections_accepted_total"  # counter per app
ENDED_METRIC = "tcpproxy_connections_ended_total"  # counter per app, target and reason
BYTES_METRIC = "tcpproxy_bytes_total"  # counter per app, target and direction
CONNECT_BUCKET_METRIC = "tcpproxy_connect_seconds_bucket"  # histogram per target
STEERED_METRIC = "tcpproxy_bpf_steered_ports"  # gauge (bpfproxy)
# what the sampler reads (a registry restricted to them skips the gauge per target)
SAMPLED_METRICS = (
    ACCEPTED_METRIC, ENDED_METRIC, BYTES_METRIC, CONNECT_BUCKET_METRIC, STEERED_METRIC,
)  # fmt: skip

RING_STEP = 5.0  # seconds between two samples of the totals
RING_SLOTS = 61  # samples kept: 5 minutes of steps, plus the one they start from
RATE_WINDOW = 10.0  # seconds the rates on the page are averaged over
CONNECT_WINDOW = 60.0  # seconds: connect times are of the last 1-2 windows' connects
STILL_SAMPLES = 4  # an app's totals the same this many samples: its rates (over the last 2-3
# samples) are what they were, so its entry may stay (`History.entries`)
# memory of the ring: RING_SLOTS x 3 doubles (accepted, bytes up, bytes down) = 1.5 KB per
# app (1.5 MB for 1,000 apps), plus the times; per target two baselines of the connect
# histogram (2 x 14 doubles)


@dataclass(frozen=True)
class Loaded:
    """The config in force, as the reloader knows it."""

    path: str
    digest: str
    loaded_at: float  # seconds since the epoch
    last_reload: str  # the last reload's outcome


@dataclass(frozen=True)
class Counts:
    """Open connections and targets marked down, however they were counted."""

    total: int = 0
    by_app: Mapping[str, int] = field(default_factory=dict)
    by_target: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (app, target)
    down: Mapping[str, str] = field(default_factory=dict)  # target -> why ("" if unknown)


def snapshot(
    binary: str, pid: int, loaded: Loaded, config: Config, counts: Counts,
    workers: int | None = None, rejected: Mapping[str, Mapping[str, object]] | None = None,
    build: str | None = None, history: History | None = None,
    with_history: bool | Collection[str] = False,
    extra: Mapping[str, Any] | None = None, wall: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The /status document; `workers`: the supervisor's count (None in a single process);
    `rejected`: apps a fleet's source refused (by name: key, revision, reason); `build`:
    which build runs (`build_info.describe()`: "compiled (mypyc X.Y)", "interpreted");
    `history`: the sampled totals, for rates, ends and connect times per app and target
    (and the last 5 minutes of every app if `with_history` is True, or of the apps it
    names); `extra`: more top-level fields
    (version, uptime, fleet); `wall`: now (epoch seconds; None: the clock's)."""
    status: dict[str, Any] = {"binary": binary, "pid": pid}
    if build is not None:
        status["build"] = build
    if extra:
        status.update(extra)
    if workers is not None:
        status["workers"] = workers
    status["config"] = {
        "path": loaded.path,
        "hash": loaded.digest,
        "loaded": _iso(loaded.loaded_at),
    }
    status["last_reload"] = loaded.last_reload
    if rejected:
        status["rejected"] = {name: dict(why) for name, why in sorted(rejected.items())}
    status["active_connections"] = counts.total
    if history is not None:
        history.observe(counts.down, time.time() if wall is None else wall)
        if history.steered is not None:
            status["steered_ports"] = history.steered
    if history is not None:
        layout = history.layout(config)
        status["apps"] = history.entries(layout, counts, with_history)
    else:
        layout = Layout(config)
        status["apps"] = [_entry(head, addresses, counts) for head, addresses in layout.apps]
    if layout.routed_by_name:
        status["routed_by_name"] = layout.routed_by_name
    return status


def _entry(head: dict[str, Any], addresses: list[str], counts: Counts) -> dict[str, Any]:
    """An app's /status entry as the counts tell it (`head`: its part of the Layout)."""
    name, down = head["name"], counts.down
    return {
        **head,
        "active": counts.by_app.get(name, 0),
        "targets": [
            {
                "address": address,
                "state": "down" if address in down else "up",
                "reason": down.get(address, ""),
                "active": counts.by_target.get((name, address), 0),
            }
            for address in addresses
        ],
    }


class Layout:
    """What a snapshot takes from the config alone, worked out once per config (a
    poll of 1,000 apps x 20 ports would spend most of its time here otherwise)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # per app: its first fields (name, ports, hostnames), its targets' addresses
        self.apps: list[tuple[dict[str, Any], list[str]]] = [
            (
                {
                    "name": app.name,
                    "ports": format_ports(app.ports),
                    **({"hostnames": list(app.hostnames)} if app.hostnames else {}),
                },
                [str(t) for t in app.targets],
            )
            for app in config.apps
        ]
        self.routed_by_name = by_name(config)


def by_name(config: Config) -> list[dict[str, Any]]:
    """The ports told apart by name (TLS SNI, HTTP Host): each with its names' apps and
    its default app (None: unknown names are reset), ports of the same apps together."""
    groups: dict[tuple[str, ...], list[int]] = {}
    apps_of: dict[tuple[str, ...], list[AppConfig]] = {}
    for port, apps in sorted(config.port_apps().items()):
        if len(apps) == 1 and not apps[0].hostnames:
            continue  # one app's own port: not inspected
        key = tuple(app.name for app in apps)
        groups.setdefault(key, []).append(port)
        apps_of[key] = apps
    return [
        {
            "ports": format_ports(ports),
            "names": {name: app.name for app in apps_of[key] for name in app.hostnames},
            "default": next((app.name for app in apps_of[key] if not app.hostnames), None),
        }
        for key, ports in groups.items()
    ]


def counts_from_samples(samples: Iterable[Any]) -> Counts:
    """Counts from prometheus-client samples (`.name`, `.labels`, `.value`) summed
    over workers: connections add up; a target is down if any worker marked it."""
    by_target: dict[tuple[str, str], float] = {}
    up: dict[str, float] = {}
    for sample in samples:
        if sample.name == ACTIVE_METRIC:
            key = (sample.labels["app"], sample.labels["target"])
            by_target[key] = by_target.get(key, 0) + sample.value
        elif sample.name == UP_METRIC:
            target = sample.labels["target"]
            up[target] = min(up.get(target, 1.0), sample.value)
    by_app: dict[str, float] = {}
    for (app, _), value in by_target.items():
        by_app[app] = by_app.get(app, 0) + value
    return Counts(
        total=int(sum(by_target.values())),
        by_app={app: int(value) for app, value in by_app.items()},
        by_target={key: int(value) for key, value in by_target.items()},
        down={target: "" for target, value in up.items() if not value},
    )


@dataclass
class Totals:
    """The metrics' counters at one moment, summed over workers."""

    accepted: dict[str, float] = field(default_factory=dict)  # app ->
    up: dict[str, float] = field(default_factory=dict)  # app -> bytes client to target
    down: dict[str, float] = field(default_factory=dict)  # app -> bytes target to client
    ended: dict[str, dict[str, float]] = field(default_factory=dict)  # app -> reason ->
    by_target: dict[tuple[str, str], float] = field(default_factory=dict)  # ended, (app, target)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # target -> le -> n
    steered: float | None = None  # bpfproxy's ports in its map


def totals_from_samples(samples: Iterable[Any]) -> Totals:
    """Totals from prometheus-client samples (`.name`, `.labels`, `.value`), summed."""
    t = Totals()
    for sample in samples:
        name, labels, value = sample.name, sample.labels, sample.value
        if name == ACCEPTED_METRIC:
            t.accepted[labels["app"]] = t.accepted.get(labels["app"], 0.0) + value
        elif name == ENDED_METRIC:
            app, target = labels["app"], labels["target"]
            reasons = t.ended.setdefault(app, {})
            reasons[labels["reason"]] = reasons.get(labels["reason"], 0.0) + value
            t.by_target[(app, target)] = t.by_target.get((app, target), 0.0) + value
        elif name == BYTES_METRIC:
            way = t.up if labels["direction"] == "up" else t.down
            way[labels["app"]] = way.get(labels["app"], 0.0) + value
        elif name == CONNECT_BUCKET_METRIC:
            le = float(labels["le"])
            buckets = t.buckets.setdefault(labels["target"], {})
            buckets[le] = buckets.get(le, 0.0) + value
        elif name == STEERED_METRIC:
            t.steered = max(t.steered or 0.0, value)
    return t


class _TargetSeen:
    """A target's state as last seen, since when, and its last error; the times as
    the page shows them, written once per change, not per poll."""

    __slots__ = ("error", "error_at_iso", "since_iso", "state")

    def __init__(self, state: str, since: float, error: str = "", error_at: float = 0.0) -> None:
        self.state, self.since_iso = state, _iso(since)
        self.error, self.error_at_iso = error, _iso(error_at) if error else ""

    def moved(self, state: str, wall: float) -> None:
        self.state, self.since_iso = state, _iso(wall)

    def failed(self, error: str, wall: float) -> None:
        self.error, self.error_at_iso = error, _iso(wall)


class History:
    """The totals sampled every RING_STEP seconds, RING_SLOTS kept (a fixed-size ring per
    app, dropped with the app), and each target's state as last seen and since when.

    Times are passed in (`now`: monotonic, `wall`: epoch seconds, when it started).
    """

    def __init__(self, now: float, wall: float) -> None:
        self._wall_start = wall
        self._times = array("d", [math.nan] * RING_SLOTS)  # monotonic time of each slot
        self._apps: dict[str, array[float]] = {}  # app -> 3 x RING_SLOTS cumulative values
        self._next = 0  # the slot written next
        self._latest: Totals = Totals()
        self._baselines: tuple[Totals, Totals] = (Totals(), Totals())  # for connect times
        self._baseline_at = now
        self._targets: dict[str, _TargetSeen] = {}
        self.steered: int | None = None
        self._layout: Layout | None = None
        # what a sample settles, worked out at the first poll after it, for every poll
        # until the next: per app its rates and history, per target its connect times
        self._rates_of: dict[str, dict[str, float]] = {}
        self._ended_of: dict[str, dict[str, int]] = {}
        self._history_of: dict[str, dict[str, Any]] = {}
        self._connect_of: dict[str, dict[str, float | None]] = {}
        self._order: list[int] | None = None  # the slots written, oldest first
        # each app's last entry, and what it was made from (see `entries`)
        self._entries: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._generation = 0  # samples recorded
        self._moved: dict[str, int] = {}  # app -> the sample its numbers last moved at
        self._seen_generation = 0  # moves with a target's state or last error
        self._baseline_generation = 0  # moves with the connect times' baseline

    def layout(self, config: Config) -> Layout:
        """The config's `Layout`, kept while `config` is the one in force."""
        if self._layout is None or self._layout.config is not config:
            self._layout = Layout(config)
            self._entries = {}
        return self._layout

    def entries(
        self, layout: Layout, counts: Counts, with_history: bool | Collection[str]
    ) -> list[dict[str, Any]]:
        """Every app's /status entry, described (`describe`). An entry whose inputs did
        not move since the last call (its numbers in the samples, its counts, the targets'
        states, its charts if asked) is the same object as then, so a renderer may reuse
        what it wrote for it (statusserver.py): with 1,000 apps, most of a poll. Entries
        are not to be changed by their readers."""
        by_app, by_target, down = counts.by_app, counts.by_target, counts.down
        kept, moved = self._entries, self._moved
        shared = (self._seen_generation, self._baseline_generation)
        every = with_history is True
        some = with_history if not isinstance(with_history, bool) else ()
        result = []
        for head, addresses in layout.apps:
            name = head["name"]
            charts = self._generation if every or name in some else -1  # move every sample
            key = (
                shared, charts, moved.get(name), by_app.get(name, 0),
                *[(by_target.get((name, a), 0), down.get(a)) for a in addresses],
            )  # fmt: skip
            seen = kept.get(name)
            if seen is not None and seen[0] == key:
                result.append(seen[1])
                continue
            entry = _entry(head, addresses, counts)
            self.describe(entry, with_history)
            kept[name] = (key, entry)
            result.append(entry)
        return result

    def record(self, totals: Totals, now: float, config: Config) -> None:
        """A new sample of the totals; the apps and targets not in `config` are forgotten."""
        slot = self._next
        self._next = (slot + 1) % RING_SLOTS
        self._times[slot] = now
        self._generation += 1
        previous, moved = self._latest, self._moved
        names = {app.name for app in config.apps}
        for gone in self._apps.keys() - names:
            del self._apps[gone]
            moved.pop(gone, None)
        for name in names:
            ring = self._apps.get(name)
            if ring is None:
                ring = self._apps[name] = array("d", [math.nan] * (3 * RING_SLOTS))
            ring[slot] = totals.accepted.get(name, 0.0)
            ring[RING_SLOTS + slot] = totals.up.get(name, 0.0)
            ring[2 * RING_SLOTS + slot] = totals.down.get(name, 0.0)
            if not _still(ring, slot) or totals.ended.get(name) != previous.ended.get(name):
                moved[name] = self._generation
        # connect times: of the targets whose histogram moved (any app's connects)
        busy = {t for t, buckets in totals.buckets.items() if previous.buckets.get(t) != buckets}
        if busy:
            for app in config.apps:
                if any(str(t) in busy for t in app.targets):
                    moved[app.name] = self._generation
        if now - self._baseline_at >= CONNECT_WINDOW:
            self._baselines = (self._baselines[1], totals)
            self._baseline_at = now
            self._baseline_generation += 1
        targets = {str(t) for app in config.apps for t in app.targets}
        for gone in self._targets.keys() - targets:
            del self._targets[gone]
        self._latest = totals
        self.steered = int(totals.steered) if totals.steered is not None else None
        self._rates_of, self._history_of, self._connect_of = {}, {}, {}
        self._ended_of = {}
        self._order = None

    def observe(self, down: Mapping[str, str], wall: float) -> None:
        """The targets' states at `wall` (`down`: target -> why), to know since when."""
        for target, seen in self._targets.items():
            state = "down" if target in down else "up"
            if state != seen.state:
                seen.moved(state, wall)
                self._seen_generation += 1
            if state == "down" and down[target] and down[target] != seen.error:
                seen.failed(down[target], wall)
                self._seen_generation += 1
        for target, why in down.items():
            if target not in self._targets:
                self._targets[target] = _TargetSeen("down", wall, why, wall if why else 0.0)
                self._seen_generation += 1

    def describe(self, app: dict[str, Any], with_history: bool | Collection[str]) -> None:
        """Add the rates, ends, and per target since / last error / total / connect
        times to `app`, a /status entry."""
        name = app["name"]
        latest = self._latest
        rates = self._rates_of.get(name)
        if rates is None:
            rates = self._rates_of[name] = self._rates(self._apps.get(name))
        app["rates"] = rates
        ended = self._ended_of.get(name)
        if ended is None:
            reasons = sorted(latest.ended.get(name, {}).items())
            ended = self._ended_of[name] = {k: int(v) for k, v in reasons}
        app["ended"] = ended
        if with_history is True or (not isinstance(with_history, bool) and name in with_history):
            past = self._history_of.get(name)
            if past is None:
                past = self._history_of[name] = self._history(self._apps.get(name))
            app["history"] = past
        for target in app["targets"]:
            address = target["address"]
            seen = self._targets.get(address)
            if seen is None:
                seen = self._targets[address] = _TargetSeen(target["state"], self._wall_start)
            target["since"] = seen.since_iso
            target["last_error"] = seen.error
            target["last_error_at"] = seen.error_at_iso
            target["total"] = int(latest.by_target.get((name, address), 0.0)) + target["active"]
            connect = self._connect_of.get(address)
            if connect is None:
                connect = self._connect_of[address] = self._connect_times(address)
            target["connect"] = connect

    def _ordered(self) -> list[int]:
        """The written slots, oldest first."""
        if self._order is None:
            order = [(self._next + i) % RING_SLOTS for i in range(RING_SLOTS)]
            self._order = [i for i in order if not math.isnan(self._times[i])]
        return self._order

    def _rates(self, ring: array[float] | None) -> dict[str, float]:
        slots = [i for i in self._ordered() if ring is not None and not math.isnan(ring[i])]
        if ring is None or len(slots) < 2:
            return {"conn": 0.0, "up": 0.0, "down": 0.0}
        last = slots[-1]
        first = next((i for i in reversed(slots[:-1])
                      if self._times[last] - self._times[i] >= RATE_WINDOW), slots[0])  # fmt: skip
        span = self._times[last] - self._times[first]
        rates = {}
        for k, key in enumerate(("conn", "up", "down")):
            a, b = ring[k * RING_SLOTS + first], ring[k * RING_SLOTS + last]
            rates[key] = 0.0 if math.isnan(a) or span <= 0 else round((b - a) / span, 2)
        return rates

    def _history(self, ring: array[float] | None) -> dict[str, Any]:
        """Per step: new connections per second and bytes per second (both ways)."""
        slots = self._ordered()
        conn: list[float | None] = []
        total: list[float | None] = []
        for a, b in itertools.pairwise(slots):
            span = self._times[b] - self._times[a]
            if ring is None or math.isnan(ring[a]) or span <= 0:
                conn.append(None)
                total.append(None)
                continue
            conn.append(round((ring[b] - ring[a]) / span, 2))
            moved = sum(ring[k * RING_SLOTS + b] - ring[k * RING_SLOTS + a] for k in (1, 2))
            total.append(round(moved / span, 1))
        return {"step": RING_STEP, "conn": conn, "bytes": total}

    def _connect_times(self, target: str) -> dict[str, float | None]:
        """Median and p99 of the connects since the older baseline (1-2 windows ago), as
        the upper bound of the histogram bucket they fall in (seconds); None if none."""
        now = self._latest.buckets.get(target, {})
        then = self._baselines[0].buckets.get(target, {})
        counts = sorted((le, n - then.get(le, 0.0)) for le, n in now.items())
        total = counts[-1][1] if counts else 0.0
        result: dict[str, float | None] = {"median": None, "p99": None, "count": int(total)}
        if total <= 0:
            return result
        for key, q in (("median", 0.5), ("p99", 0.99)):
            le = next(le for le, n in counts if n >= q * total)
            result[key] = le if math.isfinite(le) else None
        return result


def _still(ring: array[float], slot: int) -> bool:
    """Whether an app's three totals in `ring` are the same in the last STILL_SAMPLES
    slots up to `slot` (a slot not yet written is NaN: never the same)."""
    for base in (0, RING_SLOTS, 2 * RING_SLOTS):
        value = ring[base + slot]
        for back in range(1, STILL_SAMPLES):
            if ring[base + (slot - back) % RING_SLOTS] != value:
                return False
    return True


def as_text(status: dict[str, Any]) -> str:
    """The snapshot for people: /status.txt."""
    lines = [
        f"{status['binary']}: {status.get('workers', 1)} process(es), "
        f"{status['active_connections']} active connections"
        + (f", {status['build']} build" if "build" in status else ""),
        f"config {status['config']['hash']} loaded {status['config']['loaded']}, "
        f"last reload: {status['last_reload']}",
    ]
    fleet = status.get("fleet")
    if fleet is not None:
        lost = f", etcd lost since {fleet['lost_since']}" if fleet.get("lost_since") else ""
        lines.append(f"fleet node {fleet['node']}: revision {fleet['revision']} applied, "
                     f"{fleet['seen']} seen{lost}")  # fmt: skip
    for app in status["apps"]:
        names = f", hostnames {' '.join(app['hostnames'])}" if "hostnames" in app else ""
        lines.append(f"app {app['name']}: ports {app['ports']}{names}, {app['active']} active")
        for target in app["targets"]:
            lines.append(f"  {target['address']}: {target['state']}, {target['active']} active")
    for route in status.get("routed_by_name", []):
        default = route["default"] or "none (reset)"
        lines.append(f"ports {route['ports']}: by name, {len(route['names'])} names, "
                     f"default {default}")  # fmt: skip
    for name, why in status.get("rejected", {}).items():
        where = f"{why['key']} at revision {why['revision']}"
        lines.append(f"rejected {name}: {where}: {why['reason']}")
    return "\n".join(lines) + "\n"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))
