"""Reloading the config: read its source, validate it, apply it whole, and say what runs.

Shared by a single process (which applies a reload itself) and a supervisor
(which applies it across its workers): both hand the `Reloader` an apply
function that changes everything or, raising StartupError, nothing. The
config comes from a `ConfigSource` (the file, or a prefix in etcd). The
reloader keeps the digest of the config in force and the last outcome, for
logs, /status and systemd.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tcpproxy.config import Config, ConfigError, parse_config
from tcpproxy.diff import diff_configs
from tcpproxy.errors import StartupError
from tcpproxy.metrics import NullMetrics
from tcpproxy.notify import Notifier
from tcpproxy.sources import ConfigSource
from tcpproxy.sources.file import FileSource

__all__ = ["ApplyFn", "Reloader", "digest"]

log = logging.getLogger("tcpproxy")

SHORTAGE_RETRY = 1.0  # seconds between tries to read the config file while we lack descriptors
# read failures that are this process's shortage, not a problem of the config file
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# read failures that mean the file is not there (its directory being replaced): not a bad config
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
_RETRY = "retry"  # _reload's outcome when the file could not be read for want of resources
# A config read of this many bytes, or rejected, is followed by a full garbage collection: an
# exception that crossed a thread (trio.to_thread) holds the bytes read and their decoded
# text in a reference cycle (traceback, frames, trio's closures), and this process makes too
# few objects for a full collection to come soon. Measured with 8 MiB configs: RSS grew by
# 16 MiB per rejection until one happened to run (to +208 MiB); now at most +32 MiB, the
# freed blocks going back to the system (tcpproxy.heap).
COLLECT_AFTER = 2**20


def digest(data: bytes) -> str:
    """A short name for a config's contents, for logs."""
    return hashlib.sha256(data).hexdigest()[:12]


ApplyFn = Callable[[Config, Config], Awaitable[None]]


class Reloader:
    """Serialises reloads of the config file: requests coalesce, one runs at a time.

    An event is ignored when the file holds the contents in force (the source
    is still told, `applied`: etcd's node record follows the revision), or the
    contents last rejected and was not saved since (another file of the
    directory changed). Saving a rejected file again, even unchanged, retries
    it: the rejection says so. SIGHUP always reads and applies.

    Args:
      source: where the config comes from (a Path: that config file).
      data: its contents as running.
      current: the config in force.
      apply: applies `(old, new)`; raises StartupError, having changed nothing,
        to reject it.
      validate: checks a parsed config further (raises ConfigError to reject it),
        as the start did (e.g. `selfloop.reject_self_loops`).
    """

    def __init__(
        self,
        source: Path | str | ConfigSource,
        data: bytes,
        current: Callable[[], Config],
        apply: ApplyFn,
        notifier: Notifier | None = None,
        metrics: NullMetrics | None = None,
        validate: Callable[[Config], None] | None = None,
    ) -> None:
        self.source: ConfigSource = (
            FileSource(source) if isinstance(source, (Path, str)) else source
        )
        self._validate = validate
        self._current = current
        self._apply = apply
        self._notifier = notifier or Notifier({})
        self._metrics = metrics or NullMetrics()
        self.digest = digest(data)  # of the config in force
        self.loaded_at = time.time()
        self.last = "none"  # the last reload's outcome, for status lines
        self._running = data  # contents of the config in force (or an equivalent)
        self._rejected: tuple[bytes, object] | None = None  # the last rejected file
        # why the last read was refused (a FIFO, a directory at the path), until a read
        # succeeds: another event (a neighbour in the directory, our own log file there)
        # refused the same way is not logged again; SIGHUP always is
        self._unreadable: str | None = None
        self._send, self._receive = trio.open_memory_channel[str](1)
        self._short = False  # reading the file failed for want of descriptors or memory
        self._missing = False  # the file was not there at the last read
        self.reloads = 0  # applied reloads, for tests and status
        self.rejected = 0
        self._read_size = 0  # bytes the last reload read

    def request(self, why: str) -> None:
        try:
            self._send.send_nowait(why)
        except trio.WouldBlock:  # one is pending already; it will read the newest file
            pass

    async def run(self, status: Callable[[], str] | None = None) -> None:
        async for why in self._receive:
            self._notifier.reloading()
            outcome = None
            try:
                outcome = await self._reload(why)
            finally:
                if outcome in ("applied", "rejected"):
                    self.last = f"{outcome} at {time.strftime('%H:%M:%S')}"
                self._notifier.ready(status() if status else self.last)
                if outcome == "rejected" or self._read_size >= COLLECT_AFTER:
                    gc.collect()  # a copy or two of the config, in cycles (see COLLECT_AFTER)
            if outcome == _RETRY:  # requests meanwhile coalesce with this one
                await trio.sleep(SHORTAGE_RETRY)
                self.request(why)

    async def _reload(self, why: str) -> str | None:
        """Returns "applied", "rejected", _RETRY, or None when nothing changed."""
        if why == "SIGHUP":
            self.source.reoffer()  # etcd: the apps set aside are tried again too
        self._read_size = 0
        try:
            contents = await self.source.read()
        except ConfigError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in SHORTAGE_ERRNOS:
                if not self._short:  # once per episode: every directory event lands here
                    log.error("reload (%s): cannot read the config file now: %s; the running "
                              "config is kept and the file read again every %gs",
                              why, exc, SHORTAGE_RETRY)  # fmt: skip
                self._short = True
                return _RETRY
            self._short = False
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in MISSING_ERRNOS:
                # `rm -rf` of the directory and a recreate, a ConfigMap swap: the watch
                # asks again when the file is back, so wait quietly (once per episode)
                if not self._missing:
                    log.warning("reload (%s): config file missing; keeping the running config "
                                "%s; waiting for it: %s", why, self.digest, exc)  # fmt: skip
                self._missing = True
                return None
            self._missing = False
            if why != "SIGHUP" and str(exc) == self._unreadable:
                return None  # said already; nothing about the file changed that
            self._unreadable = str(exc)
            return self._reject(why, exc)
        self._unreadable = None
        data, stamp = contents.data, contents.stamp
        self._read_size = len(data)
        if self._short or self._missing:
            log.info("reload (%s): the config file can be read again", why)
            self._short = self._missing = False
        if why != "SIGHUP" and data == self._running:
            # nothing to apply; etcd: its revision or rejections may have moved on
            await self.source.applied(contents)
            return None
        if why != "SIGHUP" and (data, stamp) == self._rejected:
            return None  # an event that did not change the file
        try:
            # abandoned if cancelled (a stop): a parse has no effect to wait for
            new = await trio.to_thread.run_sync(
                self._parse, data, contents.config, abandon_on_cancel=True
            )
        except ConfigError as exc:
            self.source.refused(contents, self._current(), exc)
            return self._reject(why, exc, (data, stamp))
        old = self._current()
        diff = diff_configs(old, new)
        if diff.empty:
            self._running, self._rejected = data, None
            log.info("reload (%s): config %s has no changes", why, digest(data))
            await self.source.applied(contents)
            return None
        try:
            await self._apply(old, new)
        except StartupError as exc:
            self.source.refused(contents, old, exc)
            return self._reject(why, exc, (data, stamp))
        self._running, self._rejected = data, None
        self.reloads += 1
        self.digest, self.loaded_at = digest(data), time.time()
        self._metrics.reload(True)
        self._metrics.config_loaded(self.digest)
        log.info("reload (%s): config %s applied: %s", why, digest(data), diff.summary())
        await self.source.applied(contents)
        return "applied"

    def _parse(self, data: bytes, parsed: Config | None) -> Config:
        """`parsed`: the source parsed it already (etcd, app by app)."""
        config = parsed if parsed is not None else parse_config(data, self.source.name)
        if self._validate is not None:
            self._validate(config)
        return config

    def _reject(self, why: str, exc: Exception, file: tuple[bytes, object] | None = None) -> str:
        self._rejected = file if file is not None and file[1] is not None else None
        self.rejected += 1
        self._metrics.reload(False)
        log.error("reload (%s) rejected, keeping the running config %s; the config is read "
                  "again on its next change or SIGHUP: %s", why, self.digest, exc)  # fmt: skip
        return "rejected"
