"""The config file as a source of configs: read it, bounded, and notice when it changes.

Reading: a regular file only, at most MAX_FILE_BYTES, and never blocking: what
is not a regular file (a FIFO, a directory, a device) is refused, unread, so
a FIFO put at the path cannot hang a reload and /dev/zero cannot exhaust
memory. With the bytes, a stamp (inode, size, times) taken just before, so a
reload can tell a file saved again from one left alone even when the bytes
are the same.

Watching: editors and config managers replace files atomically (write a temporary
file, rename it over the old one), and inotify on the file itself loses track
after the first replace. So directories are watched, and any event in them
only asks for a reload; the reloader compares contents and ignores events
that changed nothing.

Which directories: the one the user named (not resolved through symlinks: a
Kubernetes ConfigMap mount swaps a `..data` symlink there, then removes the
directory the file resolved to) and the one the file resolves to (a symlink to
a file elsewhere, edited there). Both are re-resolved after every event and
every poll; when they change, or one is removed and recreated, the watch
restarts on the new ones. A stat() of the file every POLL_INTERVAL is the
backstop for what inotify cannot see (network file systems, a directory
replaced between two checks): a changed inode, mtime, size or symlink target
asks for a reload too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import trio
import watchfiles

from tcpproxy.config import Config, ConfigError, parse_config
from tcpproxy.sources import Contents

__all__ = [
    "MAX_FILE_BYTES",
    "OPEN_FLAGS",
    "POLL_INTERVAL",
    "READ_TIMEOUT",
    "FileSource",
    "FileStamp",
    "load_config",
    "read_config_bytes",
    "read_stamped",
    "watch_config",
]

log = logging.getLogger("tcpproxy")


MAX_FILE_BYTES = 16 * 2**20  # a config larger than this is refused (bounded memory)

FileStamp = tuple[int, int, int, int] | None  # inode, size, mtime and ctime (ns); None: unknown


def read_config_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a configuration file's bytes, bounded; raise `ConfigError` if that fails.

    Kept apart from parsing so a reload can compare contents before parsing.
    """
    return _read(path)[0]


def read_stamped(path: Path) -> tuple[bytes, FileStamp]:
    """The file's contents and its stamp, taken on the descriptor just before reading:
    a save changes the stamp even when it writes the same bytes."""
    data, st = _read(path)
    return data, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# No open() that can block: a FIFO's waits for a writer (forever, once it is replaced),
# a terminal's may wait for carrier. Without O_NOCTTY a terminal would become ours.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
READ_CHUNK = 2**20  # bytes per read when the size is not known (a /proc-like file says 0)


def _read(path: str | os.PathLike[str]) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes (at most MAX_FILE_BYTES) and its fstat, or ConfigError.

    Resource handling: what is not a regular file is refused before it is opened
    (opening a device can have effects) and again on the descriptor (it could have
    been replaced in between); nothing is read from it. A file whose size is over
    the limit is refused unread; one that says less and grows, or whose size is
    not known, is read no further than MAX_FILE_BYTES + 1 bytes.

    Error handling: an OSError is the ConfigError's cause (the reloader tells a
    shortage of descriptors or a missing file apart from a bad file by its errno).
    """
    source = os.fspath(path)
    try:
        _refuse_special(source, os.stat(path))
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read file: {exc.strerror or exc}"]) from exc
    try:
        st = os.fstat(fd)
        _refuse_special(source, st)
        if st.st_size > MAX_FILE_BYTES:
            raise _too_large(source)
        return _read_at_most(fd, st.st_size, source), st
    except OSError as exc:
        raise ConfigError(source, [f"cannot read file: {exc.strerror or exc}"]) from exc
    finally:
        os.close(fd)


def _read_at_most(fd: int, size: int, source: str) -> bytes:
    """Read to the end, but no more than MAX_FILE_BYTES + 1 bytes (then ConfigError).

    `size`, fstat's, is a hint: asking for one byte more reads a file of that size
    in one buffer, then sees the end. A file that says 0 (/proc) or grows is read
    in READ_CHUNK pieces, joined: memory stays under twice the limit.
    """
    chunks = []
    total = 0
    want = size + 1 if size else READ_CHUNK
    while total <= MAX_FILE_BYTES:
        chunk = os.read(fd, min(want, MAX_FILE_BYTES + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = READ_CHUNK
    if total > MAX_FILE_BYTES:
        raise _too_large(source)
    return b"".join(chunks)  # one chunk: that same object, not a copy


def _too_large(source: str) -> ConfigError:
    return ConfigError(source, [f"file is larger than {MAX_FILE_BYTES // 2**20} MiB"])


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _refuse_special(source: str, st: os.stat_result) -> None:
    """ConfigError unless `st` is a regular file's (after symlinks)."""
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise ConfigError(source, [f"is {kind}, not a regular file"])


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a configuration file; raise `ConfigError` if that fails."""
    return parse_config(read_config_bytes(path), os.fspath(path))


DEBOUNCE_MS = 50  # group events this close together into one reload check
WAKEUP_MS = 500  # the watcher thread checks for cancellation this often
RETRY_DELAY = 1.0  # seconds before watching again after the watcher failed
POLL_INTERVAL = 1.0  # seconds between stat() checks of the file (the backstop)
READ_TIMEOUT = 10.0  # seconds a reload's read of the file may take (a hung file system)

# A directory to watch and its identity (st_dev, st_ino): a directory removed and
# recreated under the same name is a new one, and needs a new watch.
Watched = tuple[tuple[Path, tuple[int, int]], ...]
# What the poll compares: (resolved path, st_dev, st_ino, st_mtime_ns, st_size).
Signature = tuple[str, int, int, int, int] | None


async def watch_config(
    path: Path,
    on_change: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_change("file changed")` after changes to `path` or its directories.

    Error handling: a watcher failure (directory removed, inotify limits) or a
    missing directory is logged once, and the watch restarts when it can
    (checked every POLL_INTERVAL); the stat() poll and SIGHUP work meanwhile.
    """
    await _ConfigWatch(path, on_change).run(task_status)


class _ConfigWatch:
    def __init__(self, path: Path, on_change: Callable[[str], None]) -> None:
        self._path = Path(os.path.abspath(path))  # absolute, symlinks kept
        self._on_change = on_change
        self._watching: Watched = ()
        self._restart = trio.CancelScope()  # cancelled to restart the inotify watch
        self._failure = ""  # the last watch failure logged (once per episode)
        self._missing = False  # the directory is missing (logged once per episode)

    def _wanted(self) -> Watched:
        """The directories that exist now among the named one and the resolved one."""
        wanted = []
        for directory in dict.fromkeys([self._path.parent, self._resolved().parent]):
            try:
                st = os.stat(directory)
            except OSError:
                continue
            wanted.append((directory, (st.st_dev, st.st_ino)))
        return tuple(wanted)

    def _resolved(self) -> Path:
        """Where the path leads now, through every symlink (itself if that fails)."""
        try:
            return self._path.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return self._path

    def _signature(self) -> Signature:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (str(self._resolved()), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _fail(self, message: str) -> None:
        """Log a watch failure once per episode (the same one again only at debug)."""
        level = logging.DEBUG if message == self._failure else logging.WARNING
        log.log(level, "watching %s: %s", self._path, message)
        self._failure = message

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        last = self._signature()  # before started(): no change after it is missed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll, last)
            started = False
            while True:
                wanted = self._wanted()
                if not wanted:
                    self._watching = ()
                    if not started:
                        started = True
                        task_status.started()
                    if not self._missing:
                        self._missing = True
                        log.warning(
                            "watching %s: directory %s is missing; checking again every %gs",
                            self._path, self._path.parent, POLL_INTERVAL,
                        )  # fmt: skip
                    await trio.sleep(POLL_INTERVAL)
                    continue
                if wanted != self._watching and (self._watching or self._missing):
                    log.info("watch restarted: now watching %s", _names(wanted))
                self._watching, self._missing = wanted, False
                self._restart = trio.CancelScope()
                with self._restart:
                    try:
                        changes_seen = watchfiles.awatch(
                            *(directory for directory, _ in wanted),
                            recursive=False,
                            step=DEBOUNCE_MS,
                            rust_timeout=WAKEUP_MS,
                            ignore_permission_denied=True,
                        )
                        async with contextlib.aclosing(changes_seen):
                            if not started:
                                # No checkpoint between here and the watch being set up by
                                # the first __anext__, so no change after started() is missed.
                                started = True
                                task_status.started()
                            async for _ in changes_seen:
                                self._failure = ""
                                self._on_change("file changed")
                                if self._wanted() != wanted:
                                    break  # a directory swapped: watch the new ones
                            else:
                                raise RuntimeError("the watcher stopped")
                    except Exception as exc:  # best effort: the poll and SIGHUP still work
                        self._fail(f"watch failed: {exc}; retrying in {RETRY_DELAY:g}s")
                        await trio.sleep(RETRY_DELAY)

    async def _poll(self, last: Signature) -> None:
        """Every POLL_INTERVAL: report a changed file, restart a stale watch."""
        while True:
            await trio.sleep(POLL_INTERVAL)
            now = self._signature()
            if now != last:
                last = now
                self._on_change("file changed")
            if self._watching and self._wanted() != self._watching:
                self._restart.cancel()


def _names(watched: Watched) -> str:
    return " and ".join(str(directory) for directory, _ in watched)


class FileSource:
    """The config file as a `ConfigSource`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.name = str(path)
        self._reading = False  # a read's thread has not returned (abandoned: it hangs)

    async def read(self) -> Contents:
        """The file now, read on a thread, for READ_TIMEOUT at most.

        Error handling: no read of ours blocks, but a file system can (a hung NFS
        server): a read that takes too long, or while an abandoned one still hangs,
        is a ConfigError (the reload is rejected; the next change or SIGHUP reads
        again). Its thread is abandoned, as it is when the read is cancelled (a
        stop): nothing waits for it, and hung threads do not pile up.
        """
        if self._reading:
            raise ConfigError(self.name, ["cannot read file: an earlier read has not "
                                          "returned yet (is its file system hung?)"])  # fmt: skip

        def read() -> tuple[bytes, FileStamp]:
            self._reading = True  # here, not before: a thread cancelled unstarted never is
            try:
                return read_stamped(self.path)
            finally:
                self._reading = False

        with trio.move_on_after(READ_TIMEOUT):
            data, stamp = await trio.to_thread.run_sync(read, abandon_on_cancel=True)
            return Contents(data, stamp)
        raise ConfigError(self.name, [f"cannot read file: no answer in {READ_TIMEOUT:g}s "
                                      "(is its file system hung?)"])  # fmt: skip

    async def watch(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await watch_config(self.path, on_change, task_status=task_status)

    async def applied(self, contents: Contents) -> None:
        """Nothing to do: the file is where the config lives."""

    def refused(self, contents: Contents, running: Config, error: Exception) -> None:
        """Nothing to do: the file is one part; the reloader says why it was rejected."""

    def served(self) -> None:
        """The new process reads the file itself."""

    def reoffer(self) -> None:
        """Nothing set aside: SIGHUP reads the whole file again anyway."""

    def rejected(self) -> dict[str, dict[str, object]]:
        return {}

    def use_metrics(self, metrics: object) -> None:
        """Nothing to count."""
