"""The etcd client against real etcd processes: reads, writes, leases, watches, failover."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tcpproxy.fleet.client import (
    PROBE_EVERY,
    PROBE_TIMEOUT,
    REQUEST_TIMEOUT,
    EtcdAuthFailed,
    EtcdClient,
    EtcdCompacted,
    EtcdConflict,
    EtcdError,
    EtcdLeaseExpired,
    EtcdUnavailable,
    Event,
    prefix_range_end,
)
from tcpproxy.fleet.publish import KEEPALIVE_EVERY, LEASE_TTL
from tcpproxy.fleet.url import EtcdTarget, parse_etcd_url
from tests.etcd_server import EtcdCluster
from tests.helpers import refused_port

P = "/fleet"


def _client(cluster: EtcdCluster, **options: object) -> EtcdClient:
    tls = {}
    if cluster.tls:
        tls = {
            "cacert": str(cluster.tls.cacert),
            "cert": str(cluster.tls.client_cert),
            "key": str(cluster.tls.client_key),
        }
    return EtcdClient(parse_etcd_url(cluster.url(P), **tls, **options))  # type: ignore[arg-type]


def _sockets_to(port: int) -> int:
    """TCP sockets this process holds whose peer is 127.0.0.1:``port`` (any state)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


async def _collect(watch_iter, until_revision: int, into: list[Event]) -> None:
    async for _revision, events in watch_iter:
        into.extend(events)
        if events[-1].mod_revision >= until_revision:
            return


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"") == b"\0"


async def test_range_at_revision_put_txn_delete(etcd: EtcdCluster) -> None:
    async with _client(etcd) as client:
        r1 = await client.put(f"{P}/apps/a", b"one")
        r2 = await client.put(f"{P}/apps/b", b"two")
        await client.put("/other/x", b"outside the prefix")
        r3 = await client.txn({f"{P}/apps/c": b"three", f"{P}/defaults": b"{}"}, [f"{P}/apps/a"])
        assert r1 < r2 < r3

        revision, kvs = await client.range_prefix(f"{P}/")
        assert revision >= r3
        assert {kv.key: kv.value for kv in kvs} == {
            f"{P}/apps/b": b"two",
            f"{P}/apps/c": b"three",
            f"{P}/defaults": b"{}",
        }
        assert {kv.mod_revision for kv in kvs if kv.key != f"{P}/apps/b"} == {r3}

        revision, kvs = await client.range_prefix(f"{P}/", r1)
        assert revision == r1
        assert [(kv.key, kv.value, kv.mod_revision) for kv in kvs] == [(f"{P}/apps/a", b"one", r1)]

        kv = await client.get(f"{P}/apps/b")
        assert kv is not None and (kv.value, kv.mod_revision) == (b"two", r2)
        assert await client.get(f"{P}/apps/a") is None
        r4 = await client.delete(f"{P}/apps/b")
        assert r4 > r3 and await client.get(f"{P}/apps/b") is None
        # etcd refuses a key twice in one transaction; nothing of it is applied
        with pytest.raises(Exception, match="duplicate key"):
            await client.txn({f"{P}/apps/d": b"x"}, [f"{P}/apps/d"])
        assert await client.get(f"{P}/apps/d") is None


async def test_txn_guards_apply_nothing_when_keys_changed(etcd: EtcdCluster) -> None:
    async with _client(etcd) as client:
        r1 = await client.put(f"{P}/apps/a", b"1")
        r2 = await client.put(f"{P}/apps/b", b"1")
        absent = f"{P}/apps/new"
        ok = await client.txn(
            {absent: b"x"}, [], expect={f"{P}/apps/a": r1, absent: 0}, quiet_since=(f"{P}/", r2)
        )
        assert (await client.get(absent)).mod_revision == ok  # type: ignore[union-attr]
        with pytest.raises(EtcdConflict):  # a key changed since r2
            await client.txn({f"{P}/apps/c": b"x"}, [], quiet_since=(f"{P}/apps/", r2))
        await client.delete(f"{P}/apps/b")
        with pytest.raises(EtcdConflict):  # b was deleted: only expect sees that
            await client.txn({f"{P}/apps/c": b"x"}, [f"{P}/apps/a"], expect={f"{P}/apps/b": r2})
        assert await client.get(f"{P}/apps/c") is None
        assert await client.get(f"{P}/apps/a") is not None


@pytest.mark.slow
async def test_lease_grant_keepalive_expiry_revoke(etcd: EtcdCluster) -> None:
    async with _client(etcd) as client:
        lease = await client.grant_lease(3)
        await client.put(f"{P}/nodes/n1", b"alive", lease=lease)
        for _ in range(8):  # refreshed well within and past its TTL, the key stays
            assert await client.keep_alive(lease) == 3
            await trio.sleep(0.5)
        assert await client.get(f"{P}/nodes/n1") is not None

        with trio.fail_after(15):  # no refresh: it expires and takes the key along
            while await client.get(f"{P}/nodes/n1") is not None:
                await trio.sleep(0.2)
        with pytest.raises(EtcdLeaseExpired):
            await client.keep_alive(lease)

        other = await client.grant_lease(60)
        await client.put(f"{P}/nodes/n2", b"alive", lease=other)
        await client.revoke(other)
        assert await client.get(f"{P}/nodes/n2") is None
        with pytest.raises(EtcdLeaseExpired):
            await client.revoke(other)


async def test_watch_from_a_revision_delivers_every_event(etcd: EtcdCluster) -> None:
    async with _client(etcd) as client:
        start = await client.put(f"{P}/apps/first", b"0")
        expected: list[tuple[str, str, bytes | None]] = [("put", f"{P}/apps/first", b"0")]
        last = start
        for i in range(30):
            key = f"{P}/apps/a{i % 7}"
            if i % 5 == 4:  # delete the key just written (deleting nothing makes no event)
                key = f"{P}/apps/a{(i - 1) % 7}"
                last = await client.delete(key)
                expected.append(("delete", key, None))
            else:
                last = await client.put(key, str(i).encode())
                expected.append(("put", key, str(i).encode()))
            await client.put("/elsewhere", b"not watched")
        seen: list[Event] = []
        with trio.fail_after(20):
            async with client.watch(f"{P}/", start) as watch:
                await _collect(watch, last, seen)
        assert [(e.kind, e.key, e.value) for e in seen] == expected
        revisions = [e.mod_revision for e in seen]
        assert revisions == sorted(revisions) and revisions[0] == start


async def test_watch_sees_live_changes_in_order(etcd: EtcdCluster) -> None:
    async with _client(etcd) as client:
        start = await client.put(f"{P}/defaults", b"{}")
        seen: list[Event] = []
        keys = [f"{P}/apps/x{i}" for i in range(20)]

        async def watcher(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with client.watch(f"{P}/", start + 1) as watch:
                task_status.started()
                async for _rev, events in watch:
                    seen.extend(events)
                    if seen[-1].key == keys[-1]:
                        return

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher)
                for key in keys:  # written while the watch runs
                    await client.put(key, key.encode())
        assert [e.key for e in seen] == keys


async def test_watch_from_a_compacted_revision_raises(etcd: EtcdCluster) -> None:
    async with _client(etcd) as client:
        old = await client.put(f"{P}/apps/a", b"1")
        await client.put(f"{P}/apps/a", b"2")
        now = await client.put(f"{P}/apps/a", b"3")
        await client.compact(now)
        with trio.fail_after(10), pytest.raises(EtcdCompacted) as info:
            async for _batch in client.watch(f"{P}/", old):
                pass
        assert info.value.compact_revision == now
        with pytest.raises(EtcdCompacted):
            await client.range_prefix(f"{P}/", old)


async def test_cancelled_watch_leaves_no_connection(etcd: EtcdCluster) -> None:
    port = etcd.members[0].client_port
    async with _client(etcd) as client:
        start = await client.put(f"{P}/apps/a", b"1")
        before = _sockets_to(port)  # the unary pool's keep-alive connection
        got = trio.Event()

        async def watcher() -> None:
            async for _batch in client.watch(f"{P}/", start):
                got.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher)
                await got.wait()
                assert _sockets_to(port) == before + 1
                nursery.cancel_scope.cancel()
        assert _sockets_to(port) == before
    assert _sockets_to(port) == 0  # and the client's own pool is closed on exit


async def test_failover_when_the_watched_member_stops(etcd_cluster3: EtcdCluster) -> None:
    cluster = etcd_cluster3
    first_port = cluster.members[0].client_port
    async with _client(cluster) as client:
        start = await client.put(f"{P}/apps/a0", b"0")  # answered by member 0, the first
        seen: list[Event] = []
        expected = [f"{P}/apps/a0"]
        with trio.fail_after(60):
            async with client.watch(f"{P}/", start) as watch:
                await _collect(watch, start, seen)
                assert _sockets_to(first_port) == 2  # the pool's and the watch's
                for i in range(1, 5):
                    await client.put(f"{P}/apps/a{i}", b"before")
                    expected.append(f"{P}/apps/a{i}")
                await trio.to_thread.run_sync(cluster.stop, 0)
                last = start
                for i in range(5, 15):  # written through the other members
                    last = await client.put(f"{P}/apps/a{i}", b"after")
                    expected.append(f"{P}/apps/a{i}")
                await _collect(watch, last, seen)
                # the broken connections were closed, not left in CLOSE_WAIT
                assert _sockets_to(first_port) == 0
        assert [e.key for e in seen] == expected
        revision, kvs = await client.range_prefix(f"{P}/")
        assert len(kvs) == 15 and revision >= last

        await trio.to_thread.run_sync(cluster.start, 0)  # back: reads work everywhere again
        assert await client.get(f"{P}/apps/a14") is not None


@pytest.mark.slow
async def test_unavailable_when_nothing_answers() -> None:
    target = parse_etcd_url(f"etcd://127.0.0.1:{refused_port()},127.0.0.1:{refused_port()}/p")
    async with EtcdClient(target, retry_for=1.0) as client:
        with trio.fail_after(10), pytest.raises(EtcdUnavailable) as info:
            await client.get("/p/x")
        for host, port in target.endpoints:
            assert f"{host}:{port}" in str(info.value)
        with trio.fail_after(10), pytest.raises(EtcdUnavailable):
            async for _batch in client.watch("/p/", 1):
                pass


@pytest.mark.parametrize("host", ["999.1.1.1", "[1::2::3]", "a..b", "l" * 64 + ".example"])
async def test_an_address_the_http_client_refuses_is_an_etcd_error(host: str) -> None:
    """parse_etcd_url refuses these; a target built otherwise still gets no traceback."""
    target = EtcdTarget(((host.strip("[]"), 1),), "/p")
    async with EtcdClient(target, retry_for=1.0) as client:
        with trio.fail_after(10), pytest.raises(EtcdError, match="bad address"):
            await client.get("/p/x")
        with trio.fail_after(10), pytest.raises(EtcdError, match="bad address"):
            async for _batch in client.watch("/p/", 1):
                pass


@pytest.mark.slow
async def test_tls_with_client_certificates(etcd_factory) -> None:
    cluster = etcd_factory(1, tls=True)
    assert cluster.url(P).startswith("etcds://")
    async with _client(cluster) as client:
        revision = await client.put(f"{P}/apps/secure", b"yes")
        async for _rev, events in client.watch(f"{P}/", revision):
            assert events[0].value == b"yes"
            break
    # without the CA the server's certificate is not trusted: no endpoint "answers"
    target = parse_etcd_url(cluster.url(P))
    async with EtcdClient(target, retry_for=0.5) as client:
        with trio.fail_after(10), pytest.raises(EtcdUnavailable, match="CERTIFICATE_VERIFY"):
            await client.get(f"{P}/apps/secure")


async def test_auth_with_password_from_the_environment(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    etcd.etcdctl("user", "add", "root:rootpw", "--interactive=false")
    etcd.etcdctl("user", "add", "fleet:fleetpw", "--interactive=false")
    etcd.etcdctl("role", "add", "fleet")
    etcd.etcdctl("role", "grant-permission", "fleet", "--prefix=true", "readwrite", f"{P}/")
    etcd.etcdctl("user", "grant-role", "fleet", "fleet")
    etcd.etcdctl("user", "grant-role", "root", "root")
    etcd.etcdctl("auth", "enable")

    monkeypatch.setenv("FLEET_PW", "fleetpw")
    async with _client(etcd, user="fleet", password_env="FLEET_PW") as client:
        revision = await client.put(f"{P}/apps/a", b"1")
        assert (await client.range_prefix(f"{P}/"))[1][0].value == b"1"
        async for _rev, events in client.watch(f"{P}/", revision):
            assert events[0].key == f"{P}/apps/a"
            break
        with pytest.raises(EtcdAuthFailed, match="permission denied"):
            await client.put("/outside", b"x")

    monkeypatch.setenv("FLEET_PW", "wrong")
    async with _client(etcd, user="fleet", password_env="FLEET_PW") as client:
        with pytest.raises(EtcdAuthFailed, match="fleet"):
            await client.get(f"{P}/apps/a")
    monkeypatch.delenv("FLEET_PW")
    async with _client(etcd, user="fleet", password_env="FLEET_PW") as client:
        with pytest.raises(EtcdAuthFailed, match=r"\$FLEET_PW"):
            await client.get(f"{P}/apps/a")
    async with _client(etcd) as client:  # no user: refused
        with pytest.raises(EtcdAuthFailed):
            await client.get(f"{P}/apps/a")


async def test_watch_from_now_resumes_where_it_was_after_failover(
    etcd_cluster3: EtcdCluster,
) -> None:
    """start_revision 0 ("from now") is pinned when the watch is created, so a
    reconnect does not skip what happened while it was away."""
    cluster = etcd_cluster3
    async with _client(cluster) as client:
        await client.put(f"{P}/before", b"not seen")
        with trio.fail_after(60):
            async with client.watch(f"{P}/", 0) as watch:
                seen: list[Event] = []
                async with trio.open_nursery() as nursery:

                    async def write_until_seen() -> None:
                        # the watch starts with the first read: write until it sees one
                        while True:
                            await client.put(f"{P}/apps/a", b"1")
                            await trio.sleep(0.2)

                    nursery.start_soon(write_until_seen)
                    async for _rev, events in watch:
                        seen.extend(events)
                        break
                    nursery.cancel_scope.cancel()
                await trio.to_thread.run_sync(cluster.stop, 0)
                last = await client.put(f"{P}/apps/b", b"written while the watch reconnects")
                await _collect(watch, last, seen)
        keys = [e.key for e in seen]
        assert keys[-1] == f"{P}/apps/b" and set(keys[:-1]) == {f"{P}/apps/a"}


@pytest.mark.slow
async def test_a_watch_whose_member_hangs_moves_to_another(
    etcd_cluster3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGSTOPped member keeps its connections open and silent: the probe of the
    silent watch notices, and the watch resumes on another member, missing nothing."""
    cluster = etcd_cluster3
    first_port = cluster.members[0].client_port
    async with _client(cluster) as client:
        start = await client.put(f"{P}/apps/a0", b"0")  # answered by member 0, the first
        seen: list[Event] = []
        with trio.fail_after(60):
            async with client.watch(f"{P}/", start) as watch:
                await _collect(watch, start, seen)
                await trio.sleep(PROBE_EVERY + 1)  # a probe of the live member passes
                assert _sockets_to(first_port) == 2  # the pool's and the watch's
                cluster.pause(0)
                try:
                    # written through member 1 (the test's requests skip a paused one)
                    last = await trio.to_thread.run_sync(cluster.put, f"{P}/apps/a1", b"1")
                    with trio.fail_after(PROBE_EVERY + PROBE_TIMEOUT + 7):
                        await _collect(watch, last, seen)
                    # the silent watch's connection and the probe's were closed
                    assert _sockets_to(first_port) == 0
                finally:
                    cluster.resume(0)
        assert [e.key for e in seen] == [f"{P}/apps/a0", f"{P}/apps/a1"]
    assert f"{cluster.members[0].endpoint} sent nothing for" in caplog.text
    assert "did not answer a probe" in caplog.text


@pytest.mark.slow
async def test_calls_and_watches_started_on_a_hung_member_go_to_the_next(
    etcd_cluster3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = etcd_cluster3
    first_port = cluster.members[0].client_port
    async with _client(cluster) as client:
        lease = await client.grant_lease(LEASE_TTL)  # member 0 answers
        start = await client.put(f"{P}/apps/a", b"1", lease=lease)
        cluster.pause(0)
        try:
            # a keep-alive lands well inside the lease's TTL: member 0 gets
            # KEEPALIVE_TIMEOUT, then the next answers
            with trio.fail_after(LEASE_TTL - KEEPALIVE_EVERY):
                assert await client.keep_alive(lease) == LEASE_TTL
            assert _sockets_to(first_port) == 0

            async with _client(cluster) as fresh:  # starts on member 0 again
                with trio.fail_after(REQUEST_TIMEOUT + 10):
                    assert (await fresh.get(f"{P}/apps/a")) is not None
            async with _client(cluster) as fresh:
                with trio.fail_after(REQUEST_TIMEOUT + 10):
                    async with fresh.watch(f"{P}/", start) as watch:
                        async for _rev, events in watch:
                            assert events[0].key == f"{P}/apps/a"
                            break
            assert _sockets_to(first_port) == 0
        finally:
            cluster.resume(0)
    assert f"{cluster.members[0].endpoint} did not answer in" in caplog.text
