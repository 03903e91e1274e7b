"""A node's record in etcd, PREFIX/nodes/<node-id>: what it applied, kept alive under a lease.

The record (JSON) says which revision of the prefix the node applied, the
digest of that config, the apps and ports it serves, the apps it rejects and
why, its version and start time, and when it applied. It lives under a lease
of LEASE_TTL seconds, refreshed every KEEPALIVE_EVERY: a node that dies (or
loses etcd) disappears on its own; a clean stop revokes the lease at once.
An upgrade's new process publishes under a lease of its own, so the old one's
revoke does not remove the record.
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
from tcpproxy.fleet.client import EtcdClient, EtcdError, EtcdLeaseExpired
from tcpproxy.fleet.url import EtcdTarget
from tcpproxy.reload import digest

__all__ = ["KEEPALIVE_EVERY", "LEASE_TTL", "Publisher", "node_record"]

log = logging.getLogger("tcpproxy")

LEASE_TTL = 10  # seconds a node's record outlives its last keep-alive
KEEPALIVE_EVERY = LEASE_TTL / 3  # two keep-alives may be lost before the record goes
RETRY_FIRST = 0.5  # seconds before retrying etcd after a failure (doubling)
RETRY_MAX = 8.0
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
    (etcd was away longer than LEASE_TTL) is replaced by a new one.
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
        delay = RETRY_FIRST
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
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX)

    async def _publish(self, client: Any) -> None:
        self.lease = await client.grant_lease(LEASE_TTL)
        written: dict[str, Any] | None = None
        while True:
            try:
                record = self.record()
                if record is not None and record is not written:
                    written = record
                    self._changed = trio.Event()
                    await client.put(self.key, json.dumps(written).encode(), lease=self.lease)
                with trio.move_on_after(KEEPALIVE_EVERY) as timer:
                    await self._changed.wait()
                if timer.cancelled_caught:
                    await client.keep_alive(self.lease)
            except EtcdLeaseExpired:  # etcd was away longer than the lease
                log.info("node record %s: lease expired; publishing again", self.key)
                self.lease = await client.grant_lease(LEASE_TTL)
                written = None

    async def _revoke(self, client: Any) -> None:
        lease, self.lease = self.lease, 0
        if not lease:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(REVOKE_TIMEOUT):
            try:
                await client.revoke(lease)
            except EtcdError:
                pass  # it expires by itself
