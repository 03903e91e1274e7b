"""The supervisor: its workers, the config file and signals composed for one run.

The supervisor is the process the user starts with `--workers N`. It starts
the pool, watches the config file (and SIGHUP) and hands each reload to the
fanout; SIGTERM or SIGINT is forwarded to every worker once (a second SIGINT
again: workers then cut their connections), and it exits 0 once every worker
has drained (one still running after the drain timeout + STOP_GRACE is
killed). With `--metrics` it owns the directory of the workers'
multiprocess files and serves their sum, and /status.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tcpproxy.config import Config
from tcpproxy.diff import format_ports
from tcpproxy.errors import StartupError
from tcpproxy.metrics import (
    Metrics,
    mark_dead,
    multiprocess_registry,
    parse_address,
    serve_http,
    stop_http,
)
from tcpproxy.notify import Notifier
from tcpproxy.reload import Reloader, digest
from tcpproxy.sources.file import watch_config
from tcpproxy.status import Loaded, counts_from_samples, snapshot
from tcpproxy.workers.fanout import Fanout
from tcpproxy.workers.plan import Plan
from tcpproxy.workers.pool import Pool

__all__ = ["Supervisor"]

log = logging.getLogger("tcpproxy")


class Supervisor:
    """Starts, feeds and stops the workers.

    Resource handling: owns the pool (the worker processes and their socket
    pairs) and the metrics directory; on return every worker has exited and
    the directory is gone.
    """

    def __init__(
        self,
        plan: Plan,
        path: Path,
        data: bytes,
        config: Config,
        workers: int,
        metrics_address: str | None = None,
        *,
        drain_timeout: float,
        validate: Callable[[Config], None] | None = None,
    ) -> None:
        """`drain_timeout`: the workers' --drain-timeout; a worker still running
        that long (plus STOP_GRACE) after a stop is killed."""
        self._plan = plan
        self._validate = validate  # the reloader's check of a new config (Reloader)
        self._path = path
        self._data = data
        self._metrics_address = metrics_address
        self._drain_timeout = drain_timeout
        died = _forget_metrics if metrics_address is not None else None
        self.pool = Pool(plan, config, workers, died)
        self._fanout = Fanout(self.pool, plan)

    @property
    def config(self) -> Config:
        """The config every worker runs."""
        return self.pool.config

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT and every worker has exited.

        Raises StartupError when a worker cannot start (the others are stopped).
        """
        notifier = Notifier()
        metrics_dir, metrics, server = None, None, None
        if self._metrics_address is not None:
            metrics_dir, metrics = self._start_metrics()
        reloader = Reloader(
            self._path, self._data, lambda: self.config, self._fanout.apply, notifier, metrics,
            self._validate,
        )  # fmt: skip
        if metrics is not None:
            metrics.config_loaded(reloader.digest)
            server = self._serve_metrics(metrics_dir, reloader)
        try:
            await self._run(notifier, reloader)
        finally:
            if server is not None:
                await stop_http(server)
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _start_metrics(self) -> tuple[str, Metrics]:
        """Workers write prometheus-client's multiprocess files; we serve their sum."""
        assert self._metrics_address is not None
        parse_address(self._metrics_address)  # a bad address fails before any worker starts
        directory = tempfile.mkdtemp(prefix="tcpproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # read by prometheus-client's import
        return directory, Metrics()

    def _serve_metrics(self, directory: str | None, reloader: Reloader) -> Any:
        assert directory is not None and self._metrics_address is not None
        registry = multiprocess_registry(directory)

        def status() -> dict[str, Any]:
            samples = (sample for metric in registry.collect() for sample in metric.samples)
            loaded = Loaded(str(self._path), reloader.digest, reloader.loaded_at, reloader.last)
            return snapshot(
                self._plan.name, os.getpid(), loaded, self.config,
                counts_from_samples(samples), workers=len(self.pool.workers),
            )  # fmt: skip

        return serve_http(*parse_address(self._metrics_address), status, registry)

    async def _run(self, notifier: Notifier, reloader: Reloader) -> None:
        pool = self.pool

        def status() -> str:
            return (
                f"{len(pool.workers)} workers, {len(self.config.apps)} apps, "
                f"{len(self.config.ports)} ports, last reload: {reloader.last}"
            )

        startup_error: StartupError | None = None
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
        with trio.open_signal_receiver(*wanted) as signals:
            async with trio.open_nursery() as nursery:
                pool.nursery = nursery
                try:
                    await pool.start_all()
                except StartupError as exc:
                    startup_error = exc
                    await pool.stop_and_wait(signal.SIGTERM, self._drain_timeout)
                    nursery.cancel_scope.cancel()
                else:
                    pool.watch_all()
                    await nursery.start(watch_config, self._path, reloader.request)
                    nursery.start_soon(reloader.run, status)
                    notifier.ready(status())
                    nursery.start_soon(notifier.watchdog, status)
                    log.info(
                        "%s started: %d workers, %d apps, ports %s, config %s",
                        self._plan.name, len(pool.workers), len(self.config.apps),
                        format_ports(self.config.ports), digest(self._data),
                    )  # fmt: skip
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            reloader.request("SIGHUP")
                            continue
                        if signum == signal.SIGUSR2:  # its default action would kill us
                            log.warning("SIGUSR2 ignored: upgrades with --workers are not "
                                        "supported yet; restart instead")  # fmt: skip
                            continue
                        log.info("%s: stopping %d workers", signal.Signals(signum).name,
                                 len(pool.workers))  # fmt: skip
                        nursery.start_soon(self._forward_later_signals, signals)
                        notifier.stopping(status())
                        await pool.stop_and_wait(signum, self._drain_timeout)
                        break
                    nursery.cancel_scope.cancel()
        if startup_error is not None:
            raise startup_error
        log.info("%s stopped", self._plan.name)

    async def _forward_later_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGINT:
                log.info("SIGINT again: workers close their connections now")
                self.pool.signal_all(signal.SIGINT)


def _forget_metrics(pid: int) -> None:
    """A worker died: fold its metric files into the archive and remove them."""
    try:
        mark_dead(pid)
    except OSError as exc:  # metrics are not worth stopping for
        log.warning("metrics files of pid %d: %s", pid, exc)
