"""Noticing that the config file changed, however it was written.

Editors and config managers replace files atomically (write a temporary
file, rename it over the old one), and Kubernetes swaps a symlink; inotify on
the file itself loses track after the first replace. So the *directory* is
watched, and any event in it only asks for a reload; the reloader compares
contents and ignores events that changed nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio
import watchfiles

__all__ = ["watch_config"]

log = logging.getLogger("tcpproxy")

DEBOUNCE_MS = 50  # group events this close together into one reload check
WAKEUP_MS = 500  # the watcher thread checks for cancellation this often
RETRY_DELAY = 1.0  # seconds before watching again after the watcher failed


async def watch_config(
    path: Path,
    on_change: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_change("file changed")` after changes in `path`'s directory.

    Error handling: a watcher failure (directory removed, inotify limits) is
    logged and the watch restarts; reload on SIGHUP keeps working meanwhile.
    """
    directory = path.resolve().parent
    started = False
    while True:
        try:
            changes_seen = watchfiles.awatch(
                directory,
                recursive=False,
                step=DEBOUNCE_MS,
                rust_timeout=WAKEUP_MS,
                ignore_permission_denied=True,
            )
            if not started:
                # No checkpoint between here and the watch being set up by the
                # first __anext__, so no change after started() is missed.
                started = True
                task_status.started()
            async for _ in changes_seen:
                on_change("file changed")
        except Exception as exc:  # best effort: SIGHUP still reloads
            log.warning("watching %s failed: %s; retrying in %gs", directory, exc, RETRY_DELAY)
            await trio.sleep(RETRY_DELAY)
