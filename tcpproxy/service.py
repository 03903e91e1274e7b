"""The life of a proxy process, shared by both binaries: start, reload, drain, stop.

A `Frontend` is how connections arrive (tcpproxy: a listener per port;
bpfproxy: one socket steered by BPF). Everything else — routing, target
choice, relaying, reload and shutdown — is the same code.

Lifecycle rules:
1. Startup errors (config, bind, BPF) happen before serving and are raised.
2. A reload (file change or SIGHUP) validates the new file first; an invalid
   one is logged and changes nothing. A valid one is applied as a diff:
   the frontend first (it may still reject, e.g. a port that cannot be
   bound), then the routes, with no checkpoint between, so no connection
   sees half a reload. Established connections are never touched.
3. SIGTERM or SIGINT stops accepting, lets connections finish for up to the
   drain timeout, then cuts the rest; a second SIGINT cuts them at once.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from tcpproxy.config import Config, ConfigError, parse_config, read_config_bytes
from tcpproxy.diff import diff_configs, format_ports
from tcpproxy.errors import StartupError
from tcpproxy.metrics import NullMetrics, serve_http, stop_http
from tcpproxy.notify import Notifier
from tcpproxy.proxy import Proxy
from tcpproxy.selfloop import reject_self_loops
from tcpproxy.watch import watch_config

if TYPE_CHECKING:
    from tcpproxy.workers import SupervisorLink

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "Frontend",
    "Reloader",
    "run_service",
]

log = logging.getLogger("tcpproxy")

DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds open connections may take to finish on shutdown
DEFAULT_MAX_CONNECTIONS = 10000  # open connections per process; see the CLI's --max-connections
SHORTAGE_RETRY = 1.0  # seconds between tries to read the config file while we lack descriptors
# read failures that are this process's shortage, not a problem of the config file
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_RETRY = "retry"  # _reload's outcome when the file could not be read for want of resources


class Frontend(Protocol):
    """How connections reach the proxy."""

    name: str

    async def serve(self, proxy: Proxy, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Accept on every listener for `proxy` until cancelled; started() once accepting."""

    def update(self, old: Config, new: Config) -> None:
        """Apply a reload's port changes; raise StartupError (changing nothing) to reject it."""


def digest(data: bytes) -> str:
    """A short name for a config's contents, for logs."""
    return hashlib.sha256(data).hexdigest()[:12]


ApplyFn = Callable[[Config, Config], Awaitable[None]]


FileStamp = tuple[int, int, int, int] | None  # inode, size, mtime and ctime (ns); None: unknown


def _read(path: Path) -> tuple[bytes, FileStamp]:
    """The file's contents and, taken just before, its stamp: a save changes the stamp
    even when it writes the same bytes."""
    try:
        st = os.stat(path)
        stamp: FileStamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        stamp = None  # read_config_bytes says why
    return read_config_bytes(path), stamp


class Reloader:
    """Serialises reloads of the config file: requests coalesce, one runs at a time.

    An event is ignored when the file holds the contents in force, or the
    contents last rejected and was not saved since (another file of the
    directory changed). Saving a rejected file again, even unchanged, retries
    it: the rejection says so. SIGHUP always reads and applies.

    Args:
      path: the config file.
      data: its contents as running.
      current: the config in force.
      apply: applies `(old, new)`; raises StartupError, having changed nothing,
        to reject it.
      validate: checks a parsed config further (raises ConfigError to reject it),
        as the start did (e.g. `selfloop.reject_self_loops`).
    """

    def __init__(
        self,
        path: Path,
        data: bytes,
        current: Callable[[], Config],
        apply: ApplyFn,
        notifier: Notifier | None = None,
        metrics: NullMetrics | None = None,
        validate: Callable[[Config], None] | None = None,
    ) -> None:
        self._path = path
        self._validate = validate
        self._current = current
        self._apply = apply
        self._notifier = notifier or Notifier({})
        self._metrics = metrics or NullMetrics()
        self.digest = digest(data)  # of the config in force
        self.loaded_at = time.time()
        self.last = "none"  # the last reload's outcome, for status lines
        self._running = data  # contents of the config in force (or an equivalent)
        self._rejected: tuple[bytes, FileStamp] | None = None  # the last rejected file
        self._send, self._receive = trio.open_memory_channel[str](1)
        self._short = False  # reading the file failed for want of descriptors or memory
        self.reloads = 0  # applied reloads, for tests and status
        self.rejected = 0

    def request(self, why: str) -> None:
        try:
            self._send.send_nowait(why)
        except trio.WouldBlock:  # one is pending already; it will read the newest file
            pass

    async def run(self, status: Callable[[], str] | None = None) -> None:
        async for why in self._receive:
            self._notifier.reloading()
            outcome = None
            try:
                outcome = await self._reload(why)
            finally:
                if outcome in ("applied", "rejected"):
                    self.last = f"{outcome} at {time.strftime('%H:%M:%S')}"
                self._notifier.ready(status() if status else self.last)
            if outcome == _RETRY:  # requests meanwhile coalesce with this one
                await trio.sleep(SHORTAGE_RETRY)
                self.request(why)

    async def _reload(self, why: str) -> str | None:
        """Returns "applied", "rejected", _RETRY, or None when nothing changed."""
        try:
            data, stamp = await trio.to_thread.run_sync(_read, self._path)
        except ConfigError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in SHORTAGE_ERRNOS:
                if not self._short:  # once per episode: every directory event lands here
                    log.error("reload (%s): cannot read the config file now: %s; the running "
                              "config is kept and the file read again every %gs",
                              why, exc, SHORTAGE_RETRY)  # fmt: skip
                self._short = True
                return _RETRY
            self._short = False
            return self._reject(why, exc)
        if self._short:
            log.info("reload (%s): the config file can be read again", why)
            self._short = False
        if why != "SIGHUP" and (data == self._running or (data, stamp) == self._rejected):
            return None  # an event that did not change the file
        try:
            new = await trio.to_thread.run_sync(self._parse, data)
        except ConfigError as exc:
            return self._reject(why, exc, (data, stamp))
        old = self._current()
        diff = diff_configs(old, new)
        if diff.empty:
            self._running, self._rejected = data, None
            log.info("reload (%s): config %s has no changes", why, digest(data))
            return None
        try:
            await self._apply(old, new)
        except StartupError as exc:
            return self._reject(why, exc, (data, stamp))
        self._running, self._rejected = data, None
        self.reloads += 1
        self.digest, self.loaded_at = digest(data), time.time()
        self._metrics.reload(True)
        self._metrics.config_loaded(self.digest)
        log.info("reload (%s): config %s applied: %s", why, digest(data), diff.summary())
        return "applied"

    def _parse(self, data: bytes) -> Config:
        config = parse_config(data, str(self._path))
        if self._validate is not None:
            self._validate(config)
        return config

    def _reject(self, why: str, exc: Exception, file: tuple[bytes, FileStamp] | None = None) -> str:
        self._rejected = file if file is not None and file[1] is not None else None
        self.rejected += 1
        self._metrics.reload(False)
        log.error("reload (%s) rejected, keeping the running config %s; the file is read "
                  "again on its next change or SIGHUP: %s", why, self.digest, exc)  # fmt: skip
        return "rejected"


def apply_locally(proxy: Proxy, frontend: Frontend) -> ApplyFn:
    """In one process: the frontend first (it may reject), then the routes, with
    no checkpoint between, so no connection sees half a reload."""

    async def apply(old: Config, new: Config) -> None:
        frontend.update(old, new)
        proxy.apply(new)

    return apply


async def run_service(
    path: Path,
    data: bytes,
    config: Config,
    frontend: Frontend,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    use_splice: bool = True,
    supervisor: SupervisorLink | None = None,
    metrics: NullMetrics | None = None,
    metrics_address: tuple[str, int] | None = None,
    listen_ports: frozenset[int] = frozenset(),
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `config` through `frontend` until SIGTERM/SIGINT, then drain.

    Args:
      path: the config file, watched for changes.
      data: its contents as loaded (so the first change event is compared
        against what is running).
      drain_timeout: seconds connections may take to finish after a stop.
      supervisor: set in a worker process: configs come from the supervisor
        (which watches the file and validates once), not from the file.
      metrics: where to count (NullMetrics: nowhere).
      metrics_address: serve /metrics and /status there (not in workers:
        their supervisor serves the sum).
      listen_ports: ports served besides the apps' (bpfproxy's -p): no target
        may loop back to them.
    """
    metrics = metrics or NullMetrics()
    stop_accepting = trio.CancelScope()
    cut_connections = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as outer:
            with cut_connections:
                async with trio.open_nursery() as connections:
                    share = supervisor.count if supervisor is not None else 1
                    prefix = f"w{supervisor.index}-" if supervisor is not None else ""
                    proxy = Proxy(
                        config, connections, max_connections=max_connections, share=share,
                        id_prefix=prefix, metrics=metrics, use_splice=use_splice,
                        listen_ports=listen_ports,
                    )  # fmt: skip
                    apply = apply_locally(proxy, frontend)
                    notifier = Notifier()
                    validate = partial(
                        reject_self_loops, extra_ports=listen_ports, source=str(path)
                    )
                    reloader = Reloader(
                        path, data, lambda: proxy.config, apply, notifier, metrics, validate
                    )
                    if supervisor is None:
                        metrics.config_loaded(reloader.digest)

                    def status() -> str:
                        return (
                            f"{len(proxy.config.apps)} apps, {len(proxy.config.ports)} ports, "
                            f"{proxy.active_total} active connections, last reload: {reloader.last}"
                        )

                    on_hup = reloader.request if supervisor is None else _ignore
                    outer.start_soon(
                        _handle_signals, signals, on_hup, stop_accepting, cut_connections
                    )
                    if metrics_address is not None:
                        token = trio.lowlevel.current_trio_token()

                        def snapshot() -> dict:
                            return {
                                "binary": frontend.name,
                                "pid": os.getpid(),
                                "config": {
                                    "path": str(path),
                                    "hash": reloader.digest,
                                    "loaded": _iso(reloader.loaded_at),
                                },
                                "last_reload": reloader.last,
                                **proxy.status(),
                            }

                        server = serve_http(
                            *metrics_address,
                            lambda: trio.from_thread.run_sync(snapshot, trio_token=token),
                        )
                        outer.start_soon(_shut_down_on_exit, server)
                    with stop_accepting:
                        async with trio.open_nursery() as control:
                            await control.start(proxy.health.run)
                            await control.start(frontend.serve, proxy)
                            if supervisor is None:
                                await control.start(watch_config, path, reloader.request)
                                control.start_soon(reloader.run, status)
                            else:
                                control.start_soon(supervisor.follow, lambda: proxy.config, apply)
                            log.info(
                                "%s started: %d apps, ports %s, config %s, max %d connections",
                                frontend.name, len(config.apps),
                                format_ports(config.ports),
                                digest(data) if supervisor is None else "from the supervisor",
                                max_connections,
                            )  # fmt: skip
                            notifier.ready(status())
                            outer.start_soon(notifier.watchdog, status)  # pings while draining too
                            task_status.started(proxy)
                    # accepting has stopped and every listener is closed
                    notifier.stopping(status())
                    if proxy.active_total:
                        log.info("draining %d connections for up to %gs",
                                 proxy.active_total, drain_timeout)  # fmt: skip
                    connections.cancel_scope.deadline = trio.current_time() + drain_timeout
            if proxy.active_total:
                log.warning("closed %d connections still open at shutdown", proxy.active_total)
            outer.cancel_scope.cancel()
    log.info("%s stopped", frontend.name)


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


async def _shut_down_on_exit(server: Any) -> None:
    """Stop the metrics server thread when the service ends (this task is cancelled)."""
    try:
        await trio.sleep_forever()
    finally:
        await stop_http(server)


def _ignore(why: str) -> None:
    """A worker's SIGHUP: its supervisor reloads for it."""


async def _handle_signals(
    signals: AsyncIterator[int],
    on_hup: Callable[[str], None],
    stop_accepting: trio.CancelScope,
    cut_connections: trio.CancelScope,
) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            on_hup("SIGHUP")
        elif not stop_accepting.cancel_called:
            log.info("%s: stopping", signal.Signals(signum).name)
            stop_accepting.cancel()
        elif signum == signal.SIGINT:
            log.info("SIGINT again: closing connections now")
            cut_connections.cancel()
