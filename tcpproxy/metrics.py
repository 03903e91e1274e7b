"""Prometheus metrics, served with /status over HTTP (`--metrics ADDRESS:PORT`).

prometheus-client does the exposition; this module names the metrics and
keeps their labels bounded: app names, target addresses and end reasons come
from the config and a fixed list, never from clients.

With workers, each worker records into prometheus-client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor) and the supervisor
serves the sum; a worker that dies is marked dead so its gauges drop out, and
its counters move to an archive file so no file per dead pid piles up.
Those files cannot drop a label, so a config hash no longer loaded is set
to 0 there and left out of what the supervisor serves. Why a worker marked a
target down is no label (its words are unbounded): each worker keeps it in a
small file of its own beside them (REASONS_FILE), for the supervisor's /status.

tcpproxy.statusserver serves them (and /status) on the event loop.

What each connection counts (accepted, connected, ended, bytes) is kept in
plain ints and folded into the series by `flush()`, which the engine calls
at the end of each round of its loop: a busy round serves several
connections, and one series update per round replaces one per connection
(each takes a lock, and with workers writes a file). A scrape sees every
round that has ended.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tcpproxy.errors import StartupError

if TYPE_CHECKING:
    from tcpproxy.config import Config

__all__ = ["END_REASONS", "Metrics", "NullMetrics", "down_reasons", "parse_address"]

log = logging.getLogger("tcpproxy")

# Every value the `reason` label can take (bounded).
END_REASONS = (
    "done", "client-error", "target-error", "target-early-error", "idle-timeout",
    "cancelled", "no-target", "no-resources", "internal-error", "over-limit", "no-route",
    "source-limit", "first-byte-timeout", "untrusted-proxy",
)  # fmt: skip
REASONS_FILE = "reasons_{pid}.json"  # per worker: target -> why it is down (multiprocess)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def parse_address(value: str) -> tuple[str, int]:
    """'127.0.0.1:9100', '[::1]:9100' or ':9100' (every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise StartupError(f"--metrics {value!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:9100")
    return host.strip("[]") or "0.0.0.0", int(port)


class NullMetrics:
    """Metrics off: every call does nothing (the default)."""

    def accepted(self, app: str) -> None: ...
    def rejected(self, app: str, reason: str) -> None: ...
    def connected(self, app: str, target: object, seconds: float) -> None: ...
    def ended(self, app: str, target: object, reason: str, up: int, down: int) -> None: ...
    def target_state(self, target: object, up: bool, why: str = "") -> None: ...
    def reload(self, ok: bool) -> None: ...
    def config_loaded(self, digest: str) -> None: ...
    def app_rejected(self, app: str) -> None: ...
    def steered_ports(self, count: int) -> None: ...
    def keep_only(self, config: Config) -> None: ...
    def routed(self, app: str, how: str) -> None: ...
    def flush(self) -> None: ...


class Metrics(NullMetrics):
    """The proxy's metrics in a prometheus-client registry."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY
        live = {"multiprocess_mode": "livesum"}
        self._accepted = Counter(
            "tcpproxy_connections_accepted",
            "Connections accepted, per app",
            ["app"],
            registry=reg,
        )
        self._active = Gauge(
            "tcpproxy_connections_active",
            "Connections open now, per app and target",
            ["app", "target"],
            registry=reg,
            **live,
        )
        self._ended = Counter(
            "tcpproxy_connections_ended",
            "Connections ended, per app, target and reason",
            ["app", "target", "reason"],
            registry=reg,
        )
        self._bytes = Counter(
            "tcpproxy_bytes",
            "Bytes relayed: up is client to target, down the reverse",
            ["app", "target", "direction"],
            registry=reg,
        )
        self._connect = Histogram(
            "tcpproxy_connect_seconds",
            "Time to connect to a target, per target",
            ["target"],
            buckets=CONNECT_BUCKETS,
            registry=reg,
        )
        self._health = Gauge(
            "tcpproxy_target_up",
            "1 if a target is up, 0 if marked down",
            ["target"],
            registry=reg,
            multiprocess_mode="liveall",
        )
        self._reloads = Counter(
            "tcpproxy_config_reloads",
            "Config reloads by result (ok, rejected)",
            ["result"],
            registry=reg,
        )
        self._app_rejections = Counter(
            "tcpproxy_config_app_rejections",
            "Values of a fleet's keys refused, by app ((defaults) for the defaults key)",
            ["app"],
            registry=reg,
        )
        self._config = Gauge(
            "tcpproxy_config_info",
            "The loaded config's hash (always 1)",
            ["hash"],
            registry=reg,
            multiprocess_mode="liveall",
        )
        self._config_time = Gauge(
            "tcpproxy_config_loaded_timestamp_seconds",
            "When the config in force was loaded",
            registry=reg,
            multiprocess_mode="max",
        )
        self._steered = Gauge(
            "tcpproxy_bpf_steered_ports", "Ports in bpfproxy's port map",
            registry=reg, multiprocess_mode="max",
        )  # fmt: skip
        self._routed = Counter(
            "tcpproxy_connections_routed",
            "Connections on ports told apart by name, per app and how they were routed "
            "(name: by TLS SNI or HTTP Host; default: no name or an unknown one; silent: "
            "nothing sent within InspectTimeout)",
            ["app", "by"],
            registry=reg,
        )
        self._last_hash: str | None = None
        # The labelled series each connection touches, by their labels as we hold them:
        # labels() validates, formats and locks on every call (several us a connection).
        # Bounded as the label values are (apps, targets, reasons of the config).
        self._children: dict[tuple, Any] = {}
        # with workers: the targets this one marked down, and why, in its REASONS_FILE
        self._reasons_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._down: dict[str, str] = {}
        # Counted per connection, not yet in the series (`flush`): label tuple -> count
        self._dirty = False
        self._new_accepted: dict[str, int] = {}
        self._new_active: dict[tuple[str, object], int] = {}  # a change, may be negative
        self._new_ended: dict[tuple[str, object, str], int] = {}
        self._new_bytes: dict[tuple[str, object, str], int] = {}
        self._new_connects: list[tuple[object, float]] = []  # (target, seconds)
        self._new_routed: dict[tuple[str, str], int] = {}  # (app, how)

    def _child(self, metric: Any, *labels: Any) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*(str(v) for v in labels))
        return child

    def accepted(self, app: str) -> None:
        counts = self._new_accepted
        counts[app] = counts.get(app, 0) + 1
        self._dirty = True

    def routed(self, app: str, how: str) -> None:
        routed = self._new_routed
        routed[app, how] = routed.get((app, how), 0) + 1
        self._dirty = True

    def rejected(self, app: str, reason: str) -> None:
        self._child(self._accepted, app).inc()
        self._child(self._ended, app, "-", reason).inc()

    def connected(self, app: str, target: object, seconds: float) -> None:
        self._new_connects.append((target, seconds))
        key = (app, target)
        self._new_active[key] = self._new_active.get(key, 0) + 1
        self._dirty = True

    def ended(self, app: str, target: object, reason: str, up: int, down: int) -> None:
        """`target` None: no target was connected."""
        self._dirty = True
        ended = self._new_ended
        if target is None:
            key = (app, "-", reason)
            ended[key] = ended.get(key, 0) + 1
            return
        key = (app, target, reason)
        ended[key] = ended.get(key, 0) + 1
        self._new_active[app, target] = self._new_active.get((app, target), 0) - 1
        if up:
            key = (app, target, "up")
            self._new_bytes[key] = self._new_bytes.get(key, 0) + up
        if down:
            key = (app, target, "down")
            self._new_bytes[key] = self._new_bytes.get(key, 0) + down

    def flush(self) -> None:
        """Fold what connections counted since the last call into the series."""
        if not self._dirty:
            return
        self._dirty = False
        child = self._child
        for app, n in self._new_accepted.items():
            child(self._accepted, app).inc(n)
        for (app, target), n in self._new_active.items():
            gauge = child(self._active, app, target)  # made even if the round netted 0
            if n:
                gauge.inc(n)
        for labels, n in self._new_ended.items():
            child(self._ended, *labels).inc(n)
        for labels, n in self._new_bytes.items():
            child(self._bytes, *labels).inc(n)
        for target, seconds in self._new_connects:
            child(self._connect, target).observe(seconds)
        for labels, n in self._new_routed.items():
            child(self._routed, *labels).inc(n)
        self._new_routed.clear()
        self._new_accepted.clear()
        self._new_active.clear()
        self._new_ended.clear()
        self._new_bytes.clear()
        self._new_connects.clear()

    def target_state(self, target: object, up: bool, why: str = "") -> None:
        self._child(self._health, target).set(1 if up else 0)
        if self._reasons_dir is None:
            return  # one process: /status asks the health book itself
        key = str(target)
        if up:
            if self._down.pop(key, None) is None:
                return  # it was not down: nothing to write
        elif self._down.get(key) == why and key in self._down:
            return
        else:
            self._down[key] = why
        path = os.path.join(self._reasons_dir, REASONS_FILE.format(pid=os.getpid()))
        try:  # a few hundred bytes, at a change of state: written whole, then renamed
            with open(path + ".new", "w", encoding="utf-8") as out:
                json.dump(self._down, out)
            os.replace(path + ".new", path)
        except OSError as exc:  # /status then shows no reason: not worth more
            log.debug("metrics: %s not written: %s", path, exc)

    def reload(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "rejected").inc()

    def app_rejected(self, app: str) -> None:
        self._app_rejections.labels(app).inc()

    def config_loaded(self, digest: str) -> None:
        import time

        if self._last_hash is not None and self._last_hash != digest:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                # multiprocess files cannot drop a label (prometheus-client warns);
                # 0 marks it old, and the supervisor's registry leaves it out
                self._config.labels(self._last_hash).set(0)
            else:
                self._config.remove(self._last_hash)
        self._last_hash = digest
        self._config.labels(digest).set(1)
        self._config_time.set(time.time())

    def steered_ports(self, count: int) -> None:
        self._steered.set(count)

    def keep_only(self, config: Config) -> None:
        """Drop the series of apps and targets `config` no longer has (after a reload),
        but an open connection's gauge, which its end still counts down. Multiprocess
        files cannot drop a series: there the supervisor's registry leaves them out."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        current = Current(config)
        for key in list(self._children):
            metric, *values = key
            labels = dict(zip(metric._labelnames, (str(v) for v in values), strict=True))
            if metric._name not in PER_APP_AND_TARGET or current.has(labels):
                continue
            if metric is self._active and self._children[key]._value.get():
                continue
            del self._children[key]
            metric.remove(*labels.values())


class Current:
    """Which label values belong to a config: its apps, their targets, and "-" (none:
    a connection that ended before it had an app, or a target)."""

    def __init__(self, config: Config) -> None:
        self._apps = {app.name: {str(t) for t in app.targets} for app in config.apps}
        self._targets = {t for targets in self._apps.values() for t in targets}

    def has(self, labels: dict[str, str]) -> bool:
        """False for a series of an app or a target that is gone."""
        app, target = labels.get("app"), labels.get("target")
        if app is not None and app != "-" and app not in self._apps:
            return False
        if target is None or target == "-":
            return True
        return target in (self._apps[app] if app not in (None, "-") else self._targets)


# the metrics whose app and target labels are the config's (not, say, the apps a
# fleet's source refused, tcpproxy_config_app_rejections)
PER_APP_AND_TARGET = frozenset({
    "tcpproxy_connections_accepted", "tcpproxy_connections_active",
    "tcpproxy_connections_ended", "tcpproxy_bytes", "tcpproxy_connect_seconds",
    "tcpproxy_target_up", "tcpproxy_connections_routed",
})  # fmt: skip


def current_only(registry: Any, config: Callable[[], Config]) -> Any:
    """A registry serving `registry`'s series but those of apps and targets that
    `config()` (the config in force) no longer has."""
    from prometheus_client import CollectorRegistry

    class CurrentOnly:
        def collect(self) -> Iterable[Any]:
            current = Current(config())
            for metric in registry.collect():
                if metric.name in PER_APP_AND_TARGET:
                    metric.samples = [s for s in metric.samples if current.has(s.labels)]
                yield metric

    filtered = CollectorRegistry(auto_describe=False)
    filtered.register(CurrentOnly())
    return filtered


def multiprocess_registry(directory: str) -> Any:
    """The supervisor's registry: the sum of its workers' files, where the
    config hashes no longer loaded (set to 0, see `config_loaded`) are left out."""
    from prometheus_client import CollectorRegistry

    class RunningHashOnly:
        def collect(self) -> Iterable[Any]:
            for metric in _merged_files(directory):
                if metric.name == "tcpproxy_config_info":
                    metric.samples = [sample for sample in metric.samples if sample.value]
                yield metric

    registry = CollectorRegistry()
    registry.register(RunningHashOnly())
    return registry


FILE_READS = 3  # tries to read the workers' files while workers start and end
MIN_FILE_SIZE = 8  # bytes: a file holds its used length first; empty: just created


def _merged_files(directory: str) -> Iterable[Any]:
    """The metrics of every worker's file, summed, as prometheus-client's
    MultiProcessCollector, but read while workers come and go (an upgrade starts new
    ones as the old ones end): a file just created is still empty (skipped: nothing in
    it yet), a dead worker's may be removed between the listing and the read (listed
    again: its counts are in the archive by then)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    for attempt in range(FILE_READS):
        paths = glob.glob(os.path.join(glob.escape(directory), "*.db"))
        try:
            files = [path for path in paths if os.stat(path).st_size >= MIN_FILE_SIZE]
            return MultiProcessCollector.merge(files, accumulate=True)
        except FileNotFoundError:
            if attempt == FILE_READS - 1:
                raise
    raise AssertionError("not reached")


def down_reasons(directory: str) -> dict[str, str]:
    """Why the workers marked targets down (their REASONS_FILEs); one reason per target."""
    reasons: dict[str, str] = {}
    pattern = os.path.join(glob.escape(directory), REASONS_FILE.format(pid="*"))
    for path in glob.glob(pattern):
        try:
            with open(path, encoding="utf-8") as file:
                found = json.load(file)
        except (OSError, ValueError):  # a worker gone meanwhile
            continue
        if isinstance(found, dict):
            for target, why in found.items():
                if why and not reasons.get(target):
                    reasons[str(target)] = str(why)
    return reasons


ARCHIVED_KINDS = ("counter", "histogram")  # whose values a dead worker leaves to the sum


def mark_dead(pid: int) -> None:
    """A worker exited: drop its live gauges, fold its counters and histograms
    into one archive file per kind (so the sums never go down), and remove
    every file of that pid, so none piles up as workers are replaced."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    multiprocess.mark_process_dead(pid, directory)
    for kind in ARCHIVED_KINDS:
        path = os.path.join(directory, f"{kind}_{pid}.db")
        if not os.path.exists(path):
            continue
        archive = MmapedDict(os.path.join(directory, f"{kind}_archive.db"))
        try:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
                total, _ = archive.read_value(key)
                archive.write_value(key, total + value, timestamp)
        finally:
            archive.close()
    for path in glob.glob(os.path.join(glob.escape(directory), f"*_{pid}.db")):
        os.remove(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, REASONS_FILE.format(pid=pid)))
