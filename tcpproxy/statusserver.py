"""What `--metrics ADDRESS:PORT` serves: the page, /status, /metrics, over httpserver.

The routes are read-only. Work that may be slow with many apps (the
Prometheus exposition, JSON of a large snapshot) runs in a worker thread
behind RENDER_THREADS, never one thread per client; the snapshot itself is
taken by the caller's `status` where the state lives (a single process: on
its event loop, so never mid-update).

What a poll of the page costs is kept small (docs/benchmarks.md, "The status
page"): the page's body is shared by the polls within SHARED_FOR seconds, the
5 minutes' history is sent only for the apps asked (`history_of`), an app's
JSON is written again only when its entry changed (`History.entries`), and a
client that accepts gzip gets it (zlib level 1: a poll's JSON shrinks about 20
times for under a millisecond).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

import trio

from tcpproxy.config import Config
from tcpproxy.httpserver import HttpServer, Request, Response, listen
from tcpproxy.status import RING_STEP, History, Totals, as_text, totals_from_samples

__all__ = [
    "RENDER_THREADS",
    "StatusRoutes",
    "keep_history",
    "open_status_server",
    "registry_samples",
    "status_extra",
]

log = logging.getLogger("tcpproxy")

RENDER_THREADS = 1  # worker threads rendering at once; more requests wait their turn
SHARED_FOR = 1.0  # seconds the page's /status body serves every poll (below its 2 s period)
SHARED_MAX = 8  # bodies kept at once (pages that expanded different apps ask differently)
GZIP_ABOVE = 1024  # bytes: smaller bodies are sent as they are
GZIP_LEVEL = 1  # zlib's fastest: most of the gain, a fraction of the CPU

# the status page: one HTML file, its script and its style, served from the package
PAGE = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# nothing the proxy does not serve itself: no inline script or style, no other origin
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)

# the snapshot, with the 5 minutes' history of: every app (True), none (False), or these
StatusFn = Callable[[bool | Collection[str]], Awaitable[dict[str, Any]]]


class StatusRoutes:
    """The handler of the status server: a path to a response."""

    def __init__(self, status: StatusFn, registry: Any = None) -> None:
        from prometheus_client import REGISTRY

        self._status = status
        self._registry = registry if registry is not None else REGISTRY
        self._render = trio.CapacityLimiter(RENDER_THREADS)
        # the page's polls: (query, gzip?) -> (when, the response); polls within
        # SHARED_FOR seconds of each other share one render
        self._shared: dict[tuple[str, bool], tuple[float, Response]] = {}
        # the JSON of each app entry of the last compact render, by the entry's identity
        # (History.entries gives the same object while its inputs stay): entry, bytes
        self._fragments: dict[int, tuple[dict[str, Any], bytes]] = {}

    async def __call__(self, request: Request) -> Response:
        zipped = "gzip" in request.headers.get("accept-encoding", "")
        if request.path == "/metrics":
            return await self._metrics(request, zipped)
        if request.path in ("/status", "/status.txt"):
            asked = request.query.split("&")
            if request.path == "/status" and "compact=1" in asked:
                return await self._page_status(request.query, zipped)
            snapshot = await self._status(_history_asked(asked))
            if request.path == "/status":
                return await self._rendered(_json, snapshot, "application/json", zipped)
            return await self._rendered(_text, snapshot, "text/plain; charset=utf-8", zipped)
        page = PAGE.get(request.path)
        if page is not None:
            name, content_type = page
            return Response(200, _asset(name), content_type, headers=PAGE_HEADERS)
        return Response(404, b"try /, /metrics, /status or /status.txt\n")

    async def _page_status(self, query: str, zipped: bool) -> Response:
        """/status?compact=1, as the page asks: shared by the polls of SHARED_FOR seconds."""
        now = time.monotonic()
        for key, (when, _) in list(self._shared.items()):
            if now - when >= SHARED_FOR:  # at most one entry per query asked in a second
                del self._shared[key]
        shared = self._shared.get((query, zipped))
        if shared is not None:
            return shared[1]
        snapshot = await self._status(_history_asked(query.split("&")))
        response = await self._rendered(self._compact, snapshot, "application/json", zipped)
        if len(self._shared) < SHARED_MAX:
            self._shared[(query, zipped)] = (now, response)
        return response

    def _compact(self, snapshot: dict[str, Any]) -> bytes:
        """`_compact`, writing again only the app entries not written by the last call
        (the apps last, where the page does not mind). Runs in a render thread; two at
        once would only each write what they miss."""
        kept, fragments = self._fragments, {}
        parts = []
        for entry in snapshot["apps"]:
            seen = kept.get(id(entry))
            part = seen[1] if seen is not None and seen[0] is entry else _compact(entry)
            fragments[id(entry)] = (entry, part)  # holding the entry keeps its id unique
            parts.append(part)
        self._fragments = fragments
        head = _compact({key: value for key, value in snapshot.items() if key != "apps"})
        comma = b"," if head != b"{}" else b""
        return b"".join((head[:-1], comma, b'"apps":[', b",".join(parts), b"]}"))

    async def _metrics(self, request: Request, zipped: bool) -> Response:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry = self._registry
        names = parse_qs(request.query).get("name[]")
        if names:  # as prometheus-client's own server: only the series asked for
            registry = registry.restricted_registry(names)
        return await self._rendered(encoder, registry, content_type, zipped)

    async def _rendered(
        self, render: Callable[[Any], bytes], value: Any, content_type: str, zipped: bool
    ) -> Response:
        """`render(value)` in a worker thread, gzipped there if `zipped` and worth it."""

        def run() -> tuple[bytes, bool]:
            body = render(value)
            if zipped and len(body) > GZIP_ABOVE:
                return gzip.compress(body, GZIP_LEVEL, mtime=0), True
            return body, False

        body, gzipped = await trio.to_thread.run_sync(run, limiter=self._render)
        headers = (("Content-Encoding", "gzip"),) if gzipped else ()
        return Response(200, body, content_type, headers=(*headers, ("Vary", "Accept-Encoding")))


def _history_asked(asked: list[str]) -> bool | frozenset[str]:
    """From a query's parts: `history=1` (every app), `history_of=A,B` (these apps,
    each percent-encoded, so a name may hold a comma), or neither."""
    if "history=1" in asked:
        return True
    for part in asked:
        key, _, value = part.partition("=")
        if key == "history_of":
            return frozenset(unquote(name) for name in value.split(","))
    return False


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("tcpproxy.page").joinpath(name).read_bytes()


def _json(snapshot: dict[str, Any]) -> bytes:
    return json.dumps(snapshot, indent=2).encode() + b"\n"


def _compact(snapshot: dict[str, Any]) -> bytes:
    """For the page: a third of the bytes, and of the time to write them."""
    return json.dumps(snapshot, separators=(",", ":")).encode()


def _text(snapshot: dict[str, Any]) -> bytes:
    return as_text(snapshot).encode()


async def keep_history(
    history: History,
    read_samples: Callable[[], Iterable[Any]],
    config: Callable[[], Config],
    down: Callable[[], Mapping[str, str]] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sample the metrics' totals into `history` every RING_STEP seconds until cancelled:
    read and summed in a worker thread, recorded on the loop. `down` (the targets down
    now, and why): also seen at each sample, so "down since" is right to RING_STEP
    seconds whether or not anyone polls /status."""
    limiter = trio.CapacityLimiter(1)

    def read() -> Totals:
        return totals_from_samples(read_samples())

    task_status.started()
    while True:
        totals = await trio.to_thread.run_sync(read, limiter=limiter)
        history.record(totals, time.monotonic(), config())
        if down is not None:
            history.observe(down(), time.time())
        await trio.sleep(RING_STEP)


def status_extra(source: Any, started: float) -> Callable[[], dict[str, Any]]:
    """The header fields a snapshot does not know: version, start, uptime, and in fleet
    mode (a source with a `fleet_status`, tcpproxy.fleet.source) the node, the etcd
    revision applied and seen, the lag between them, and since when etcd is lost."""
    from tcpproxy import __version__

    def extra() -> dict[str, Any]:
        fields: dict[str, Any] = {
            "version": __version__,
            "started": _iso(started),
            "uptime": round(time.time() - started),
        }
        fleet_status = getattr(source, "fleet_status", None)
        if fleet_status is not None:
            fleet = dict(fleet_status())
            lost = fleet.get("lost_since")
            fleet["lost_since"] = _iso(lost) if lost is not None else None
            fields["fleet"] = fleet
        return fields

    return extra


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def registry_samples(registry: Any) -> Callable[[], Iterable[Any]]:
    """Every sample of `registry`, read when called (thread-safe: prometheus-client locks)."""

    def read() -> Iterable[Any]:
        return [sample for metric in registry.collect() for sample in metric.samples]

    return read


def open_status_server(
    host: str,
    port: int,
    status: StatusFn,
    registry: Any = None,
    *,
    handed: socket.socket | None = None,
) -> HttpServer:
    """The status server, bound (or on the socket an upgrade handed over: `handed`);
    the caller runs its `serve` in a nursery and closes its `socket` once it returned.

    Raises StartupError naming the address when it cannot be bound.
    """
    server = HttpServer(listen(host, port, handed), StatusRoutes(status, registry))
    log.info("metrics and status on http://%s:%d/metrics and /status", host, port)
    return server
