"""Prometheus metrics, served with /status over HTTP (`--metrics ADDRESS:PORT`).

prometheus-client does the exposition; this module names the metrics and
keeps their labels bounded: app names, target addresses and end reasons come
from the config and a fixed list, never from clients.

With workers, each worker records into prometheus-client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor) and the supervisor
serves the sum; a worker that dies is marked dead so its gauges drop out, and
its counters move to an archive file so no file per dead pid piles up.
Those files cannot drop a label, so a config hash no longer loaded is set
to 0 there and left out of what the supervisor serves.

What each connection counts (accepted, connected, ended, bytes) is kept in
plain ints and folded into the series by `flush()`, which the engine calls
at the end of each round of its loop: a busy round serves several
connections, and one series update per round replaces one per connection
(each takes a lock, and with workers writes a file). A scrape sees every
round that has ended.

The HTTP server runs in a thread (wsgiref). /status asks the event loop for
a snapshot (trio.from_thread), so it never reads state mid-update.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tcpproxy.errors import StartupError
from tcpproxy.listeners import bind_hint
from tcpproxy.status import as_text

__all__ = ["END_REASONS", "Metrics", "NullMetrics", "parse_address", "serve_http"]

log = logging.getLogger("tcpproxy")

# Every value the `reason` label can take (bounded).
END_REASONS = (
    "done", "client-error", "target-error", "target-early-error", "idle-timeout",
    "cancelled", "no-target", "no-resources", "internal-error", "over-limit", "no-route",
    "source-limit", "first-byte-timeout", "untrusted-proxy",
)  # fmt: skip
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
    def target_state(self, target: object, up: bool) -> None: ...
    def reload(self, ok: bool) -> None: ...
    def config_loaded(self, digest: str) -> None: ...
    def app_rejected(self, app: str) -> None: ...
    def steered_ports(self, count: int) -> None: ...
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
        self._last_hash: str | None = None
        # The labelled series each connection touches, by their labels as we hold them:
        # labels() validates, formats and locks on every call (several us a connection).
        # Bounded as the label values are (apps, targets, reasons of the config).
        self._children: dict[tuple, Any] = {}
        # Counted per connection, not yet in the series (`flush`): label tuple -> count
        self._dirty = False
        self._new_accepted: dict[str, int] = {}
        self._new_active: dict[tuple[str, object], int] = {}  # a change, may be negative
        self._new_ended: dict[tuple[str, object, str], int] = {}
        self._new_bytes: dict[tuple[str, object, str], int] = {}
        self._new_connects: list[tuple[object, float]] = []  # (target, seconds)

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
        self._new_accepted.clear()
        self._new_active.clear()
        self._new_ended.clear()
        self._new_bytes.clear()
        self._new_connects.clear()

    def target_state(self, target: object, up: bool) -> None:
        self._health.labels(str(target)).set(1 if up else 0)

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


HTTP_TIMEOUT = 10.0  # seconds a scrape connection may sit idle before it is dropped


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT  # a client that sends nothing must not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per request: one slow client cannot hold up the others or shutdown().

    No SO_REUSEPORT: a port another process serves (a second proxy, or a
    --workers listener) is refused at bind. An upgrade hands the listening
    socket itself to the new process instead (`handed`), so both serve on one
    accept queue until the old one stops. The socket is non-blocking: with two
    processes on one queue, the other may take the connection between select()
    and accept(), and a blocking accept() would hang shutdown().
    """

    daemon_threads = True
    handed: socket.socket | None = None  # set on a subclass: serve on it, bind nothing

    def server_bind(self) -> None:
        if self.handed is None:
            super().server_bind()
        else:
            self.socket.close()
            self.socket = self.handed
            self.server_address = self.socket.getsockname()
            self.server_name, self.server_port = self.server_address[:2]
            self.setup_environ()
        self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self.handed is None:
            super().server_activate()


def serve_http(
    host: str,
    port: int,
    status: Callable[[], dict[str, Any]],
    registry: Any = None,
    *,
    handed: socket.socket | None = None,
) -> WSGIServer:
    """Serve /metrics, /status (JSON) and /status.txt in a daemon thread.

    `handed`: the listening socket an upgrade handed over (tcpproxy.upgrade),
    served as it is if it is on `port` (else closed, and the port bound).

    Raises StartupError naming the address when it cannot be bound (in use:
    another proxy's metrics, or a listening port). The caller shuts the
    returned server down; its `socket` is what an upgrade hands over.
    """
    from prometheus_client import REGISTRY, make_wsgi_app

    metrics_app = make_wsgi_app(registry if registry is not None else REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/status", "/status.txt"):
            try:
                snapshot = status()
            except Exception as exc:  # the loop is stopping: say so, do not crash the thread
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [f"status unavailable: {exc}\n".encode()]
            if path == "/status":
                body = json.dumps(snapshot, indent=2).encode() + b"\n"
                content = "application/json"
            else:
                body, content = as_text(snapshot).encode(), "text/plain; charset=utf-8"
            start_response("200 OK", [("Content-Type", content)])
            return [body]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics, /status or /status.txt\n"]

    if handed is not None and handed.getsockname()[1] != port:
        handed.close()  # the old process served another port
        handed = None

    class _Server(_ThreadingServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    _Server.handed = handed
    try:
        server = make_server(host, port, app, server_class=_Server,
                             handler_class=_QuietHandler)  # fmt: skip
    except OSError as exc:
        raise StartupError(f"--metrics {host}:{port}: {bind_hint(exc)}") from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics and status on http://%s:%d/metrics and /status", host, port)
    return server


def multiprocess_registry(directory: str) -> Any:
    """The supervisor's registry: the sum of its workers' files, where the
    config hashes no longer loaded (set to 0, see `config_loaded`) are left out."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    files = MultiProcessCollector(None, path=directory)

    class RunningHashOnly:
        def collect(self) -> Iterable[Any]:
            for metric in files.collect():
                if metric.name == "tcpproxy_config_info":
                    metric.samples = [sample for sample in metric.samples if sample.value]
                yield metric

    registry = CollectorRegistry()
    registry.register(RunningHashOnly())
    return registry


async def stop_http(server: WSGIServer) -> None:
    """Stop the server off the event loop (shutdown() waits for its thread, and a
    /status request in flight may be waiting for the loop), shielded so that it
    completes even while the caller is being cancelled."""
    import trio

    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(server.shutdown)
    server.server_close()


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
