"""Worker processes: one supervisor, N workers, both binaries.

Python runs one event loop per process on one core; workers use the others.
The supervisor is the process the user starts. It reads and validates the
config once, starts the workers, watches the file (and SIGHUP), and sends
each validated config to every worker; it forwards SIGTERM/SIGINT and exits
0 once every worker has drained. Workers accept and proxy; how they share
ports is the binary's business (tcpproxy: SO_REUSEPORT listeners of their
own; bpfproxy: listeners of one reuseport group, one of them in the sockmap).

Rules:
1. A worker runs the same service as a single process, but takes its
   configs from the supervisor over a socket pair (pickled, already
   validated) and answers each with ok or the reason it refused.
2. A reload is checked by the supervisor first (`Plan.check`: ports can be
   bound), so workers do not disagree; then sent to every worker. It is
   all or nothing: if a worker refuses it or does not answer within
   ANSWER_TIMEOUT, or the plan's last step fails, the workers that applied
   it get the running config back and the reload is rejected; so the log,
   /status and every worker agree on what runs. A worker that cannot be
   brought back (no answer, or it refuses the running config) is stopped
   and started again with the config in force.
3. A worker that dies on its own is started again after RESPAWN_DELAY with
   the config in force; a worker that cannot start at all (exit code 2)
   stops the supervisor with that error.
4. Workers stop with their supervisor, so no worker is left serving a
   config nobody watches: the end of the socket pair (EOF, however the
   supervisor died) stops a worker as SIGTERM does, draining. Not
   PR_SET_PDEATHSIG: it fires when the *thread* that forked the child exits,
   and trio forks from worker threads it retires after 10 s idle.
5. Workers run in a session of their own, so a terminal's Ctrl-C (sent to
   the whole foreground process group) reaches the supervisor only, which
   forwards it once: one Ctrl-C drains, a second one cuts.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import trio

from tcpproxy.config import Config
from tcpproxy.diff import format_ports
from tcpproxy.errors import StartupError
from tcpproxy.notify import Notifier, child_environment
from tcpproxy.reload import Reloader, digest
from tcpproxy.status import Loaded, counts_from_samples, snapshot
from tcpproxy.watch import watch_config

__all__ = [
    "RESPAWN_DELAY",
    "Plan",
    "Supervisor",
    "SupervisorLink",
    "worker_argv",
]

log = logging.getLogger("tcpproxy")

RESPAWN_DELAY = 1.0  # seconds before a worker that died is started again
READY_TIMEOUT = 60.0  # seconds a new worker may take to start serving
ANSWER_TIMEOUT = 30.0  # seconds a worker may take to apply a reload
EXIT_USAGE = 2  # a worker's exit code for "cannot start as configured"
_APPLIED = "applied"  # a worker's answer to a config it now serves


async def _recv(conn: Connection) -> Any:
    """Receive one message without blocking the event loop while none is there."""
    await trio.lowlevel.wait_readable(conn.fileno())
    return conn.recv()


class SupervisorLink:
    """A worker's end of its socket pair to the supervisor."""

    @classmethod
    def join(cls, worker: str) -> SupervisorLink:
        """Become the worker that `--worker FD:INDEX:COUNT` names (the caller sets
        up logging with `log_prefix`; `follow` stops us when the supervisor goes)."""
        fd, index, count = (int(part) for part in worker.split(":"))
        return cls(fd, index, count)

    @property
    def log_prefix(self) -> str:
        return f"[w{self.index}] "

    def __init__(self, fd: int, index: int, count: int) -> None:
        self._conn = Connection(fd)
        self.index = index
        self.count = count  # workers in all: limits are shared among them

    def initial_config(self) -> Config:
        """The config to start with (blocking: called before the event loop runs).

        Exits quietly if the supervisor is already gone.
        """
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise SystemExit(0) from None
        assert kind == "config", kind
        return pickle.loads(payload)

    async def follow(
        self, current: Callable[[], Config], apply: Callable[[Config, Config], Awaitable[None]]
    ) -> None:
        """Say ready, then apply every config the supervisor sends, answering each.

        When the supervisor is gone (EOF, or a send fails), stop as on SIGTERM
        (rule 4): drain, then exit.
        """
        try:
            self._conn.send(("ready", os.getpid()))
            while True:
                kind, payload = await _recv(self._conn)
                if kind != "config":
                    continue
                new: Config = pickle.loads(payload)
                try:
                    await apply(current(), new)
                except StartupError as exc:
                    self._conn.send(("refused", str(exc)))
                else:
                    self._conn.send((_APPLIED, ""))
        except (EOFError, OSError):
            log.warning("the supervisor is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)  # the service's own stop: drain, then exit
            await trio.sleep_forever()


class Plan(Protocol):
    """What differs between the binaries' workers."""

    name: str

    def check(self, old: Config, new: Config) -> None:
        """Raise StartupError if `new` cannot be served (before any worker sees it)."""

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], Sequence[int]]:
        """The command line of worker `index`, and the descriptors it inherits."""

    def worker_started(self, index: int) -> None:
        """After worker `index` started."""

    def worker_died(self, index: int) -> None:
        """Worker `index` exited on its own (bpfproxy: steer to a live listener)."""

    def before_workers(self, old: Config, new: Config) -> None:
        """A reload's first step (bpfproxy: stop steering removed ports)."""

    def after_workers(self, old: Config, new: Config) -> None:
        """A reload's last step (bpfproxy: steer added ports)."""

    def restore(self, config: Config) -> None:
        """Undo a reload's steps: serve `config` again (bpfproxy: its ports)."""

    def stopping(self) -> None:
        """Stop accepting for good (bpfproxy: close the supervisor's listener copies)."""


@dataclass
class _Run:
    """One start of a worker: its process and socket pair (a restart makes a new one)."""

    process: trio.Process
    conn: Connection
    inbox: trio.MemoryReceiveChannel[tuple[str, str]]
    ready: trio.Event = field(default_factory=trio.Event)
    dead: bool = False  # its socket pair closed: it exited or is exiting
    retiring: bool = False  # told to stop; started again with the config in force


@dataclass
class _Worker:
    index: int
    run: _Run | None = None

    @property
    def process(self) -> trio.Process | None:
        return self.run.process if self.run is not None else None


class Supervisor:
    """Starts, feeds and stops the workers.

    Resource handling: owns the worker processes and their socket pairs; on
    return every worker has exited.
    """

    def __init__(
        self,
        plan: Plan,
        path: Path,
        data: bytes,
        config: Config,
        workers: int,
        metrics_address: str | None = None,
        validate: Callable[[Config], None] | None = None,
    ) -> None:
        self._plan = plan
        self._validate = validate  # the reloader's check of a new config (Reloader)
        self._path = path
        self._data = data
        self.config = config
        self._workers = [_Worker(i) for i in range(workers)]
        self._stopping = False
        self._lock = trio.Lock()  # one reload or respawn at a time
        self._nursery: trio.Nursery | None = None
        self._metrics_address = metrics_address

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT and every worker has exited.

        Raises StartupError when a worker cannot start (the others are stopped).
        """
        notifier = Notifier()
        metrics_dir, metrics, server = None, None, None
        if self._metrics_address is not None:
            metrics_dir, metrics = self._start_metrics()
        reloader = Reloader(
            self._path, self._data, lambda: self.config, self._apply, notifier, metrics,
            self._validate,
        )  # fmt: skip
        if metrics is not None:
            metrics.config_loaded(reloader.digest)
            server = self._serve_metrics(metrics_dir, reloader)
        try:
            await self._run(notifier, reloader)
        finally:
            if server is not None:
                from tcpproxy.metrics import stop_http

                await stop_http(server)
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _start_metrics(self) -> tuple[str, Any]:
        """Workers write prometheus-client's multiprocess files; we serve their sum."""
        from tcpproxy.metrics import Metrics, parse_address

        assert self._metrics_address is not None
        parse_address(self._metrics_address)  # a bad address fails before any worker starts
        directory = tempfile.mkdtemp(prefix="tcpproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # read by prometheus-client's import
        return directory, Metrics()

    def _serve_metrics(self, directory: str | None, reloader: Reloader) -> Any:
        from tcpproxy.metrics import multiprocess_registry, parse_address, serve_http

        assert directory is not None and self._metrics_address is not None
        registry = multiprocess_registry(directory)

        def status() -> dict[str, Any]:
            samples = (sample for metric in registry.collect() for sample in metric.samples)
            loaded = Loaded(str(self._path), reloader.digest, reloader.loaded_at, reloader.last)
            return snapshot(
                self._plan.name, os.getpid(), loaded, self.config,
                counts_from_samples(samples), workers=len(self._workers),
            )  # fmt: skip

        return serve_http(*parse_address(self._metrics_address), status, registry)

    async def _run(self, notifier: Notifier, reloader: Reloader) -> None:

        def status() -> str:
            return (
                f"{len(self._workers)} workers, {len(self.config.apps)} apps, "
                f"{len(self.config.ports)} ports, last reload: {reloader.last}"
            )

        startup_error: StartupError | None = None
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    for worker in self._workers:
                        async with self._lock:
                            await self._start(worker)
                except StartupError as exc:
                    startup_error = exc
                    await self._stop_and_wait(signal.SIGTERM)
                    nursery.cancel_scope.cancel()
                else:
                    for worker in self._workers:
                        nursery.start_soon(self._watch_worker, worker)
                    await nursery.start(watch_config, self._path, reloader.request)
                    nursery.start_soon(reloader.run, status)
                    notifier.ready(status())
                    nursery.start_soon(notifier.watchdog, status)
                    log.info(
                        "%s started: %d workers, %d apps, ports %s, config %s",
                        self._plan.name, len(self._workers), len(self.config.apps),
                        format_ports(self.config.ports), digest(self._data),
                    )  # fmt: skip
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            reloader.request("SIGHUP")
                            continue
                        log.info("%s: stopping %d workers", signal.Signals(signum).name,
                                 len(self._workers))  # fmt: skip
                        nursery.start_soon(self._forward_later_signals, signals)
                        notifier.stopping(status())
                        await self._stop_and_wait(signum)
                        break
                    nursery.cancel_scope.cancel()
        if startup_error is not None:
            raise startup_error
        log.info("%s stopped", self._plan.name)

    async def _stop_and_wait(self, signum: int) -> None:
        self._stopping = True
        self._plan.stopping()
        self._stop_all(signum)
        for worker in self._workers:
            if worker.process is not None:
                await worker.process.wait()

    async def _forward_later_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGINT:
                log.info("SIGINT again: workers close their connections now")
                self._stop_all(signal.SIGINT)

    def _stop_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                try:
                    worker.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _watch_worker(self, worker: _Worker) -> None:
        """Start a worker again whenever it dies on its own (rule 3)."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            self._plan.worker_died(worker.index)
            if self._metrics_address is not None:
                from tcpproxy.metrics import mark_dead

                try:
                    mark_dead(worker.process.pid)
                except OSError as exc:  # metrics are not worth stopping for
                    log.warning("metrics files of pid %d: %s", worker.process.pid, exc)
            log.error("worker %d (pid %d) died (exit code %s); starting it again in %gs",
                      worker.index, worker.process.pid, code, RESPAWN_DELAY)  # fmt: skip
            await trio.sleep(RESPAWN_DELAY)
            try:
                async with self._lock:
                    if self._stopping:  # checked under the lock: no start after a stop
                        return
                    await self._start(worker)
            except (StartupError, OSError) as exc:  # tried again after RESPAWN_DELAY
                log.error("worker %d could not be started again: %s", worker.index, exc)

    async def _start(self, worker: _Worker) -> None:
        """Start one worker with the config in force; return once it serves.

        Raises StartupError when it exits instead (its own message is on stderr).
        """
        assert self._nursery is not None
        ours, theirs = socket.socketpair()
        try:
            argv, fds = self._plan.worker_argv(worker.index, theirs.fileno())
            process = await trio.lowlevel.open_process(
                argv,
                pass_fds=(theirs.fileno(), *fds),
                stdin=subprocess.DEVNULL,
                env=child_environment(),  # systemd talks to the supervisor only
                start_new_session=True,  # signals come from us only (rule 5)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._plan.worker_started(worker.index)
        run = self._attach(worker, process, Connection(ours.detach()))
        await self._send(run, self.config)
        with trio.move_on_after(READY_TIMEOUT):
            await run.ready.wait()
        if process.returncode is None and run.ready.is_set() and not run.dead:
            return
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
        raise StartupError(f"worker {worker.index} did not start (exit code {process.returncode})")

    def _attach(self, worker: _Worker, process: trio.Process, conn: Connection) -> _Run:
        """Make `process`, talking over `conn`, the current run of `worker`."""
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[tuple[str, str]](16)
        run = worker.run = _Run(process, conn, receive)
        self._nursery.start_soon(self._read_answers, run, send)
        return run

    async def _read_answers(self, run: _Run, send: trio.MemorySendChannel[tuple[str, str]]) -> None:
        try:
            while True:
                kind, payload = await _recv(run.conn)
                if kind == "ready":
                    run.ready.set()
                else:
                    await send.send((kind, payload))
        except (EOFError, OSError):
            pass
        finally:
            run.dead = True
            run.conn.close()
            await send.aclose()
            run.ready.set()  # wakes a starter waiting for a worker that died

    async def _send(self, run: _Run, config: Config) -> None:
        await trio.to_thread.run_sync(run.conn.send, ("config", pickle.dumps(config)))

    async def _apply(self, old: Config, new: Config) -> None:
        """A reload across every worker, all or nothing (rule 2).

        Raises StartupError, with `old` in force again everywhere, to reject it.
        """
        self._plan.check(old, new)
        async with self._lock:
            applied: list[_Worker] = []
            try:
                self._plan.before_workers(old, new)
                applied, refused = await self._offer_all(new)
                if refused:
                    raise StartupError(
                        f"{len(refused)} of {len(self._workers)} workers did not apply it: "
                        + "; ".join(refused)
                    )
                self._plan.after_workers(old, new)
            except StartupError as exc:
                problem = await self._roll_back(applied, old)
                if problem:
                    raise StartupError(f"{exc}; rolling back: {problem}") from None
                raise
            self.config = new

    async def _offer_all(self, config: Config) -> tuple[list[_Worker], list[str]]:
        """Send `config` to every worker at once: (those that applied it, why others did not).

        A worker that is gone (or going) is neither: it starts again with the
        config in force once the reload is over.
        """
        outcomes: dict[int, str | None] = {}

        async def offer(worker: _Worker) -> None:
            outcomes[worker.index] = await self._offer(worker, config)

        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(offer, worker)
        applied = [w for w in self._workers if outcomes.get(w.index) == _APPLIED]
        refused = [
            f"worker {index}: {why}"
            for index, why in sorted(outcomes.items())
            if why not in (_APPLIED, None)
        ]
        return applied, refused

    async def _offer(self, worker: _Worker, config: Config) -> str | None:
        """_APPLIED, None if the worker is gone, or why it did not apply `config`.

        A worker that does not answer in time is killed (its answer would come
        too late to mean anything) and so starts again with the config in force.
        """
        run = worker.run
        if run is None or run.dead or run.retiring or run.process.returncode is not None:
            return None
        try:
            await self._send(run, config)
            with trio.move_on_after(ANSWER_TIMEOUT):
                kind, why = await run.inbox.receive()
                return _APPLIED if kind == _APPLIED else why
        except (OSError, trio.EndOfChannel):
            return None
        self._retire(worker, signal.SIGKILL)
        return f"no answer within {ANSWER_TIMEOUT:g}s (restarting it)"

    async def _roll_back(self, applied: list[_Worker], old: Config) -> str:
        """Serve `old` again: in the workers that applied the new config, and
        in the plan. Returns what could not be undone ("" if nothing)."""
        problems = []
        for worker in applied:
            why = await self._offer(worker, old)
            if why not in (_APPLIED, None):
                problems.append(f"worker {worker.index} kept the new config ({why})")
                if worker.run is not None and not worker.run.retiring:
                    self._retire(worker, signal.SIGTERM)
        try:
            self._plan.restore(old)
        except StartupError as exc:
            problems.append(f"restoring {self._plan.name}'s own state: {exc}")
        if applied:
            log.info("reload: the %d workers that had applied it were sent the running config "
                     "again", len(applied))  # fmt: skip
        return "; ".join(problems)

    def _retire(self, worker: _Worker, signum: int) -> None:
        """Stop a worker that does not run the config in force; _watch_worker
        starts it again with that config once it has exited."""
        run = worker.run
        assert run is not None
        run.retiring = True
        log.warning("worker %d: stopping it (%s) to start it again with the config in force",
                    worker.index, signal.Signals(signum).name)  # fmt: skip
        try:
            run.process.send_signal(signum)
        except ProcessLookupError:
            pass


def worker_argv(
    module: str, control_fd: int, index: int, count: int, options: list[str]
) -> list[str]:
    """A worker's command line: the same binary, told it is worker `index` of `count`."""
    return [sys.executable, "-m", module, *options, "--worker", f"{control_fd}:{index}:{count}"]
