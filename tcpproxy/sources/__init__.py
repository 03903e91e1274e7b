"""Where configs come from: the `ConfigSource` protocol both sources implement.

`file.py` is the config file (read bounded, watched); `tcpproxy.fleet.source`
is a prefix in etcd. The reloader (tcpproxy.reload) reads whichever it is
given, so validation, the diff and applying stay in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

import trio

if TYPE_CHECKING:
    from tcpproxy.config import Config
    from tcpproxy.metrics import NullMetrics

__all__ = ["ConfigSource", "Contents"]


class Contents(NamedTuple):
    """A config as a source holds it now."""

    data: bytes  # in the file format: compared on each change, digested for logs
    stamp: object  # what tells a save apart from an unchanged read (file: inode and times;
    # etcd: the revision)
    config: Config | None = None  # already parsed and checked (etcd), else None: parse `data`


class ConfigSource(Protocol):
    """Where the config comes from, and how the reloader hears of a change."""

    name: str  # for logs and /status: the file's path, or the etcd URL

    async def read(self) -> Contents:
        """The config now; raises ConfigError (with the OSError as its cause for a read)."""

    async def watch(
        self, on_change: Callable[[str], None], *, task_status: trio.TaskStatus[None] = ...
    ) -> None:
        """Call `on_change(why)` after each change, until cancelled; started() once no
        change can be missed."""

    async def applied(self, contents: Contents) -> None:
        """The reloader applied `contents` (or started with them)."""

    def refused(self, contents: Contents, running: Config, error: Exception) -> None:
        """The reloader could not apply `contents` (`running` stays): a source made of
        parts (etcd) may set aside the parts that changed, and offer the rest."""

    def served(self) -> bytes | None:
        """The config in force to hand to an upgrade's new process (etcd: its last
        good apps), or None: the new process reads its source afresh (a file)."""

    def reoffer(self) -> None:
        """SIGHUP: parts set aside by `refused` are judged again at the next read."""

    def rejected(self) -> Mapping[str, Mapping[str, object]]:
        """Parts of the source refused while the rest applied (etcd: apps), by name:
        {"key": ..., "revision": ..., "reason": ...}; empty for a file."""

    def use_metrics(self, metrics: NullMetrics) -> None:
        """Count there (etcd: rejections); set by the process that serves the metrics."""
