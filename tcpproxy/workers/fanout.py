"""A reload across every worker, all or nothing: send it, collect the answers, roll back.

A reload is checked by the plan first (`Plan.check`: e.g. ports can be
bound), so workers do not disagree; then sent to every worker at once. If a
worker refuses it or does not answer within ANSWER_TIMEOUT, or the plan's
last step fails, the workers that applied it get the running config back
and the reload is rejected; so the log, /status and every worker agree on
what runs. A worker that cannot be brought back (no answer, or it refuses
the running config) is stopped, and the pool starts it again with the
config in force.
"""

from __future__ import annotations

import logging
import signal

import trio

from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.workers.link import APPLIED
from tcpproxy.workers.plan import Plan
from tcpproxy.workers.pool import Pool, Worker

__all__ = ["ANSWER_TIMEOUT", "Fanout"]

log = logging.getLogger("tcpproxy")

ANSWER_TIMEOUT = 30.0  # seconds a worker may take to apply a reload


class Fanout:
    """Applies reloads to a pool of workers, all or nothing (`apply`: a reloader's ApplyFn)."""

    def __init__(self, pool: Pool, plan: Plan) -> None:
        self._pool = pool
        self._plan = plan

    async def apply(self, old: Config, new: Config) -> None:
        """A reload across every worker; `new` is then the pool's config in force.

        Raises StartupError, with `old` in force again everywhere, to reject it.
        """
        self._plan.check(old, new)
        async with self._pool.lock:
            applied: list[Worker] = []
            try:
                self._plan.before_workers(old, new)
                applied, refused = await self._offer_all(new)
                if refused:
                    raise StartupError(
                        f"{len(refused)} of {len(self._pool.workers)} workers did not apply it: "
                        + "; ".join(refused)
                    )
                self._plan.after_workers(old, new)
            except StartupError as exc:
                problem = await self._roll_back(applied, old)
                if problem:
                    raise StartupError(f"{exc}; rolling back: {problem}") from None
                raise
            self._pool.config = new

    async def _offer_all(self, config: Config) -> tuple[list[Worker], list[str]]:
        """Send `config` to every worker at once: (those that applied it, why others did not).

        A worker that is gone (or going) is neither: it starts again with the
        config in force once the reload is over.
        """
        outcomes: dict[int, str | None] = {}

        async def offer(worker: Worker) -> None:
            outcomes[worker.index] = await self._offer(worker, config)

        workers = self._pool.workers
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(offer, worker)
        applied = [w for w in workers if outcomes.get(w.index) == APPLIED]
        refused = [
            f"worker {index}: {why}"
            for index, why in sorted(outcomes.items())
            if why not in (APPLIED, None)
        ]
        return applied, refused

    async def _offer(self, worker: Worker, config: Config) -> str | None:
        """APPLIED, None if the worker is gone, or why it did not apply `config`.

        A worker that does not answer in time (or does not even read the config,
        e.g. it is stopped) is killed (its answer would come too late to mean
        anything) and so starts again with the config in force.
        """
        run = worker.run
        if run is None or run.dead or run.retiring or run.process.returncode is not None:
            return None
        sent = False
        try:
            with trio.move_on_after(ANSWER_TIMEOUT):  # the send too: it may not read
                await self._pool.send(run, config)
                sent = True
                kind, why = await run.inbox.receive()
                return APPLIED if kind == APPLIED else why
        except (OSError, trio.EndOfChannel):
            return None
        self._pool.retire(worker, signal.SIGKILL)
        unread = "" if sent else "; it did not even read the config"
        return f"no answer within {ANSWER_TIMEOUT:g}s (restarting it{unread})"

    async def _roll_back(self, applied: list[Worker], old: Config) -> str:
        """Serve `old` again: in the workers that applied the new config, and
        in the plan. Returns what could not be undone ("" if nothing)."""
        problems = []
        for worker in applied:
            why = await self._offer(worker, old)
            if why not in (APPLIED, None):
                problems.append(f"worker {worker.index} kept the new config ({why})")
                if worker.run is not None and not worker.run.retiring:
                    self._pool.retire(worker, signal.SIGTERM)
        try:
            self._plan.restore(old)
        except StartupError as exc:
            problems.append(f"restoring {self._plan.name}'s own state: {exc}")
        if applied:
            log.info("reload: the %d workers that had applied it were sent the running config "
                     "again", len(applied))  # fmt: skip
        return "; ".join(problems)
