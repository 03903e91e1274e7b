"""What `--metrics ADDRESS:PORT` serves: the page, /status, /metrics, over httpserver.

The routes are read-only. Work that may be slow with many apps (the
Prometheus exposition, JSON of a large snapshot) runs in a worker thread
behind RENDER_THREADS, never one thread per client; the snapshot itself is
taken by the caller's `status` where the state lives (a single process: on
its event loop, so never mid-update).
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

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

StatusFn = Callable[[bool], Awaitable[dict[str, Any]]]  # (with the 5 minutes' history?)


class StatusRoutes:
    """The handler of the status server: a path to a response."""

    def __init__(self, status: StatusFn, registry: Any = None) -> None:
        from prometheus_client import REGISTRY

        self._status = status
        self._registry = registry if registry is not None else REGISTRY
        self._render = trio.CapacityLimiter(RENDER_THREADS)

    async def __call__(self, request: Request) -> Response:
        if request.path == "/metrics":
            return await self._metrics(request)
        if request.path in ("/status", "/status.txt"):
            asked = request.query.split("&")
            snapshot = await self._status("history=1" in asked)
            if request.path == "/status":
                body = await self._in_thread(_compact if "compact=1" in asked else _json, snapshot)
                return Response(200, body, "application/json")
            return Response(200, await self._in_thread(_text, snapshot))
        page = PAGE.get(request.path)
        if page is not None:
            name, content_type = page
            return Response(200, _asset(name), content_type, headers=PAGE_HEADERS)
        return Response(404, b"try /, /metrics, /status or /status.txt\n")

    async def _metrics(self, request: Request) -> Response:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry = self._registry
        names = parse_qs(request.query).get("name[]")
        if names:  # as prometheus-client's own server: only the series asked for
            registry = registry.restricted_registry(names)
        return Response(200, await self._in_thread(encoder, registry), content_type)

    async def _in_thread(self, render: Callable[[Any], bytes], value: Any) -> bytes:
        return await trio.to_thread.run_sync(render, value, limiter=self._render)


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
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sample the metrics' totals into `history` every RING_STEP seconds until cancelled:
    read and summed in a worker thread, recorded on the loop."""
    limiter = trio.CapacityLimiter(1)

    def read() -> Totals:
        return totals_from_samples(read_samples())

    task_status.started()
    while True:
        totals = await trio.to_thread.run_sync(read, limiter=limiter)
        history.record(totals, time.monotonic(), config())
        await trio.sleep(RING_STEP)


def status_extra(source: Any, started: float) -> Callable[[], dict[str, Any]]:
    """The header fields a snapshot does not know: version, start, uptime, and in fleet
    mode the etcd revision applied (a source with a `revision`)."""
    from tcpproxy import __version__

    def extra() -> dict[str, Any]:
        fields: dict[str, Any] = {
            "version": __version__,
            "started": _iso(started),
            "uptime": round(time.time() - started),
        }
        revision = getattr(source, "revision", None)
        if revision is not None:
            fields["fleet"] = {"revision": revision}
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
