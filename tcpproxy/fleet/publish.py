"""A node's record in etcd, PREFIX/nodes/<node-id>: what it applied, kept alive under a lease.

The record (JSON) says which revision of the prefix the node applied, the
digest of that config, the apps and ports it serves, the apps it rejects and
why, its version and start time, and when it applied. It lives under a lease
of LEASE_TTL seconds, refreshed every KEEPALIVE_EVERY: a node that dies (or
loses etcd) disappears on its own; a clean stop revokes the lease at once.
An upgrade's new process publishes under a lease of its own, so the old one's
revoke does not remove the record. Two rules keep it so:

1. A publisher never overwrites a record of its node that a later-started
   process wrote (its successor): each put is a transaction guarded by the
   mod_revision it read. Otherwise the old process, applying a change in the
   hand-over window, would move the key to its own lease, and its revoke at
   exit would delete the record.
2. Every CHECK_EVERY keep-alives, the publisher reads its record back and
   puts it again when it is gone or not what it wrote (a predecessor's
   in-flight put, a delete by hand).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import trio

from tcpproxy import __version__
from tcpproxy.config import Config
from tcpproxy.fleet.assemble import key_root
from tcpproxy.fleet.client import EtcdClient, EtcdConflict, EtcdError, EtcdLeaseExpired
from tcpproxy.fleet.url import EtcdTarget
from tcpproxy.reload import digest

__all__ = ["KEEPALIVE_EVERY", "LEASE_TTL", "Publisher", "node_record"]

log = logging.getLogger("tcpproxy")

LEASE_TTL = 10  # seconds a node's record outlives its last keep-alive
KEEPALIVE_EVERY = LEASE_TTL / 3  # two keep-alives may be lost before the record goes
RETRY_FIRST = 0.5  # seconds before retrying etcd after a failure (doubling) ...
RETRY_MAX = 8.0  # ... up to this; back to RETRY_FIRST once etcd answers
CHECK_EVERY = 3  # keep-alives between reads of the record (rule 2): ~10 s, one range
PUT_ATTEMPTS = 3  # guarded puts tried when the record changes between read and write
REVOKE_TIMEOUT = 2.0  # seconds a clean stop waits to revoke the lease (else it expires)


def node_record(
    node: str,
    revision: object,
    data: bytes,
    config: Config,
    rejected: Mapping[str, Mapping[str, object]],
    started: float,
    applied_at: float,
) -> dict[str, Any]:
    """The record's contents (pure)."""
    return {
        "node": node,
        "revision": revision,
        "digest": digest(data),
        "apps": {app.name: sorted(app.ports) for app in config.apps},
        "rejected": {name: dict(why) for name, why in sorted(rejected.items())},
        "version": __version__,
        "started": started,
        "applied_at": applied_at,
    }


class Publisher:
    """Keeps PREFIX/nodes/<node> current while `run` runs.

    Resource handling: `run` holds one client and one lease; cancelled, it
    revokes the lease (shielded, at most REVOKE_TIMEOUT) and closes the client.
    Error handling: etcd unavailable: retried with back-off; an expired lease
    (etcd was away longer than LEASE_TTL) is replaced by a new one. A member
    that hangs gets a keep-alive's attempt for the client's KEEPALIVE_TIMEOUT
    (2 s), then the next member is asked: KEEPALIVE_EVERY + 2 s stays well
    inside LEASE_TTL, so the record outlives a hung member.
    """

    def __init__(self, target: EtcdTarget, node: str, client: Any = EtcdClient) -> None:
        self.key = f"{key_root(target.prefix)}nodes/{node}"
        self.node = node
        self.started = time.time()
        self._target = target
        self._client = client
        self._record: dict[str, Any] | None = None
        # what `applied` was told last, made into a record by `run` (off the reload's
        # path, and once for a burst of changes: 20,000 ports take milliseconds)
        self._pending: tuple[Any, ...] | None = None
        self._changed = trio.Event()
        self.lease = 0  # the lease in force (0: none)
        self._delay = RETRY_FIRST  # before the next retry; reset when etcd answers

    def applied(
        self,
        revision: object,
        data: bytes,
        config: Config,
        rejected: Mapping[str, Mapping[str, object]],
    ) -> None:
        """A config was applied (or the rejections changed): publish it now."""
        self._pending = (revision, data, config, rejected, time.time())
        self._changed.set()

    def record(self) -> dict[str, Any] | None:
        """The record to publish: the last one `applied` gave."""
        if self._pending is not None:
            revision, data, config, rejected, applied_at = self._pending
            self._pending = None
            self._record = node_record(
                self.node, revision, data, config, rejected, self.started, applied_at
            )
        return self._record

    async def run(self) -> None:
        while True:
            try:
                async with self._client(self._target) as client:
                    try:
                        await self._publish(client)
                    except trio.Cancelled:  # a clean stop (or an upgrade): gone at once
                        await self._revoke(client)
                        raise
            except EtcdError as exc:  # unavailable, or refusing us: retried
                log.debug("node record %s: etcd unavailable: %s", self.key, exc)
            await trio.sleep(self._delay * random.uniform(0.5, 1.0))
            self._delay = min(self._delay * 2, RETRY_MAX)

    async def _publish(self, client: Any) -> None:
        self.lease = await client.grant_lease(LEASE_TTL)
        self._delay = RETRY_FIRST  # a later outage starts its back-off afresh
        written: dict[str, Any] | None = None
        beats = 0
        while True:
            try:
                record = self.record()
                if record is not None and record is not written:
                    written = record
                    self._changed = trio.Event()
                    await self._put(client, json.dumps(written).encode())
                with trio.move_on_after(KEEPALIVE_EVERY) as timer:
                    await self._changed.wait()
                if timer.cancelled_caught:
                    await client.keep_alive(self.lease)
                    self._delay = RETRY_FIRST
                    beats += 1
                    check = written is not None and beats % CHECK_EVERY == 0
                    if check and not await self._intact(client, json.dumps(written).encode()):
                        written = None  # rule 2: put it again
            except EtcdLeaseExpired:  # etcd was away longer than the lease
                log.info("node record %s: lease expired; publishing again", self.key)
                self.lease = await client.grant_lease(LEASE_TTL)
                written = None

    async def _put(self, client: Any, value: bytes) -> None:
        """Write the record under our lease unless a later-started process wrote it (rule 1)."""
        for _attempt in range(PUT_ATTEMPTS):
            current = await client.get(self.key)
            if current is not None and _started(current.value) > self.started:
                log.info("node record %s: a process started later publishes it now", self.key)
                return
            seen = {self.key: current.mod_revision if current is not None else 0}
            try:
                await client.txn({self.key: value}, [], expect=seen, lease=self.lease)
                return
            except EtcdConflict:  # written meanwhile: read it again
                continue
        log.debug("node record %s: changing under us; put again at the next check", self.key)

    async def _intact(self, client: Any, value: bytes) -> bool:
        """Whether the record in etcd is still the one written, or a successor's (rule 2)."""
        current = await client.get(self.key)
        if current is not None and (
            current.value == value or _started(current.value) > self.started
        ):
            return True
        log.info("node record %s: %s; publishing again", self.key,
                 "gone" if current is None else "overwritten")  # fmt: skip
        return False

    async def _revoke(self, client: Any) -> None:
        lease, self.lease = self.lease, 0
        if not lease:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(REVOKE_TIMEOUT):
            try:
                await client.revoke(lease)
            except EtcdError:
                pass  # it expires by itself


def _started(value: bytes) -> float:
    """A record's start time; 0 for one that has none (any process may replace it)."""
    try:
        started = json.loads(value).get("started", 0)
    except (ValueError, AttributeError, RecursionError):
        return 0.0
    return float(started) if type(started) in (int, float) else 0.0
