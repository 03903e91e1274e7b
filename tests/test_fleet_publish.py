"""A node's record in a real etcd: back after outages, and never lost in an upgrade."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio

from tcpproxy.config import parse_config
from tcpproxy.fleet.publish import KEEPALIVE_EVERY, Publisher
from tcpproxy.fleet.url import parse_etcd_url
from tests.etcd_server import EtcdCluster

P = "/fleet"
KEY = f"{P}/nodes/edge-1"
CONFIG = b'{"Apps": [{"Name": "web", "Ports": [7001], "Targets": ["10.0.0.1:80"]}]}'
OUTAGES = 6  # enough for a back-off that never resets to reach its 8 s ceiling
OUTAGE = 7.0  # seconds etcd is down: longer than a keep-alive period plus the client's
# retry budget (3.3 + 3 s), so each outage makes the publisher fail and grant anew
BACK_WITHIN = 3.0  # seconds after etcd answers again by which the record is re-put
RESTORED_WITHIN = 4 * KEEPALIVE_EVERY + 2  # a record deleted by hand is back (read every 3)


def _record(etcd: EtcdCluster) -> dict[str, Any] | None:
    """The record's value and lease as etcd has them, or None."""
    reply = etcd.request("/v3/kv/range", {"key": base64.b64encode(KEY.encode()).decode()})
    kvs = reply.get("kvs", [])
    if not kvs:
        return None
    return {**json.loads(base64.b64decode(kvs[0]["value"])), "lease": kvs[0].get("lease")}


async def _wait_for(etcd: EtcdCluster, check: Any, timeout: float) -> dict[str, Any] | None:
    """Poll the record until ``check(record)``; the last one read (checked by the caller)."""
    record = None
    with trio.move_on_after(timeout):
        while not check(record := await trio.to_thread.run_sync(_record, etcd)):
            await trio.sleep(0.1)
    return record


def _publisher(etcd: EtcdCluster) -> Publisher:
    publisher = Publisher(parse_etcd_url(etcd.url(P)), "edge-1")
    publisher.applied(1, CONFIG, parse_config(CONFIG), {})
    return publisher


@pytest.mark.slow
async def test_the_record_is_back_soon_after_each_outage(etcd: EtcdCluster) -> None:
    """The back-off starts afresh after each outage: however many came before, the
    record is re-put (under a new lease) within BACK_WITHIN of etcd's return."""
    publisher = _publisher(etcd)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        record = await _wait_for(etcd, lambda r: r is not None, 10)
        assert record is not None and record["started"] == publisher.started
        for outage in range(OUTAGES):
            lease = record["lease"]
            await trio.to_thread.run_sync(etcd.stop, 0)
            await trio.sleep(OUTAGE)
            await trio.to_thread.run_sync(etcd.start, 0)
            record = await _wait_for(
                etcd, lambda r, old=lease: r is not None and r["lease"] != old, BACK_WITHIN
            )
            assert record is not None and record["lease"] != lease, (
                f"outage {outage + 1}: record not re-put within {BACK_WITHIN}s: {record}"
            )
        nursery.cancel_scope.cancel()
    assert _record(etcd) is None  # revoked at the stop


@pytest.mark.slow
async def test_an_upgrade_never_leaves_the_node_without_its_record(etcd: EtcdCluster) -> None:
    """The old process applies a change after the new one published (the hand-over
    window), then stops (its lease revoked): the new process's record stays."""
    old = _publisher(etcd)
    async with trio.open_nursery() as nursery:
        old_scope = trio.CancelScope()

        async def run_old() -> None:
            with old_scope:
                await old.run()

        nursery.start_soon(run_old)
        record = await _wait_for(etcd, lambda r: r is not None, 10)
        assert record is not None and record["started"] == old.started

        await trio.sleep(0.01)  # a later start time
        new = _publisher(etcd)
        nursery.start_soon(new.run)
        record = await _wait_for(etcd, lambda r: r and r["started"] == new.started, 10)
        assert record is not None and record["started"] == new.started

        old.applied(2, CONFIG, parse_config(CONFIG), {})  # a change, in the window
        record = await _wait_for(etcd, lambda r: r and r["started"] == old.started, 2)
        assert record is not None and record["started"] == new.started, "overwritten"
        old_scope.cancel()  # "go", then the old process exits, revoking its lease
        await trio.sleep(0.5)
        record = await trio.to_thread.run_sync(_record, etcd)
        assert record is not None and record["started"] == new.started
        assert int(record["lease"]) == new.lease

        # rule 2: gone by any other way (a delete by hand), it is put again
        await trio.to_thread.run_sync(etcd.delete, KEY)
        record = await _wait_for(etcd, lambda r: r is not None, RESTORED_WITHIN)
        assert record is not None and record["started"] == new.started
        nursery.cancel_scope.cancel()
