"""A reload across workers is all or nothing: the fanout's side, with fake workers.

Each fake worker is a trio task on the far end of a real socket pair, speaking
the supervisor's protocol; what it does with each config is scripted.
"""

from __future__ import annotations

import json
import pickle
import signal
import socket
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import trio

from tcpproxy.config import Config, parse_config
from tcpproxy.errors import StartupError
from tcpproxy.reload import Reloader, digest
from tcpproxy.workers import fanout as fanout_module
from tcpproxy.workers.fanout import Fanout
from tcpproxy.workers.pool import Pool

OLD = b'{"Apps": [{"Name": "A", "Ports": [7001], "Targets": ["127.0.0.1:9"]}]}'
NEW = b'{"Apps": [{"Name": "A", "Ports": [7001, 7002], "Targets": ["127.0.0.1:9"]}]}'


def config(data: bytes) -> Config:
    return parse_config(data, "test")


class FakeProcess:
    """Stands in for trio.Process: records signals, never exits by itself."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


DEAF_FOR = 10.0  # seconds a "deaf" fake waits to be killed before it gives up (and closes)


class FakeWorker:
    """Applies, refuses or ignores each config, as `script` says, in order
    (its last entry repeats); "deaf" never reads at all (a stopped process),
    until it is killed."""

    def __init__(self, index: int, script: list[str]) -> None:
        self.index = index
        self.script = script
        self.seen: list[Config] = []
        self.running = config(OLD)
        self.process = FakeProcess(1000 + index)

    async def serve(self, conn: Connection) -> None:
        if self.script == ["deaf"]:
            with trio.move_on_after(DEAF_FOR):
                while signal.SIGKILL not in self.process.signals:
                    await trio.sleep(0.01)
            conn.close()  # killed: its end of the socket pair goes
            return
        while True:
            try:
                # the rest of a large message is written by the same event loop: read
                # it off the loop, as a worker (another process) would
                await trio.lowlevel.wait_readable(conn.fileno())
                _kind, payload = await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
            except EOFError:
                return
            new = pickle.loads(payload)
            self.seen.append(new)
            what = self.script[min(len(self.seen), len(self.script)) - 1]
            if what == "apply":
                self.running = new
                conn.send(("applied", ""))
            elif what == "refuse":
                conn.send(("refused", "cannot listen on port 7002: address already in use"))
            # "hang": no answer


class FakePlan:
    name = "fake"

    def __init__(self, fail_after: bool = False, fail_restore: bool = False) -> None:
        self.fail_after = fail_after
        self.fail_restore = fail_restore
        self.steered = config(OLD).ports

    def check(self, old: Config, new: Config) -> None:
        pass

    def before_workers(self, old: Config, new: Config) -> None:
        self.steered = old.ports & new.ports

    def after_workers(self, old: Config, new: Config) -> None:
        if self.fail_after:
            raise StartupError("port map: no room")
        self.steered = new.ports

    def restore(self, config: Config) -> None:
        if self.fail_restore:
            raise StartupError("port map: still no room")
        self.steered = config.ports


@pytest.fixture
async def make_fanout() -> AsyncIterator:
    """make_fanout(plan, *scripts) -> (Pool, Fanout, [FakeWorker]) wired together."""
    async with trio.open_nursery() as nursery:

        def make(plan: FakePlan, *scripts: list[str]) -> tuple[Pool, Fanout, list[FakeWorker]]:
            pool = Pool(plan, config(OLD), len(scripts))  # type: ignore[arg-type]
            pool.nursery = nursery
            fakes = []
            for worker, script in zip(pool.workers, scripts, strict=True):
                ours, theirs = socket.socketpair()
                fake = FakeWorker(worker.index, script)
                nursery.start_soon(fake.serve, Connection(theirs.detach()))
                pool.attach(worker, fake.process, Connection(ours.detach()))  # type: ignore[arg-type]
                fakes.append(fake)
            return pool, Fanout(pool, plan), fakes  # type: ignore[arg-type]

        yield make
        nursery.cancel_scope.cancel()


async def test_every_worker_applies(make_fanout) -> None:  # type: ignore[no-untyped-def]
    plan = FakePlan()
    pool, fanout, fakes = make_fanout(plan, ["apply"], ["apply"])
    await fanout.apply(config(OLD), config(NEW))
    assert pool.config == config(NEW)
    assert [f.running for f in fakes] == [config(NEW)] * 2
    assert plan.steered == {7001, 7002}


async def test_a_refusal_rolls_back_the_workers_that_applied(make_fanout) -> None:  # type: ignore[no-untyped-def]
    plan = FakePlan()
    pool, fanout, (first, second) = make_fanout(plan, ["apply"], ["refuse"])
    with pytest.raises(StartupError, match=r"1 of 2 workers did not apply it: worker 1: .*7002"):
        await fanout.apply(config(OLD), config(NEW))
    assert pool.config == config(OLD)
    assert first.seen == [config(NEW), config(OLD)]  # applied, then rolled back
    assert first.running == second.running == config(OLD)
    assert plan.steered == {7001}
    assert first.process.signals == second.process.signals == []


async def test_a_worker_that_does_not_answer_is_restarted_and_the_rest_rolled_back(
    make_fanout,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout_module, "ANSWER_TIMEOUT", 0.2)
    plan = FakePlan()
    pool, fanout, (first, second) = make_fanout(plan, ["apply"], ["hang"])
    with pytest.raises(StartupError, match=r"worker 1: no answer within 0.2s"):
        await fanout.apply(config(OLD), config(NEW))
    assert pool.config == config(OLD)
    assert first.running == config(OLD)
    assert second.process.signals == [signal.SIGKILL]  # started again with the old config
    assert pool.workers[1].run.retiring  # type: ignore[union-attr]
    # the next reload does not wait for it
    second.script.append("apply")
    with trio.fail_after(5):
        await fanout.apply(config(OLD), config(NEW))
    assert pool.config == config(NEW)


@pytest.mark.slow
async def test_a_worker_that_does_not_read_a_large_config_is_restarted(
    make_fanout,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped worker leaves a config bigger than the socket buffer half sent:
    the send is bounded by the answer timeout too, not left blocking the reload."""
    monkeypatch.setattr(fanout_module, "ANSWER_TIMEOUT", 2.0)  # the other takes it in time
    apps = [{"Name": f"A{i}", "Ports": [10000 + i], "Targets": ["127.0.0.1:9"]}
            for i in range(6000)]  # fmt: skip
    large = parse_config(json.dumps({"Apps": apps}).encode(), "test")
    assert len(pickle.dumps(large)) > 2 * 212992  # more than a socket pair buffers
    plan = FakePlan()
    pool, fanout, (first, second) = make_fanout(plan, ["apply"], ["deaf"])
    with trio.fail_after(DEAF_FOR * 2):
        with pytest.raises(StartupError, match=r"1 of 2 .* worker 1: no answer within 2s"):
            await fanout.apply(config(OLD), large)
    assert first.seen == [large, config(OLD)]  # applied, then rolled back
    assert second.process.signals == [signal.SIGKILL]  # started again with the old config
    assert pool.config == config(OLD)
    assert first.running == config(OLD)  # rolled back


async def test_a_failed_last_step_rolls_back_every_worker(make_fanout) -> None:  # type: ignore[no-untyped-def]
    plan = FakePlan(fail_after=True)
    pool, fanout, fakes = make_fanout(plan, ["apply"], ["apply"])
    with pytest.raises(StartupError, match="port map: no room"):
        await fanout.apply(config(OLD), config(NEW))
    assert pool.config == config(OLD)
    assert [f.running for f in fakes] == [config(OLD)] * 2
    assert plan.steered == {7001}


async def test_a_worker_refusing_the_rollback_is_restarted(make_fanout) -> None:  # type: ignore[no-untyped-def]
    plan = FakePlan(fail_after=True)
    _pool, fanout, (first, second) = make_fanout(plan, ["apply"], ["apply", "refuse"])
    with pytest.raises(StartupError, match=r"port map: no room; rolling back: worker 1 kept"):
        await fanout.apply(config(OLD), config(NEW))
    assert second.process.signals == [signal.SIGTERM]  # drains, then starts with the old config
    assert first.running == config(OLD)


async def test_the_reloader_reports_what_runs(make_fanout, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plan = FakePlan()
    pool, fanout, _ = make_fanout(plan, ["apply"], ["refuse", "apply"])
    reloader = Reloader(tmp_path / "config.json", OLD, lambda: pool.config, fanout.apply)
    (tmp_path / "config.json").write_bytes(NEW)
    assert await reloader._reload("SIGHUP") == "rejected"
    assert (reloader.digest, reloader.reloads, reloader.rejected) == (digest(OLD), 0, 1)
    assert await reloader._reload("SIGHUP") == "applied"
    assert (reloader.digest, reloader.reloads) == (digest(NEW), 1)


async def test_a_plan_that_cannot_restore_says_so(make_fanout) -> None:  # type: ignore[no-untyped-def]
    plan = FakePlan(fail_after=True, fail_restore=True)
    pool, fanout, fakes = make_fanout(plan, ["apply"], ["apply"])
    with pytest.raises(StartupError, match=r"rolling back: restoring fake's own state: .*still"):
        await fanout.apply(config(OLD), config(NEW))
    assert pool.config == config(OLD)
    assert [f.running for f in fakes] == [config(OLD)] * 2
