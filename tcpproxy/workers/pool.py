"""The worker processes: start, respawn and stop them; their socket pairs and answers.

Rules:
1. Every start gets the config in force (`Pool.config`), and waits until the
   worker says it serves; a worker that cannot start at all (it exits, e.g.
   with code 2) raises StartupError, which stops the supervisor.
2. A worker that dies on its own is started again after RESPAWN_DELAY with
   the config in force.
3. On a stop, a worker still running after the drain timeout + STOP_GRACE
   is killed: a hung or stopped worker cannot hold the supervisor forever.
4. Workers run in a session of their own, so a terminal's Ctrl-C (sent to
   the whole foreground process group) reaches the supervisor only, which
   forwards it once: one Ctrl-C drains, a second one cuts.
5. An upgrade asks every live worker for its listening sockets
   (`collect_listeners`, under the lock: no reload or start meanwhile); a
   worker that does not hand them over within LISTENERS_TIMEOUT fails the
   upgrade (its queued connections would be reset when it closes them).
"""

from __future__ import annotations

import logging
import math
import pickle
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import trio

from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.notify import child_environment
from tcpproxy.workers.link import LISTENERS, recv, recv_listeners, send
from tcpproxy.workers.plan import Plan

__all__ = ["RESPAWN_DELAY", "STOP_GRACE", "Pool", "Run", "Worker"]

log = logging.getLogger("tcpproxy")

RESPAWN_DELAY = 1.0  # seconds before a worker that died is started again
READY_TIMEOUT = 60.0  # seconds a new worker may take to start serving
STOP_GRACE = 5.0  # seconds a stopping worker gets past the drain timeout before SIGKILL
LISTENERS_TIMEOUT = 5.0  # seconds a worker may take to hand over its listeners (an upgrade)

Listeners = dict[int, socket.socket]  # a worker's listening sockets by port


@dataclass
class Run:
    """One start of a worker: its process and socket pair (a restart makes a new one)."""

    process: trio.Process
    conn: Connection
    inbox: trio.MemoryReceiveChannel[tuple[str, str]]  # its answers, "ready" aside
    ready: trio.Event = field(default_factory=trio.Event)
    dead: bool = False  # its socket pair closed: it exited or is exiting
    retiring: bool = False  # told to stop; started again with the config in force
    # its answers to LISTENERS: the sockets, or why they did not arrive
    listeners: tuple[trio.MemorySendChannel[Listeners | str],
                     trio.MemoryReceiveChannel[Listeners | str]] = field(
        default_factory=lambda: trio.open_memory_channel[Listeners | str](math.inf)
    )  # fmt: skip


@dataclass
class Worker:
    index: int
    run: Run | None = None

    @property
    def process(self) -> trio.Process | None:
        return self.run.process if self.run is not None else None


class Pool:
    """The workers, and the config in force that every (re)start gets.

    Resource handling: owns the worker processes and their socket pairs; once
    `stop_and_wait` returns every worker has exited. Its tasks (answer
    readers, watchers) run in `nursery`, which the supervisor sets first.

    Args:
      died: called with the pid of a worker that died on its own (the
        supervisor drops its metric files).
      changed: called once the plan was told a worker started or died (its
        listeners may have changed: the supervisor keeps the store in step).
    """

    def __init__(
        self,
        plan: Plan,
        config: Config,
        count: int,
        died: Callable[[int], None] | None = None,
        changed: Callable[[], None] | None = None,
    ) -> None:
        self._plan = plan
        self._died = died
        self._changed = changed
        self.config = config  # the config in force; changed under `lock` (fanout)
        self.workers = [Worker(i) for i in range(count)]
        self.lock = trio.Lock()  # one reload or (re)start at a time
        self.nursery: trio.Nursery | None = None
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """`stop_and_wait` was called: no worker is started again."""
        return self._stopping

    async def start_all(self) -> None:
        """Start every worker in turn; raises StartupError if one cannot start."""
        for worker in self.workers:
            async with self.lock:
                await self.start(worker)

    def watch_all(self) -> None:
        """From now on, start again every worker that dies on its own (rule 2)."""
        assert self.nursery is not None
        for worker in self.workers:
            self.nursery.start_soon(self._watch, worker)

    async def stop_and_wait(self, signum: int, drain_timeout: float) -> None:
        """Send `signum` to every worker and wait until all have exited.

        A worker still running `drain_timeout` + STOP_GRACE later cannot drain
        (hung, stopped) and would hold the supervisor forever: it is killed.
        """
        self._stopping = True
        self._plan.stopping()
        self.signal_all(signum)
        limit = drain_timeout + STOP_GRACE
        with trio.move_on_after(limit):
            for worker in self.workers:
                if worker.process is not None:
                    await worker.process.wait()
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                log.error("worker %d (pid %d) did not stop within %gs: killing it",
                          worker.index, process.pid, limit)  # fmt: skip
                process.kill()
                await process.wait()

    async def collect_listeners(self) -> dict[int, Listeners]:
        """Each live worker's listening sockets by port (rule 5; the caller holds
        `lock`): references of our own, the caller's to close. A worker that is
        gone or going has none to give (its successor binds anew).

        Raises StartupError naming a worker that did not hand them over.
        """
        collected: dict[int, Listeners] = {}
        try:
            for worker in self.workers:
                run = worker.run
                if run is None or run.dead or run.retiring or run.process.returncode is not None:
                    continue
                _close_stale(run)
                with trio.move_on_after(LISTENERS_TIMEOUT):
                    try:
                        await send(run.conn, (LISTENERS, ""))
                        answer = await run.listeners[1].receive()
                    except (OSError, trio.EndOfChannel):
                        continue  # it exited meanwhile: it has none
                    if isinstance(answer, str):
                        raise StartupError(f"worker {worker.index}: {answer}")
                    collected[worker.index] = answer
                    continue
                raise StartupError(
                    f"worker {worker.index} did not hand over its listeners within "
                    f"{LISTENERS_TIMEOUT:g}s"
                )
        except BaseException:
            for sockets in collected.values():
                for sock in sockets.values():
                    sock.close()
            raise
        return collected

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                try:
                    worker.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _watch(self, worker: Worker) -> None:
        """Start a worker again whenever it dies on its own (rule 2)."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            self._plan.worker_died(worker.index)
            if self._changed is not None:
                self._changed()
            if self._died is not None:
                self._died(worker.process.pid)
            log.error("worker %d (pid %d) died (exit code %s); starting it again in %gs",
                      worker.index, worker.process.pid, code, RESPAWN_DELAY)  # fmt: skip
            await trio.sleep(RESPAWN_DELAY)
            try:
                async with self.lock:
                    if self._stopping:  # checked under the lock: no start after a stop
                        return
                    await self.start(worker)
            except (StartupError, OSError) as exc:  # tried again after RESPAWN_DELAY
                log.error("worker %d could not be started again: %s", worker.index, exc)

    async def start(self, worker: Worker) -> None:
        """Start one worker with the config in force; return once it serves.

        Raises StartupError when it exits instead (its own message is on stderr).
        """
        assert self.nursery is not None
        ours, theirs = socket.socketpair()
        try:
            argv, fds = self._plan.worker_argv(worker.index, theirs.fileno())
            process = await trio.lowlevel.open_process(
                argv,
                pass_fds=(theirs.fileno(), *fds),
                stdin=subprocess.DEVNULL,
                env=child_environment(),  # systemd talks to the supervisor only
                start_new_session=True,  # signals come from us only (rule 4)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._plan.worker_started(worker.index)
        if self._changed is not None:
            self._changed()
        run = self.attach(worker, process, Connection(ours.detach()))
        with trio.move_on_after(READY_TIMEOUT):
            try:
                await self.send(run, self.config)
            except OSError:  # it exited already: told below
                pass
            else:
                await run.ready.wait()
        if process.returncode is None and run.ready.is_set() and not run.dead:
            return
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
        raise StartupError(f"worker {worker.index} did not start (exit code {process.returncode})")

    def attach(self, worker: Worker, process: trio.Process, conn: Connection) -> Run:
        """Make `process`, talking over `conn`, the current run of `worker`."""
        assert self.nursery is not None
        send, receive = trio.open_memory_channel[tuple[str, str]](16)
        run = worker.run = Run(process, conn, receive)
        self.nursery.start_soon(self._read_answers, run, send)
        return run

    async def _read_answers(self, run: Run, send: trio.MemorySendChannel[tuple[str, str]]) -> None:
        try:
            while True:
                kind, payload = await recv(run.conn)
                if kind == "ready":
                    run.ready.set()
                elif kind == LISTENERS:
                    try:
                        sockets: Listeners | str = await recv_listeners(run.conn, payload)
                    except OSError as exc:
                        sockets = str(exc)
                    run.listeners[0].send_nowait(sockets)
                else:
                    await send.send((kind, payload))
        except (EOFError, OSError):
            pass
        finally:
            run.dead = True
            run.conn.close()
            await send.aclose()
            run.listeners[0].close()
            run.ready.set()  # wakes a starter waiting for a worker that died

    async def send(self, run: Run, config: Config) -> None:
        """Send `config` to a worker; the caller's cancel scope bounds it (a
        worker that does not read must not hold the pool's lock)."""
        await send(run.conn, ("config", pickle.dumps(config)))

    def retire(self, worker: Worker, signum: int) -> None:
        """Stop a worker that does not run the config in force; `_watch` starts
        it again with that config once it has exited."""
        run = worker.run
        assert run is not None
        run.retiring = True
        log.warning("worker %d: stopping it (%s) to start it again with the config in force",
                    worker.index, signal.Signals(signum).name)  # fmt: skip
        try:
            run.process.send_signal(signum)
        except ProcessLookupError:
            pass


def _close_stale(run: Run) -> None:
    """Close the sockets of an answer that came after an earlier request gave up."""
    while True:
        try:
            answer = run.listeners[1].receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        if not isinstance(answer, str):
            for sock in answer.values():
                sock.close()
