"""The etcd config source and the node record, in-process against a real etcd (never mocked)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tcpproxy.config import ConfigError, parse_config
from tcpproxy.fleet.client import EtcdClient, Watch
from tcpproxy.fleet.publish import Publisher
from tcpproxy.fleet.source import EtcdSource
from tcpproxy.fleet.url import parse_etcd_url
from tests.etcd_server import EtcdCluster
from tests.helpers import free_port

P = "/fleet"
WAIT = 20.0  # seconds a change may take to arrive (outages included)


def app(port: int, **options: object) -> str:
    return json.dumps({"Ports": [port], "Targets": ["127.0.0.1:9"], **options})


class Changes:
    """on_change for the source: counts calls."""

    def __init__(self) -> None:
        self.whys: list[str] = []

    def __call__(self, why: str) -> None:
        self.whys.append(why)


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def ports(source: EtcdSource) -> dict[str, tuple[int, ...]]:
    assert source.assembly is not None
    return {a.name: a.ports for a in source.assembly.config.apps}


async def test_reads_at_one_revision_then_follows_every_change(etcd: EtcdCluster) -> None:
    etcd.put(f"{P}/defaults", '{"ConnectTimeout": 4}')
    revision = etcd.put(f"{P}/apps/web", app(8001))
    source = EtcdSource(parse_etcd_url(etcd.url(P)))
    contents = await source.load()
    assert contents.stamp == revision
    assert contents.config is not None and parse_config(contents.data) == contents.config
    assert contents.config.apps[0].connect_timeout == 4.0
    changes = Changes()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.watch, changes)
        etcd.put(f"{P}/apps/db", app(8002))
        await until(lambda: ports(source) == {"web": (8001,), "db": (8002,)})
        etcd.delete(f"{P}/apps/web")
        await until(lambda: ports(source) == {"db": (8002,)})
        etcd.put(f"{P}/nodes/other", "{}")  # another node's record changes no config
        last = etcd.put(f"{P}/apps/db", app(8003))
        await until(lambda: ports(source) == {"db": (8003,)})
        assert source.revision == last
        nursery.cancel_scope.cancel()
    assert len(changes.whys) == 3
    assert changes.whys[-1] == f"etcd revision {last}"


async def test_rejections_are_logged_once_and_cleared(
    etcd: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tcpproxy")
    etcd.put(f"{P}/apps/web", app(8001))
    source = EtcdSource(parse_etcd_url(etcd.url(P)))
    await source.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.watch, Changes())
        bad = etcd.put(f"{P}/apps/web", app(8001, ConnectTimeout=0))
        await until(lambda: "web" in source.rejected())
        etcd.put(f"{P}/apps/other", app(8002))
        etcd.put(f"{P}/stray", "x")
        await until(lambda: "other" in ports(source))
        assert ports(source)["web"] == (8001,)  # its last good version
        assert source.rejected()["web"] == {
            "key": f"{P}/apps/web",
            "revision": bad,
            "reason": "ConnectTimeout: must be greater than 0, got 0",
        }
        etcd.put(f"{P}/apps/web", app(8005))
        await until(lambda: not source.rejected())
        nursery.cancel_scope.cancel()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"etcd: {P}/apps/web rejected at revision {bad}, keeping its version of revision 2: "
        "ConnectTimeout: must be greater than 0, got 0"
    ]
    assert any(f"ignoring key {P}/stray" in r.getMessage() for r in caplog.records)
    assert any("no longer rejected" in r.getMessage() for r in caplog.records)


async def test_compaction_during_an_outage_reads_the_prefix_again(
    etcd_cluster3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The watched member is the only endpoint: while it is down the others take
    changes and compact them away; once it is back the prefix is read again."""
    caplog.set_level(logging.INFO, "tcpproxy")
    cluster = etcd_cluster3
    cluster.put(f"{P}/apps/web", app(8001))
    only = parse_etcd_url(f"etcd://{cluster.members[0].endpoint}{P}")
    source = EtcdSource(only)
    await source.load()
    changes = Changes()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.watch, changes)
        await trio.to_thread.run_sync(cluster.stop, 0)
        cluster.put(f"{P}/apps/db", app(8002))
        cluster.delete(f"{P}/apps/web")
        cluster.compact()
        await trio.to_thread.run_sync(cluster.start, 0)
        await until(lambda: ports(source) == {"db": (8002,)})
        nursery.cancel_scope.cancel()
    text = caplog.text
    assert "was compacted" in text and "reading etcd://" in text


@pytest.mark.slow
async def test_no_etcd_and_no_cache_is_a_config_error() -> None:
    source = EtcdSource(parse_etcd_url(f"etcd://127.0.0.1:{free_port()}{P}"))
    with pytest.raises(ConfigError, match=r"etcd is unreachable .* no --etcd-cache"):
        await source.load()


@pytest.mark.slow
async def test_the_cache_is_written_on_each_change_and_started_from(
    etcd: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tcpproxy")
    cache = tmp_path / "cache.json"
    etcd.put(f"{P}/apps/web", app(8001))
    source = EtcdSource(parse_etcd_url(etcd.url(P)), cache=cache)
    await source.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.watch, Changes())
        assert parse_config(cache.read_bytes()).apps[0].ports == (8001,)
        etcd.put(f"{P}/apps/web", app(8009))
        await until(lambda: ports(source) == {"web": (8009,)})
        # the reloader tells the source what it applied; here nobody reloads: say it
        await source.applied(await source.read())
        nursery.cancel_scope.cancel()
    assert parse_config(cache.read_bytes()).apps[0].ports == (8009,)
    assert list(tmp_path.iterdir()) == [cache]  # no temporary file left
    etcd.close()
    again = EtcdSource(parse_etcd_url(etcd.url(P)), cache=cache)
    contents = await again.load()
    assert contents.config is not None and contents.config.apps[0].ports == (8009,)
    assert f"starting from the cache {cache}" in caplog.text


async def test_the_node_record_lives_under_a_lease_and_goes_at_a_clean_stop(
    etcd: EtcdCluster,
) -> None:
    target = parse_etcd_url(etcd.url(P))
    publisher = Publisher(target, "edge-1")
    config = parse_config(b'{"Apps": [{"Name": "web", "Ports": [81, 80], "Targets": ["a:1"]}]}')
    rejected = {"bad": {"key": f"{P}/apps/bad", "revision": 7, "reason": "nope"}}

    async def record() -> dict | None:
        async with EtcdClient(target) as client:
            kv = await client.get(f"{P}/nodes/edge-1")
        return json.loads(kv.value) if kv is not None else None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.applied(12, b"{}", config, rejected)
        with trio.fail_after(WAIT):
            while (found := await record()) is None or found["revision"] != 12:
                await trio.sleep(0.05)
        assert found["apps"] == {"web": [80, 81]}
        assert found["rejected"] == rejected
        assert found["node"] == "edge-1" and found["version"]
        assert found["applied_at"] >= found["started"]
        lease = publisher.lease
        async with EtcdClient(target) as client:
            assert await client.keep_alive(lease) > 0
        nursery.cancel_scope.cancel()
    assert await record() is None  # revoked, not left to expire


async def test_a_watch_that_ends_is_an_outage_and_resumes_after_the_last_revision(
    etcd: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault hook on the real client: its first watch ends after one batch."""
    ended: list[int] = []

    class EndingClient(EtcdClient):
        def watch(self, prefix: str, start_revision: int) -> Any:
            real = super().watch(prefix, start_revision)
            if ended:
                return real

            async def one_batch() -> AsyncIterator[Any]:
                async with real:
                    async for batch in real:
                        ended.append(batch[0])
                        yield batch
                        return

            return Watch(one_batch())

    etcd.put(f"{P}/apps/web", app(8001))
    source = EtcdSource(parse_etcd_url(etcd.url(P)), client=EndingClient)
    await source.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.watch, Changes())
        etcd.put(f"{P}/apps/a", app(8002))
        await until(lambda: bool(ended))
        etcd.put(f"{P}/apps/b", app(8003))  # while the watch is away, or after
        await until(lambda: set(ports(source)) == {"web", "a", "b"})
        nursery.cancel_scope.cancel()
    assert "the watch ended" in caplog.text
