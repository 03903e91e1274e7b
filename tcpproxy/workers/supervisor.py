"""The supervisor: its workers, the config file and signals composed for one run.

The supervisor is the process the user starts with `--workers N`. It starts
the pool, watches the config file (and SIGHUP) and hands each reload to the
fanout; SIGTERM or SIGINT is forwarded to every worker once (a second SIGINT
again: workers then cut their connections), and it exits 0 once every worker
has drained (one still running after the drain timeout + STOP_GRACE is
killed). With `--metrics` it owns the directory of the workers'
multiprocess files and serves their sum, and /status.

SIGUSR2 upgrades: the supervisor starts its command line again
(tcpproxy.upgrade) and hands it its listening sockets, so the new
supervisor's worker i serves on what worker i served on: tcpproxy's workers
hand theirs over when asked (`Pool.collect_listeners`); bpfproxy's
supervisor holds copies of its group's, and hands its BPF state too. Plus
the port locks. The new supervisor starts its workers and says "ready" once
they all serve; only then are the old workers stopped (SIGTERM): each
close()s its descriptors, and the sockets, with what their accept queues
hold, live on in the new workers. No listener closes, so nothing queued is
reset, whatever net.ipv4.tcp_migrate_req says.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tcpproxy.build_info import describe as describe_build
from tcpproxy.config import Config
from tcpproxy.diff import format_ports
from tcpproxy.errors import StartupError
from tcpproxy.fdstore import FdStore
from tcpproxy.httpserver import HttpServer
from tcpproxy.metrics import (
    Metrics,
    current_only,
    down_reasons,
    mark_dead,
    multiprocess_registry,
    parse_address,
)
from tcpproxy.notify import Notifier
from tcpproxy.pidfile import PidFile
from tcpproxy.reload import Reloader, digest
from tcpproxy.sources import ConfigSource
from tcpproxy.status import History, Loaded, counts_from_samples, snapshot
from tcpproxy.statusserver import (
    keep_history,
    open_status_server,
    registry_samples,
    status_extra,
)
from tcpproxy.upgrade import (
    CONFIG_FD,
    METRICS_FD,
    NOTIFY_FD,
    READY_TIMEOUT,
    Handover,
    config_fd,
    start_successor,
)
from tcpproxy.workers.fanout import Fanout
from tcpproxy.workers.plan import Plan
from tcpproxy.workers.pool import Pool

__all__ = ["Supervisor"]

log = logging.getLogger("tcpproxy")

UPGRADED = -1  # on the supervisor's event channel, besides signal numbers: the new one serves


class Supervisor:
    """Starts, feeds and stops the workers.

    Resource handling: owns the pool (the worker processes and their socket
    pairs) and the metrics directory; on return every worker has exited and
    the directory is gone.
    """

    def __init__(
        self,
        plan: Plan,
        path: Path | str | ConfigSource,
        data: bytes,
        config: Config,
        workers: int,
        metrics_address: str | None = None,
        *,
        drain_timeout: float,
        validate: Callable[[Config], None] | None = None,
        handover: Handover | None = None,
        pid_file: PidFile | None = None,
        notifier: Notifier | None = None,
        fdstore: FdStore | None = None,
    ) -> None:
        """`drain_timeout`: the workers' --drain-timeout; a worker still running
        that long (plus STOP_GRACE) after a stop is killed. `handover`: set
        when an upgrade started this supervisor: told once every worker
        serves, which is also when it rewrites `pid_file`. `notifier`: speaks
        to systemd, connected by the caller before it dropped privileges (None:
        one from the environment); an upgrade hands the new supervisor its socket.
        `fdstore`: keeps the plan's listeners (`Plan.stored`) in the service
        manager's store from READY=1 on, as workers start and die; emptied at
        a stop, handed on by name to an upgrade's new supervisor."""
        self._notifier = notifier if notifier is not None else Notifier()
        self._fdstore = fdstore
        if fdstore is not None:
            fdstore.keep(plan.stored)
        self._handover = handover
        self._pid_file = pid_file
        self._upgrading = False
        self._reloading = trio.CancelScope()  # the file watcher and reloader; ends at a stop
        self._successor: int | None = None
        self._server: HttpServer | None = None  # the metrics server, while it serves
        self._history: History | None = None  # sampled for /status, with --metrics
        self._read_samples: Callable[[], Iterable[Any]] = list
        self._plan = plan
        self._validate = validate  # the reloader's check of a new config (Reloader)
        self._path = path
        self._source: ConfigSource | None = None  # the reloader's, once it runs
        self._data = data
        self._metrics_address = metrics_address
        self._drain_timeout = drain_timeout
        died = _forget_metrics if metrics_address is not None else None
        self.pool = Pool(plan, config, workers, died, fdstore.sync if fdstore else None)
        self._fanout = Fanout(self.pool, plan)

    @property
    def config(self) -> Config:
        """The config every worker runs."""
        return self.pool.config

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT and every worker has exited.

        Raises StartupError when a worker cannot start (the others are stopped).
        """
        notifier = self._notifier
        metrics_dir, metrics = None, None
        if self._metrics_address is not None:
            metrics_dir, metrics = self._start_metrics()
        reloader = Reloader(
            self._path, self._data, lambda: self.config, self._fanout.apply, notifier, metrics,
            self._validate,
        )  # fmt: skip
        self._source = reloader.source
        if metrics is not None:
            reloader.source.use_metrics(metrics)
            metrics.config_loaded(reloader.digest)
            self._server = self._serve_metrics(metrics_dir, reloader)
        try:
            await _serving(self._server, self._history_task(), self._run(notifier, reloader))
        finally:
            self._stop_metrics(handed_over=False)
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _history_task(self) -> Callable[[], Awaitable[None]] | None:
        """What samples the workers' totals into the status history (None: no --metrics)."""
        if self._history is None:
            return None
        history, read = self._history, self._read_samples
        return partial(keep_history, history, read, lambda: self.config)

    def _stop_metrics(self, *, handed_over: bool) -> None:
        """At the end (the requests open are cut), or once an upgrade's new supervisor
        serves /metrics and /status (`handed_over`: they finish, it accepts)."""
        server, self._server = self._server, None
        if server is None:
            return
        if handed_over:
            server.hand_over()
        else:
            server.stop()  # `_serving` closes its socket once it stopped

    def _start_metrics(self) -> tuple[str, Metrics]:
        """Workers write prometheus-client's multiprocess files; we serve their sum."""
        assert self._metrics_address is not None
        _host, port = parse_address(self._metrics_address)  # fails before any worker starts
        for app in self.config.apps:  # bound first, it would make the workers fail to bind
            if port in app.ports:
                raise StartupError(f"--metrics {self._metrics_address}: port {port} "
                                   f"is also a port of app {app.name!r}")  # fmt: skip
        directory = tempfile.mkdtemp(prefix="tcpproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # read by prometheus-client's import
        return directory, Metrics()

    def _serve_metrics(self, directory: str | None, reloader: Reloader) -> HttpServer:
        assert directory is not None and self._metrics_address is not None
        # the series of apps and targets a reload removed are left out (files keep them)
        registry = current_only(multiprocess_registry(directory), lambda: self.config)
        build = describe_build()  # the workers run the same install and environment
        reading = trio.CapacityLimiter(1)  # one read of the workers' files at a time
        read_samples = registry_samples(registry)
        self._history = History(time.monotonic(), time.time())
        self._read_samples = read_samples
        extra = status_extra(reloader.source, time.time())

        def read() -> tuple[Iterable[Any], dict[str, str]]:
            return read_samples(), down_reasons(directory)

        async def status(with_history: bool | Collection[str]) -> dict[str, Any]:
            samples, reasons = await trio.to_thread.run_sync(read, limiter=reading)
            counts = counts_from_samples(samples)
            counts = replace(counts, down={t: reasons.get(t, "") for t in counts.down})
            source = reloader.source
            loaded = Loaded(source.name, reloader.digest, reloader.loaded_at, reloader.last)
            return snapshot(
                self._plan.name, os.getpid(), loaded, self.config,
                counts, workers=len(self.pool.workers),
                rejected=source.rejected(), build=build, history=self._history,
                with_history=with_history, extra=extra(),
            )  # fmt: skip

        handed = self._handover.metrics if self._handover is not None else None
        return open_status_server(
            *parse_address(self._metrics_address), status, registry, handed=handed
        )

    async def _run(self, notifier: Notifier, reloader: Reloader) -> None:
        pool = self.pool

        def status() -> str:
            return (
                f"{len(pool.workers)} workers, {len(self.config.apps)} apps, "
                f"{len(self.config.ports)} ports, last reload: {reloader.last}"
            )

        startup_error: StartupError | None = None
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
        send, events = trio.open_memory_channel[int](math.inf)
        with trio.open_signal_receiver(*wanted) as signals:
            async with trio.open_nursery() as nursery:
                pool.nursery = nursery
                try:
                    await pool.start_all()
                    if self._handover is not None and not await self._handover.confirm():
                        raise StartupError(  # no pid file, no MAINPID= (upgrade rule 2)
                            f"upgrade: the old supervisor did not let this one take over "
                            f"(it was stopping, or gave up on it after {READY_TIMEOUT:g}s)"
                        )
                except StartupError as exc:
                    startup_error = exc
                    await pool.stop_and_wait(signal.SIGTERM, self._drain_timeout)
                    nursery.cancel_scope.cancel()
                else:
                    pool.watch_all()
                    reloading = self._reloading  # ends at a stop or an upgrade
                    await nursery.start(self._reload, reloader, status, reloading)
                    log.info(
                        "%s started: %d workers, %d apps, ports %s, config %s",
                        self._plan.name, len(pool.workers), len(self.config.apps),
                        format_ports(self.config.ports), digest(self._data),
                    )  # fmt: skip
                    if self._handover is not None:
                        self._take_over(self._handover)
                    if self._fdstore is not None:  # stored first: READY=1 means "and kept"
                        self._fdstore.serve()
                    notifier.ready(status(), main_pid=self._handover is not None)
                    nursery.start_soon(notifier.watchdog, status)
                    if self._handover is not None:
                        # a change between our read and our watch's start (the old
                        # supervisor no longer reloads): look once more
                        reloader.request("upgrade: the config as it is now")
                    nursery.start_soon(_pump, signals, send)
                    async for event in events:
                        if event == signal.SIGHUP:
                            reloader.request("SIGHUP")
                            continue
                        if event == signal.SIGUSR2:  # its default action would kill us
                            self._on_usr2(nursery, send)
                            continue
                        if event == UPGRADED:
                            log.info("upgrade: stopping %d workers; pid %d serves",
                                     len(pool.workers), self._successor)  # fmt: skip
                            notifier.disable()  # the new supervisor speaks for the service
                            self._stop_metrics(handed_over=True)
                            event = signal.SIGTERM
                        else:
                            log.info("%s: stopping %d workers", signal.Signals(event).name,
                                     len(pool.workers))  # fmt: skip
                            if self._successor is None:
                                if self._fdstore is not None:  # before the listeners close
                                    self._fdstore.clear()
                                notifier.stopping(status())
                            else:  # a stop queued just after "go": the new one is the service
                                notifier.disable()
                        # a draining supervisor reloads no more: after an upgrade the
                        # new one does, and ours would take the ports it adds
                        reloading.cancel()
                        nursery.start_soon(self._forward_later_signals, events)
                        await pool.stop_and_wait(event, self._drain_timeout)
                        break
                    nursery.cancel_scope.cancel()
        if startup_error is not None:
            raise startup_error
        if self._successor is not None:
            log.info("%s stopped (pid %d serves)", self._plan.name, self._successor)
        else:
            log.info("%s stopped", self._plan.name)

    async def _reload(
        self,
        reloader: Reloader,
        status: Callable[[], str],
        scope: trio.CancelScope,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the config's source and reload on change, until `scope` is cancelled
        (a stop or an upgrade: the new supervisor follows it)."""
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(reloader.source.watch, reloader.request)
                nursery.start_soon(reloader.run, status)
                task_status.started()

    def _take_over(self, handover: Handover) -> None:
        """Started by an upgrade, every worker serves and the old supervisor said
        "go" (it stops its workers): name this process in the pid file."""
        if self._pid_file is not None:
            try:
                self._pid_file.write()
            except OSError as exc:
                log.warning("pid file %s not rewritten: %s", self._pid_file.path, exc)

    def _on_usr2(self, nursery: trio.Nursery, events: trio.MemorySendChannel[int]) -> None:
        if self._upgrading:
            log.info("SIGUSR2 ignored: an upgrade is in flight")
        else:
            self._upgrading = True
            nursery.start_soon(self._upgrade, events)

    async def _upgrade(self, events: trio.MemorySendChannel[int]) -> None:
        try:
            # Under the pool's lock: no reload or worker start changes what the
            # workers listen on between the collection and the end of the upgrade.
            async with self.pool.lock:
                pid = await self._hand_over()
                # no checkpoint since "go": a SIGTERM cannot come in between
                if pid is not None:  # committed (upgrade rule 2): the new one owns it all
                    self._successor = pid  # set at once: a SIGTERM queued now must see it
                    if self._fdstore is not None:
                        self._fdstore.hand_over()
                    self._plan.upgraded(True, self.config)
                    self._reloading.cancel()  # before the lock goes: no reload after this
                elif not self.pool.stopping:
                    self._plan.upgraded(False, self.config)
        finally:
            self._upgrading = False
        if pid is None:
            return
        events.send_nowait(UPGRADED)

    async def _hand_over(self) -> int | None:
        """Start the new supervisor with every listener and the plan's descriptors;
        its pid once it serves, else None (the log says why)."""
        try:
            listeners = await self.pool.collect_listeners() if self._plan.worker_listeners else {}
        except StartupError as exc:
            log.error("upgrade failed: %s; this supervisor goes on serving", exc)
            return None
        fds: dict[str, int] = {}
        try:
            if self.pool.stopping:  # a SIGTERM during the collection: no new supervisor
                return None
            fds = self._plan.upgrade_fds(listeners)
            handed = dict(fds)
            if self._server is not None:  # the new supervisor serves on the same socket
                handed[METRICS_FD] = self._server.socket.fileno()
            notify_fd = self._notifier.fileno()
            if notify_fd is not None:  # the new supervisor may not connect it (unprivileged)
                handed[NOTIFY_FD] = notify_fd
            served = self._source.served() if self._source is not None else None
            if served is not None:  # a fleet node's apps, each at its last good version
                fds[CONFIG_FD] = handed[CONFIG_FD] = config_fd(served)
            # the new supervisor makes its own metrics directory; a SIGTERM meanwhile
            # refuses the hand-over (the new one is stopped)
            return await start_successor(
                {}, handed, unset=("PROMETHEUS_MULTIPROC_DIR",),
                accept=lambda: not self.pool.stopping,
                stored=self._fdstore.stored if self._fdstore is not None else None,
            )  # fmt: skip
        except OSError as exc:  # EMFILE duplicating them: nothing changed
            log.error("upgrade failed: %s; this supervisor goes on serving", exc)
            return None
        finally:  # ours: close(), never shutdown(): the workers (and the new ones) hold them
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sockets in listeners.values():
                for sock in sockets.values():
                    sock.close()

    async def _forward_later_signals(self, events: trio.MemoryReceiveChannel[int]) -> None:
        async for signum in events:
            if signum == signal.SIGUSR2:
                log.info("SIGUSR2 ignored: this supervisor is stopping")
            elif signum == signal.SIGINT:
                log.info("SIGINT again: workers close their connections now")
                self.pool.signal_all(signal.SIGINT)


async def _pump(signals: Any, events: trio.MemorySendChannel[int]) -> None:
    """Signals onto the supervisor's event channel (where an upgrade's end goes too)."""
    async for signum in signals:
        events.send_nowait(signum)


async def _serving(
    server: HttpServer | None, sampling: Callable[[], Awaitable[None]] | None, body: Awaitable[None]
) -> None:
    """Await `body` while `server` serves beside it, and `sampling` runs (in a nursery of
    its own, so an exception of `body` comes out as itself, not in a group). Then stop
    both; but a server handed over to a new supervisor finishes its open requests."""
    error: BaseException | None = None
    sampled = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        if server is not None:
            nursery.start_soon(_serve_then_close, server)
        if sampling is not None:
            nursery.start_soon(_within, sampled, sampling)
        try:
            await body
        except BaseException as exc:  # re-raised below, outside the nursery
            error = exc
        if error is None and server is not None and server.handed_over:
            sampled.cancel()  # the server returns once its last request is answered
        else:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def _within(scope: trio.CancelScope, run: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await run()


async def _serve_then_close(server: HttpServer) -> None:
    """Serve until stopped; then close the socket (an upgrade's new supervisor has its own)."""
    try:
        await server.serve()
    finally:
        server.socket.close()


def _forget_metrics(pid: int) -> None:
    """A worker died: fold its metric files into the archive and remove them."""
    try:
        mark_dead(pid)
    except OSError as exc:  # metrics are not worth stopping for
        log.warning("metrics files of pid %d: %s", pid, exc)
