"""A prefix in etcd as a config source: read it at one revision, follow it, outlive etcd's outages.

Rules:
1. Start (`load`): the whole prefix at one revision, assembled app by app
   (tcpproxy.fleet.assemble), judged against the config this node served
   before: the one an upgrade hands over, else the --etcd-cache file; so an
   app whose value is bad keeps its last good version across an upgrade or
   a restart. Without either (a cold start with no cache), a bad app is not
   served. etcd unreachable (or, in an upgrade, slower than `load_timeout`):
   the handed-over config or the cache, said so in the log; neither: a
   ConfigError (exit 2).
2. Follow (`watch`): a watch from the revision read + 1; each batch of
   events is applied to the keys held here and assembled again; a change of
   the config served asks the reloader (tcpproxy.reload) to apply it, which
   diffs it against what runs (unchanged apps and their connections are
   untouched). Events under nodes/ (the nodes' own records) change nothing.
3. etcd down: the config in force stays; the watch is retried across every
   endpoint (the client fails over) after a capped exponential back-off with
   jitter, and resumes after the last revision seen, so no change is missed.
   That revision compacted meanwhile: the prefix is read again and the
   reloader diffs it. A member that hangs is the client's to leave (its
   silent watch's member is probed; tcpproxy.fleet.client): the watch goes
   on through another member, which is no outage here.
4. Each rejection (or its end) is logged once, with the key, the revision and
   the reason, and counted (`app_rejected`); `rejected()` is for /status and
   the node record.
5. Each config the reloader applies is written to the cache file
   (atomically: a temporary file renamed over it) and published
   (tcpproxy.fleet.publish).
6. A config the reloader cannot apply (a port of a new app already taken on
   this machine) sets aside the app the error names (else every app it
   changed): assemble's rule 6, it keeps its last good version, or is not
   served, until its value changes; the rest is offered again, so one team's
   push does not hold up the others. Apps set aside are offered again on
   SIGHUP (`reoffer`), and by themselves after HELD_RETRY_FIRST seconds,
   doubling to HELD_RETRY_MAX while they keep failing: a port freed later is
   taken without an operator. At start, `set_aside` does the same for the
   apps whose ports cannot be bound.
7. The node record follows the revision and the rejections even when the
   config served does not change (`applied` is told of each read).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from tcpproxy.config import Config, ConfigError
from tcpproxy.fleet.assemble import (
    DEFAULTS,
    Assembly,
    Check,
    CrossCheck,
    assemble,
    assembly_from_document,
    key_root,
)
from tcpproxy.fleet.client import EtcdClient, EtcdCompacted, EtcdError, EtcdUnavailable
from tcpproxy.fleet.url import EtcdTarget
from tcpproxy.metrics import NullMetrics
from tcpproxy.sources import Contents
from tcpproxy.sources.file import read_config_bytes

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "EtcdSource", "describe", "write_atomically"]

log = logging.getLogger("tcpproxy")

BACKOFF_FIRST = 0.5  # seconds before the first retry of an unreachable etcd
BACKOFF_MAX = 8.0  # the back-off's cap: an outage's end is noticed within this (plus jitter)
HELD_RETRY_FIRST = 5.0  # seconds before apps set aside (rule 6) are offered again
HELD_RETRY_MAX = 60.0  # the cap of that back-off while they keep failing

ClientFactory = Callable[[EtcdTarget], Any]  # EtcdClient's signature: an async context manager


def describe(target: EtcdTarget) -> str:
    """The source's name for logs and /status: the URL, without credentials."""
    scheme = "etcds" if target.tls else "etcd"
    return f"{scheme}://{target.describe_endpoints()}{target.prefix}"


class EtcdSource:
    """A `ConfigSource` on an etcd prefix.

    Resource handling: a client (its HTTP connections) lives only inside
    `load` and `watch`; cancelling `watch` closes it, and the publisher
    revokes its lease on the way out.

    Args:
      target: the cluster and the prefix.
      cache: the --etcd-cache file, or None.
      check: a further check of each app (the self-loop check), as `assemble` takes.
      cross: the check of each app against the others' ports (assemble's rule 7).
      handed: the config the process this one upgrades served (rule 1), or None.
      load_timeout: how long `load` may wait for etcd before starting from `handed`
        or the cache (an upgrade must serve within READY_TIMEOUT); None: no bound.
      metrics: counts rejections.
      publish: told of each applied config (tcpproxy.fleet.publish.Publisher), or None.
      client: makes the etcd client (tests pass another).
    """

    def __init__(
        self,
        target: EtcdTarget,
        *,
        cache: Path | None = None,
        check: Check | None = None,
        cross: CrossCheck | None = None,
        handed: bytes | None = None,
        load_timeout: float | None = None,
        metrics: NullMetrics | None = None,
        publish: Any = None,
        client: ClientFactory = EtcdClient,
    ) -> None:
        self.target = target
        self.name = describe(target)
        self._root = key_root(target.prefix)
        self._cache = cache
        self._check = check
        self._cross = cross
        self._handed = handed
        self._load_timeout = load_timeout
        self._metrics = metrics or NullMetrics()
        self._publish = publish
        self._client = client
        self._values: dict[str, tuple[bytes, int]] = {}  # every key under the prefix
        self._synced = False  # _values are etcd's (not after a start from the cache)
        self._ignored: set[str] = set()  # unknown keys logged already
        self._held: dict[str, tuple[bytes, str]] = {}  # rule 6: app -> (value, why)
        self._held_more = trio.Event()  # set when an app is set aside (the retry waits)
        self._published: tuple[object, bytes, object] | None = None  # rule 7: the record
        self._written: bytes | None = None  # the cache file's contents, as written here
        self._cache_problem = ""  # why the cache could not be read at start, if it could not
        self._previous_in_force: Assembly | None = None  # what `load` judged against
        self._on_change: Callable[[str], None] | None = None  # the watch's, for rule 6
        self._cache_failed = False  # a failed cache write is logged once per episode
        self.assembly: Assembly | None = None  # the latest
        self._offered: Assembly | None = None  # the one the reloader read last
        self._in_force: Assembly | None = None  # the one it applied last: the judge of
        # the next assembly (what runs is each app's last good version)
        self.revision = 0  # the last revision seen: the watch resumes after it
        self.lost_since: float | None = None  # when etcd stopped answering (None: it answers)

    async def load(self) -> Contents:
        """Read the prefix at one revision (rule 1); raise ConfigError if neither
        etcd, the config handed over nor the cache gives a config."""
        previous = await self._previous()
        try:
            with trio.fail_after(self._load_timeout if self._load_timeout else math.inf):
                async with self._client(self.target) as client:
                    revision, kvs = await client.range_prefix(self._root)
        except trio.TooSlowError:
            endpoints = self.target.describe_endpoints()
            reason = f"no answer within {self._load_timeout:g}s"
            return await self._start_without_etcd(
                EtcdUnavailable(endpoints, {endpoints: reason}), previous
            )
        except EtcdUnavailable as exc:
            return await self._start_without_etcd(exc, previous)
        except EtcdError as exc:  # it answers, and refuses (auth, TLS identity): ours to fix
            raise ConfigError(self.name, [str(exc)]) from None
        self._values = {kv.key: (kv.value, kv.mod_revision) for kv in kvs}
        self._synced = True
        self._previous_in_force = previous[0] if previous is not None else None
        self._in_force = self._previous_in_force
        self._assemble(revision)
        assert self.assembly is not None
        self._in_force = self.assembly
        log.info("config from %s at revision %d: %d apps, %d rejected", self.name, revision,
                 len(self.assembly.config.apps), len(self.assembly.rejected))  # fmt: skip
        return self._contents()

    async def _previous(self) -> tuple[Assembly, str] | None:
        """What this node served before (rule 1), and where it comes from: the config
        an upgrade handed over, else the cache file; None if neither is there (or
        reads as a config)."""
        if self._handed is not None:
            try:
                return assembly_from_document(
                    self._handed, self.target.prefix, "the config handed over"
                ), "the config the old process served"
            except ConfigError as exc:
                log.warning("upgrade: the config handed over is not usable: %s", exc)
        if self._cache is None:
            return None
        try:
            data = await trio.to_thread.run_sync(read_config_bytes, self._cache)
            assembly = assembly_from_document(data, self.target.prefix, str(self._cache))
        except ConfigError as exc:
            self._cache_problem = f"the cache {exc}"
            return None
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(self._cache).st_mtime))
        return assembly, f"the cache {self._cache} (written {written})"

    async def _start_without_etcd(
        self, exc: Exception, previous: tuple[Assembly, str] | None
    ) -> Contents:
        if previous is None:
            why = self._cache_problem or "there is no --etcd-cache to start from"
            raise ConfigError(self.name, [f"etcd is unreachable ({exc}) and {why}"])
        self.assembly, where = previous
        self._in_force = self._previous_in_force = self.assembly
        root = self._root  # its keys, for `set_aside` (etcd's replace them once it answers)
        self._values = {f"{root}apps/{name}": (served.value, served.revision)
                        for name, served in self.assembly.apps.items()}  # fmt: skip
        if self.assembly.defaults is not None:
            self._values[root + "defaults"] = self.assembly.defaults
        log.warning("etcd is unreachable (%s): starting from %s (%d apps); following %s "
                    "once it answers", exc, where, len(self.assembly.config.apps),
                    self.name)  # fmt: skip
        return self._contents()

    def _contents(self) -> Contents:
        assert self.assembly is not None, "load() first"
        return Contents(self.assembly.document(), self.assembly.revision, self.assembly.config)

    def use_metrics(self, metrics: NullMetrics) -> None:
        self._metrics = metrics

    async def read(self) -> Contents:
        """The latest assembly (the watch keeps it current)."""
        self._offered = self.assembly
        return self._contents()

    def rejected(self) -> Mapping[str, Mapping[str, object]]:
        if self.assembly is None:
            return {}
        return {name: why.as_dict() for name, why in self.assembly.rejected.items()}

    async def applied(self, contents: Contents) -> None:
        """Rule 5: the cache, then the node record; also told of a read that changed
        nothing served (rule 7): the record's revision and rejections follow."""
        if self._offered is not None and contents.config is self._offered.config:
            self._in_force = self._offered
        if self._cache is not None and contents.data != self._written:
            try:
                await trio.to_thread.run_sync(write_atomically, self._cache, contents.data)
                self._cache_failed = False
                self._written = contents.data
            except OSError as exc:
                if not self._cache_failed:
                    log.warning("etcd cache %s not written (its directory must be writable "
                                "by the serving user): %s", self._cache, exc)  # fmt: skip
                self._cache_failed = True
        assert contents.config is not None
        self._record(contents.stamp, contents.data, contents.config)

    def fleet_status(self) -> dict[str, Any]:
        """For the status page's header: this node; the revision of the config in force
        and of the latest one assembled (the nodes' records aside), and how many
        revisions apart they are (0: up to date; more while a reload is on its way);
        since when etcd has not answered (epoch seconds, None: it answers). The apps
        set aside are in `rejected()`."""
        applied = self._in_force.revision if self._in_force is not None else None
        seen = self.assembly.revision if self.assembly is not None else None
        return {
            "node": getattr(self._publish, "node", None),
            "revision": applied,
            "seen": seen,
            "lag": max(0, seen - applied) if seen is not None and applied is not None else None,
            "lost_since": self.lost_since,
        }

    def _record(self, revision: object, data: bytes, config: Config) -> None:
        """Publish the node record if its revision, config or rejections changed."""
        rejected = self.rejected()
        if self._publish is None or self._published == (revision, data, rejected):
            return
        self._published = (revision, data, rejected)
        self._publish.applied(revision, data, config, rejected)

    def served(self) -> bytes | None:
        """The config in force, in the file format: handed to the process an upgrade
        starts (rule 1)."""
        return self._in_force.document() if self._in_force is not None else None

    def refused(self, contents: Contents, running: Config, error: Exception) -> None:
        """Rule 6: set aside the app the error names (a StartupError's `app`), else
        every app `contents` adds or changes, and offer the rest."""
        offered = self._offered
        if offered is None or contents.config is not offered.config:
            return
        named = getattr(error, "app", None)
        if named is not None and named in offered.apps:
            blamed = [named]
        else:
            before = {app.name: app for app in running.apps}
            blamed = [app.name for app in offered.config.apps if before.get(app.name) != app]
        self._hold({name: error for name in blamed}, offered)
        if blamed and self._on_change is not None and self.assembly is not None:
            self._changed(self.assembly.revision, self._on_change)

    def _hold(self, errors: Mapping[str, Exception], offered: Assembly) -> None:
        for name, error in errors.items():
            self._held[name] = (offered.apps[name].value, f"not applied: {error}")
        if errors:
            self._held_more.set()

    def set_aside(self, errors: Mapping[str, Exception]) -> Contents:
        """At start (rule 6): the apps whose ports cannot be bound are set aside;
        the config to start with instead."""
        assert self.assembly is not None, "load() first"
        self._hold(errors, self.assembly)
        self._in_force = self._previous_in_force
        self._assemble(self.assembly.revision)
        self._in_force = self.assembly
        return self._contents()

    def reoffer(self) -> None:
        """SIGHUP (rule 6): the apps set aside are judged again at the next read."""
        if self._held:
            log.info("etcd: offering again the apps set aside: %s", ", ".join(sorted(self._held)))
            self._held.clear()
            self._assemble(self.revision)

    async def _retry_held(self, on_change: Callable[[str], None]) -> None:
        """Rule 6: offer the apps set aside again, after HELD_RETRY_FIRST seconds,
        doubling while they are set aside again within the wait."""
        delay = HELD_RETRY_FIRST
        while True:
            await self._held_more.wait()
            await trio.sleep(delay)
            self._held_more = trio.Event()
            if not self._held:  # their values changed meanwhile: judged afresh already
                delay = HELD_RETRY_FIRST
                continue
            self.reoffer()
            on_change("a retry of the apps set aside")
            with trio.move_on_after(delay):
                await self._held_more.wait()
            delay = min(delay * 2, HELD_RETRY_MAX) if self._held_more.is_set() else HELD_RETRY_FIRST

    async def watch(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the prefix (rules 2 and 3) until cancelled; the config loaded at
        start counts as applied (cached, published)."""
        async with trio.open_nursery() as nursery:
            if self._publish is not None:
                nursery.start_soon(self._publish.run)
            if self._synced:
                await self.applied(self._contents())
            else:  # from the cache: say so, not in the cache again
                contents = self._contents()
                assert contents.config is not None
                self._record(0, contents.data, contents.config)
            self._on_change = on_change
            nursery.start_soon(self._retry_held, on_change)
            task_status.started()
            await self._follow(on_change)

    async def _follow(self, on_change: Callable[[str], None]) -> None:
        delay = BACKOFF_FIRST
        down_since: float | None = None
        while True:
            try:
                async with self._client(self.target) as client:
                    if down_since is not None:  # a probe: raises while etcd is still away
                        await client.get(self._root + "defaults")
                        log.info("etcd answers again after %.1fs; following from revision %d",
                                 time.monotonic() - down_since, self.revision + 1)  # fmt: skip
                        down_since = self.lost_since = None
                    if not self._synced:
                        revision, kvs = await client.range_prefix(self._root)
                        self._values = {kv.key: (kv.value, kv.mod_revision) for kv in kvs}
                        self._synced = True
                        log.info("etcd: read %s again at revision %d", self.name, revision)
                        self._changed(revision, on_change)
                    delay = BACKOFF_FIRST
                    async with client.watch(self._root, self.revision + 1) as batches:
                        async for revision, events in batches:
                            self._apply_events(revision, events, on_change)
                    # the watch ends only by raising; should it end, it is an outage
                    endpoints = self.target.describe_endpoints()
                    raise EtcdUnavailable(endpoints, {endpoints: "the watch ended"})
            except EtcdCompacted as exc:
                log.warning("etcd: revision %d was compacted (etcd keeps from %d): reading "
                            "%s again", self.revision + 1, exc.compact_revision,
                            self.name)  # fmt: skip
                self._synced = False
                continue
            except EtcdError as exc:  # unavailable, or refusing us (auth): the same to us
                if down_since is None:
                    down_since, self.lost_since = time.monotonic(), time.time()
                    log.warning("etcd unavailable (%s): serving the config of revision %d; "
                                "retrying every endpoint with back-off up to %gs", exc,
                                self.revision, BACKOFF_MAX)  # fmt: skip
                else:
                    log.debug("etcd still unavailable: %s", exc)
            await trio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: nodes spread out
            delay = min(delay * 2, BACKOFF_MAX)

    def _apply_events(
        self, header: int, events: list[Any], on_change: Callable[[str], None]
    ) -> None:
        """One batch. The revision reached is its last event's: the header's may be
        later (etcd's revision when it answered), and resuming after it could skip
        an event still on its way."""
        relevant = False
        revision = self.revision
        for event in events:
            if event.kind == "put":
                self._values[event.key] = (event.value, event.mod_revision)
            else:
                self._values.pop(event.key, None)
            relevant = relevant or not event.key.startswith(self._root + "nodes/")
            revision = max(revision, event.mod_revision)
        if relevant:
            self._changed(revision, on_change)
        else:
            self.revision = max(self.revision, revision)

    def _changed(self, revision: int, on_change: Callable[[str], None]) -> None:
        """Assemble again; a config to serve goes to the reloader. The same config as
        in force (a value rewritten alike, a rejection, a read again after the cache):
        nothing to apply, and this revision is the node's now (its record says so)."""
        before = self.assembly
        self._assemble(revision)
        after = self.assembly
        assert after is not None
        if before is None or _served(after) != _served(before):
            on_change(f"etcd revision {revision}")
        elif before is self._in_force:
            self._in_force = after
            contents = self._contents()
            assert contents.config is not None
            self._record(after.revision, contents.data, contents.config)

    def _assemble(self, revision: int) -> None:
        """Assemble the keys held; log (once) and count what changed in the rejections."""
        before = self.assembly
        self._held = {
            name: (value, why)
            for name, (value, why) in self._held.items()
            if self._values.get(f"{self._root}apps/{name}", (b"", 0))[0] == value
        }  # a held value rewritten (or deleted) is judged afresh
        after = assemble(self._values, self.target.prefix, revision, self._in_force,
                         self._check, self._held, self._cross)  # fmt: skip
        if self._in_force is None:  # the first: what the process starts with
            self._in_force = after
        self.assembly, self.revision = after, max(self.revision, revision)
        self._log_changes(before, after, revision)

    def _log_changes(self, before: Assembly | None, after: Assembly, revision: int) -> None:
        """Rule 4: each rejection, its end, and each unknown key, once."""
        old = before.rejected if before is not None else {}
        for name, why in after.rejected.items():
            if old.get(name) == why:
                continue
            self._metrics.app_rejected(name)
            if name == DEFAULTS:
                action = "keeping the defaults in force"
            elif name in after.apps and after.apps[name].revision:
                action = f"keeping its version of revision {after.apps[name].revision}"
            elif name in after.apps:  # from the config handed over or the cache
                action = "keeping the version this node served before"
            else:
                action = "not served"
            log.error("etcd: %s rejected at revision %d, %s: %s", why.key, why.revision,
                      action, why.reason)  # fmt: skip
        for name, why in old.items():
            if name not in after.rejected:
                log.info("etcd: %s no longer rejected (revision %d)", why.key, revision)
        for key in after.ignored:
            if key not in self._ignored:
                self._ignored.add(key)
                log.warning("etcd: ignoring key %s (expected %sdefaults, %sapps/NAME or "
                            "%snodes/ID)", key, self._root, self._root, self._root)  # fmt: skip


def _served(assembly: Assembly) -> tuple[object, bytes | None]:
    """What a node serves from an assembly: its config, and the defaults' value
    (kept in the cache file; its revision does not matter)."""
    return assembly.config, assembly.defaults[0] if assembly.defaults is not None else None


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, whole:
    a temporary file in the same directory, flushed to disk, renamed over it."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
