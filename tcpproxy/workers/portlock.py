"""A supervisor's claim on its listening ports, atomic against a second supervisor.

Workers bind with SO_REUSEPORT, so the kernel lets a second supervisor's
workers join our ports; the plans' check (a bind without SO_REUSEPORT) is a
separate step and does not stop two supervisors started at the same instant,
both checking before either's workers bound. So a supervisor also holds, for
as long as it serves a port, an abstract Unix socket named after it: binding
that name is atomic, exclusive, per network namespace (as ports are), and
released by the kernel however the process ends. Both binaries use the same
names, so they exclude each other too.

The name includes the bind address as given (every address is "*"): two
supervisors on different addresses of one port may both run; one on every
address and one on a single address are left to the bind check alone.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from tcpproxy.errors import StartupError
from tcpproxy.listeners import bind_hint

__all__ = ["PortLocks"]

NAME_PREFIX = "tcpproxy-port"  # abstract socket names: NAME_PREFIX/ADDRESS/PORT
LOCK_FD_PREFIX = "lock:"  # a lock's name among an upgrade's handed-over descriptors


class PortLocks:
    """The ports this supervisor holds. Resource handling: one Unix socket per
    port; `keep_only` and `close` release them."""

    def __init__(self, bind: str | None) -> None:
        self._address = "*" if not bind or bind == "*" else bind.strip("[]")
        self._held: dict[int, socket.socket] = {}

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._held)

    def take(self, ports: Iterable[int]) -> None:
        """Hold every port in `ports` (all or none: raises StartupError, naming
        the first one another supervisor holds, and keeps none of them)."""
        taken = []
        try:
            for port in sorted(set(ports) - set(self._held)):
                self._held[port] = self._lock(port)
                taken.append(port)
        except BaseException:
            self.keep_only(set(self._held) - set(taken))
            raise

    def fds(self) -> dict[str, int]:
        """The locks by name (``lock:PORT``), still ours: an upgrade hands them to the
        new supervisor, which then holds the same sockets (`adopt`)."""
        return {f"{LOCK_FD_PREFIX}{port}": sock.fileno() for port, sock in self._held.items()}

    def adopt(self, fds: dict[str, int]) -> None:
        """Hold the locks an upgrade handed over (`fds`' ``lock:PORT`` entries, now ours)."""
        for name, fd in fds.items():
            if name.startswith(LOCK_FD_PREFIX):
                port = int(name.removeprefix(LOCK_FD_PREFIX))
                self._held.setdefault(port, socket.socket(fileno=fd))

    def keep_only(self, ports: Iterable[int]) -> None:
        """Release every port held that is not in `ports`."""
        keep = set(ports)
        for port in [p for p in self._held if p not in keep]:
            self._held.pop(port).close()

    def close(self) -> None:
        self.keep_only(())

    def _lock(self, port: int) -> socket.socket:
        address = self._address
        where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0{NAME_PREFIX}/{address}/{port}".encode())
        except OSError as exc:
            sock.close()
            # EADDRINUSE: the same words as the bind check's
            doing = "listen on" if exc.errno == errno.EADDRINUSE else "lock"
            raise StartupError(f"cannot {doing} port {port} ({where}): {bind_hint(exc)}") from None
        return sock
