"""tcpproxy's plan for its workers: each binds every port with SO_REUSEPORT."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.listeners import open_listener
from tcpproxy.workers.link import worker_argv
from tcpproxy.workers.portlock import PortLocks

__all__ = ["TcpPlan"]


class TcpPlan:
    """tcpproxy's workers each bind every port with SO_REUSEPORT."""

    name = "tcpproxy"
    worker_listeners = False  # each worker binds its own: they close at an upgrade
    migrate_req = True  # so the kernel must move their queues (net.ipv4.tcp_migrate_req)

    def __init__(self, bind: str | None, options: list[str], count: int) -> None:
        self._bind = bind
        self._options = options
        self._count = count
        self._locks = PortLocks(bind)  # held for the process's life (the kernel drops them)

    def check(self, old: Config, new: Config) -> None:
        """Every new port must be free: bound here WITHOUT SO_REUSEPORT, which
        fails if anyone listens there (a second tcpproxy --workers would
        otherwise join the port's reuseport group and take half its traffic).
        Each is first locked (PortLocks), so a second supervisor checking at the
        same instant cannot pass too; a port the reload does not keep is
        released by `after_workers` or `restore`."""
        names = {port: app.name for app in new.apps for port in app.ports}
        held = self._locks.ports
        try:  # a port held already (handed over by an upgrade) is ours: our workers join it
            for port in sorted(new.ports - old.ports - held):
                try:
                    self._locks.take([port])
                    open_listener(self._bind, port, listen=False).close()
                except StartupError as exc:
                    raise StartupError(f"app {names[port]!r}: {exc}") from None
        except BaseException:
            self._locks.keep_only(held)
            raise

    def adopt(self, fds: dict[str, int]) -> None:
        """Hold the port locks the old supervisor handed over (an upgrade)."""
        self._locks.adopt(fds)

    def upgrade_fds(self, listeners: Mapping[int, Mapping[int, socket.socket]]) -> dict[str, int]:
        """What an upgrade hands the new supervisor (duplicates): the port locks (its
        workers bind their own sockets and join the reuseport groups)."""
        fds: dict[str, int] = {}
        try:
            for name, fd in self._locks.fds().items():
                fds[name] = os.dup(fd)
        except BaseException:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return fds

    def upgraded(self, succeeded: bool, config: Config) -> None:
        pass

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], tuple[int, ...]]:
        return worker_argv("tcpproxy", control_fd, index, self._count, self._options), ()

    def worker_started(self, index: int) -> None:
        pass

    def worker_died(self, index: int) -> None:
        pass  # its sockets left the reuseport groups with it

    def before_workers(self, old: Config, new: Config) -> None:
        pass

    def after_workers(self, old: Config, new: Config) -> None:
        self._locks.keep_only(new.ports)  # removed ports are free for others now

    def restore(self, config: Config) -> None:
        self._locks.keep_only(config.ports)  # a rejected reload's added ports

    def stopping(self) -> None:
        pass
