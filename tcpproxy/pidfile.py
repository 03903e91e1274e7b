"""The pid file (--pid-file): written once serving, rewritten by an upgrade, removed at exit.

Rules:
1. The file always holds one complete pid: it is replaced by a rename of a
   file written beside it, so systemd (`PIDFile=`) or a script never reads
   half of one.
2. A process started as root writes it before dropping privileges (so the
   file may live in a directory only root can write, like /run) and gives
   the file to the user it becomes. A process that cannot write the
   directory (it serves as that user, e.g. one started by an upgrade)
   rewrites the file it owns in place instead.
3. At a clean exit the file is removed only if it still names this process:
   after an upgrade it names the new process, which must keep it. A file
   the process cannot remove (a directory it cannot write) is left to the
   service manager, which removes a `PIDFile=` once the service has stopped.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from tcpproxy.errors import StartupError

__all__ = ["PidFile"]

log = logging.getLogger("tcpproxy")


class PidFile:
    """One process's pid file; every method does nothing when `path` is None.

    Error handling: `write` raises OSError (the caller says what failed at
    start; a rewrite after an upgrade logs it); `remove` never raises.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, owner: int | None = None) -> None:
        """Make the file name this process (rule 1); `owner`: the uid to give it to (rule 2)."""
        if self.path is None:
            return
        text = f"{os.getpid()}\n".encode()
        directory = self.path.parent
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        except PermissionError:
            self._rewrite_in_place(text)
            return
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(text)
                os.fchmod(file.fileno(), 0o644)
                if owner is not None and owner != os.geteuid():
                    os.fchown(file.fileno(), owner, -1)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def write_at_start(self, owner: int | None) -> None:
        """At a start (not an upgrade): before the drop of privileges, given to `owner`
        (the uid served as) so that a process an upgrade starts can rewrite it (rule 2).

        Raises StartupError naming the file.
        """
        try:
            self.write(owner)
        except OSError as exc:
            raise StartupError(f"--pid-file {self.path}: {exc.strerror or exc}") from None

    def _rewrite_in_place(self, text: bytes) -> None:
        """A directory we cannot write: the file (ours since rule 2), written over."""
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
        finally:
            os.close(fd)

    def names_us(self) -> bool:
        if self.path is None:
            return False
        try:
            return self.path.read_text().strip() == str(os.getpid())
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        """Remove the file if it still names this process (rule 3)."""
        if self.path is None or not self.names_us():
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.info("pid file %s left for the service manager to remove: %s",
                     self.path, exc.strerror)  # fmt: skip
