"""tcpproxy's plan for its workers: each binds every port with SO_REUSEPORT.

An upgrade hands the new supervisor each old worker's listeners
(``listen:INDEX:PORT``, collected by the pool) and the port locks; the new
worker INDEX starts on those sockets (``--worker-listener PORT:FD``) and
binds only the ports they lack, so no listener closes and nothing queued at
one is reset.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.listeners import open_listener
from tcpproxy.upgrade import duplicates
from tcpproxy.workers.link import worker_argv
from tcpproxy.workers.portlock import PortLocks

__all__ = ["LISTENER_FD_PREFIX", "TcpPlan"]

LISTENER_FD_PREFIX = "listen:"  # a worker's listener among an upgrade's descriptors


class TcpPlan:
    """tcpproxy's workers each bind every port with SO_REUSEPORT."""

    name = "tcpproxy"
    worker_listeners = True  # each worker binds its own: asked for them at an upgrade

    def __init__(self, bind: str | None, options: list[str], count: int) -> None:
        self._bind = bind
        self._options = options
        self._count = count
        self._locks = PortLocks(bind)  # held for the process's life (the kernel drops them)
        # handed over by an upgrade, per worker index: given to its first start
        self._inherited: dict[int, dict[int, socket.socket]] = {}

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
                    raise StartupError(f"app {names[port]!r}: {exc}", app=names[port]) from None
        except BaseException:
            self._locks.keep_only(held)
            raise

    def adopt(self, fds: dict[str, int]) -> None:
        """Take what the old supervisor handed over (an upgrade; every descriptor is
        ours now): its port locks, and its workers' listeners for ours."""
        self._locks.adopt(fds)
        for name, fd in fds.items():
            if name.startswith(LISTENER_FD_PREFIX):
                where = name.removeprefix(LISTENER_FD_PREFIX)
                index, port = (int(part) for part in where.split(":"))
                sock = socket.socket(fileno=fd)
                if index >= self._count or port in self._inherited.get(index, {}):
                    sock.close()
                else:
                    self._inherited.setdefault(index, {})[port] = sock

    def upgrade_fds(self, listeners: Mapping[int, Mapping[int, socket.socket]]) -> dict[str, int]:
        """What an upgrade hands the new supervisor (duplicates): the port locks and
        every worker's listeners, ``listen:INDEX:PORT``."""
        named = [
            (f"{LISTENER_FD_PREFIX}{index}:{port}", sock.fileno())
            for index, sockets in listeners.items()
            for port, sock in sockets.items()
        ]
        return duplicates([*self._locks.fds().items(), *named])

    def upgraded(self, succeeded: bool, config: Config) -> None:
        pass  # the old workers close their descriptors as they stop: the sockets live on

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], tuple[int, ...]]:
        options = list(self._options)
        inherited = self._inherited.get(index, {})
        for port, sock in sorted(inherited.items()):
            options += ["--worker-listener", f"{port}:{sock.fileno()}"]
        argv = worker_argv("tcpproxy", control_fd, index, self._count, options)
        return argv, tuple(sock.fileno() for sock in inherited.values())

    def worker_started(self, index: int) -> None:
        for sock in self._inherited.pop(index, {}).values():
            sock.close()  # the worker has its own reference now

    def worker_died(self, index: int) -> None:
        pass  # its sockets left the reuseport groups with it

    def before_workers(self, old: Config, new: Config) -> None:
        pass

    def after_workers(self, old: Config, new: Config) -> None:
        self._locks.keep_only(new.ports)  # removed ports are free for others now

    def restore(self, config: Config) -> None:
        self._locks.keep_only(config.ports)  # a rejected reload's added ports
        for sockets in self._inherited.values():  # handed over for a port dropped since
            for port in [port for port in sockets if port not in config.ports]:
                sockets.pop(port).close()

    def stopping(self) -> None:
        pass

    def stored(self) -> dict[str, int]:
        return {}  # the supervisor holds no listener: its workers bind their own
