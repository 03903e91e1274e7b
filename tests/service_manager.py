"""A small service manager for tests: a notify socket and a file descriptor store, as systemd's.

`ServiceManager` owns a Unix datagram socket (its path is `NOTIFY_SOCKET`,
root's, mode 600) and a thread that reads every sd_notify message from it
with the sender's pid (SO_PASSCRED) and the descriptors it carries
(SCM_RIGHTS). ``FDSTORE=1`` keeps them under ``FDNAME=`` (up to `limit`; an
open file kept already is not kept twice, as systemd does, and counted in
`duplicates`), ``FDSTOREREMOVE=1`` closes every one of that name. `start`
runs a command as systemd starts a service: the store's descriptors at 3, 4,
... with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` (the pid the
command keeps through exec: bash sets it, then execs it).

``keep_fds=False`` makes a manager without a store (systemd with
``FileDescriptorStoreMax=0``): no ``$FDSTORE``, and descriptors sent are closed.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.helpers import TIMEOUT, ProxyProcess

__all__ = ["ServiceManager"]

MESSAGE_SIZE = 65536  # bytes of one notify message
FDS_PER_MESSAGE = 253  # the kernel's SCM_MAX_FD
HIGH_FD = 600  # the store's descriptors are passed from here, then moved to 3.. by bash
POLL = 0.1  # seconds the reader waits for a message before it looks whether to stop


class ServiceManager:
    """NOTIFY_SOCKET and the file descriptor store of one service.

    Resource handling: owns the socket, its reader thread and every stored
    descriptor; `close` releases them all.
    """

    def __init__(self, directory: Path, *, keep_fds: bool = True, limit: int = 64) -> None:
        self.path = directory / "notify.sock"
        self.keep_fds = keep_fds
        self.limit = limit
        self.messages: list[tuple[int, dict[str, str]]] = []  # (sender's pid, fields)
        self.store: list[tuple[str, int]] = []  # (name, fd), in the order stored
        self.duplicates = 0  # descriptors sent again while kept already
        self._cond = threading.Condition()
        self._closed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.path.chmod(0o600)  # root only, as systemd's
        self.sock.settimeout(POLL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def env(self) -> dict[str, str]:
        """What the service's environment gets from the manager."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if self.keep_fds:
            env["FDSTORE"] = str(self.limit)  # as systemd 254+ sets it
        return env

    def names(self) -> list[str]:
        with self._cond:
            return [name for name, _ in self.store]

    def _read(self) -> None:
        space = socket.CMSG_SPACE(FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(12)
        while not self._closed:
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(MESSAGE_SIZE, space)
            except TimeoutError:
                continue
            except OSError:
                return
            pid, fds = 0, []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], "little")
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds += array.array("i", payload[:usable]).tolist()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self._apply(fields, fds)
                self.messages.append((pid, fields))
                self._cond.notify_all()

    def _apply(self, fields: dict[str, str], fds: list[int]) -> None:
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1" and self.keep_fds:
            for fd in fds:
                if any(_same(fd, kept) for _, kept in self.store):
                    self.duplicates += 1
                    os.close(fd)
                elif len(self.store) >= self.limit:
                    os.close(fd)
                else:
                    self.store.append((name, fd))
            return
        for fd in fds:  # not for the store
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            for gone in [fd for kept, fd in self.store if kept == name]:
                os.close(gone)
            self.store = [(kept, fd) for kept, fd in self.store if kept != name]

    def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Wait until `predicate` (called under the manager's lock) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def heard(self, pid: int, field: str) -> dict[str, str] | None:
        """The first message from `pid` with `field`, or None."""
        with self._cond:
            return next((f for sender, f in self.messages if sender == pid and field in f), None)

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None) -> ProxyProcess:
        """Run `argv` as the service (again): the store's descriptors from 3 on."""
        with self._cond:
            stored = list(self.store)
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD) for _, fd in stored]
        try:
            script = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(moved))
            names = ":".join(name for name, _ in stored)
            listen = {"LISTEN_FDS": str(len(stored)), "LISTEN_FDNAMES": names} if stored else {}
            wrapper = [
                "bash", "-c",
                (f"exec {script}; export LISTEN_PID=$$; " if stored else "") + 'exec "$@"',
                "bash", *argv,
            ]  # fmt: skip
            return ProxyProcess(wrapper, env={**self.env, **listen, **(env or {})},
                                pass_fds=moved)  # fmt: skip
        finally:
            for fd in moved:
                os.close(fd)

    def close(self) -> None:
        self._closed = True
        self._reader.join(TIMEOUT)
        self.sock.close()
        with self._cond:
            for _, fd in self.store:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.store = []


def _same(a: int, b: int) -> bool:
    """Whether two descriptors are one open socket (systemd's same_fd)."""
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
