"""tcpproxy's frontend: one listening socket per configured port."""

from __future__ import annotations

import logging
import socket

import trio

from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.fdstore import FdStore, Wanted
from tcpproxy.listeners import open_listener
from tcpproxy.proxy import Proxy

__all__ = ["STORE_PREFIX", "PortListeners"]

log = logging.getLogger("tcpproxy")

STORE_PREFIX = "tcpproxy-port-"  # + PORT: a listener's name in the service manager's store


class PortListeners:
    """A listener per port, opened and closed as the config's ports change.

    Resource handling: owns every listening socket. `open()` opens all or
    none; `serve()` closes them when it is cancelled; `update()` opens the
    new ports before anything else changes, so a port that cannot be bound
    rejects the whole reload, and ports that stay keep their socket (no gap).
    """

    name = "tcpproxy"

    def __init__(self, bind: str | None = None, *, reuse_port: bool = False) -> None:
        self._bind = bind
        self._reuse_port = reuse_port  # workers: each has its own socket per port
        self._pending: dict[int, socket.socket] = {}  # opened, not yet accepting
        self._scopes: dict[int, trio.CancelScope] = {}  # accepting
        self._accepting: dict[int, socket.socket] = {}  # their sockets, for an upgrade
        self._nursery: trio.Nursery | None = None
        self._proxy: Proxy | None = None

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._pending) | frozenset(self._scopes)

    def _open_all(self, ports: frozenset[int], config: Config) -> dict[int, socket.socket]:
        names = {port: app.name for app in config.apps for port in app.ports}
        opened: dict[int, socket.socket] = {}
        try:
            for port in sorted(ports):
                try:
                    opened[port] = open_listener(self._bind, port, reuse_port=self._reuse_port)
                except StartupError as exc:
                    name = names.get(port)
                    raise StartupError(f"app {name or '?'!r}: {exc}", app=name) from None
        except BaseException:
            for sock in opened.values():
                sock.close()
            raise
        return opened

    def open(self, config: Config, inherited: dict[int, socket.socket] | None = None) -> None:
        """Bind every port of `config`; raises StartupError naming the first that fails.

        `inherited`: listeners handed over by the process this one upgrades
        (tcpproxy.upgrade), used for their ports instead of binding; those of
        ports `config` no longer has are closed.
        """
        for port, sock in (inherited or {}).items():
            if port in config.ports:
                self._pending[port] = sock
            else:
                sock.close()
        self._pending.update(self._open_all(config.ports - self.ports, config))

    def open_each(
        self, config: Config, inherited: dict[int, socket.socket] | None = None
    ) -> dict[str, StartupError]:
        """`open()` app by app (a fleet node, whose apps are independent): the ports
        of each app that can be bound are; the apps that cannot are returned by name
        with the error, none of their ports left open (`keep_only` closes those of
        apps set aside later)."""
        for port, sock in (inherited or {}).items():
            if port in config.ports:
                self._pending[port] = sock
            else:
                sock.close()
        failed: dict[str, StartupError] = {}
        for app in config.apps:
            try:
                self._pending.update(self._open_all(frozenset(app.ports) - self.ports, config))
            except StartupError as exc:
                failed[app.name] = exc
        return failed

    def keep_only(self, ports: frozenset[int]) -> None:
        """Before `serve`: close the listeners opened for ports no longer wanted."""
        for port in sorted(frozenset(self._pending) - ports):
            self._pending.pop(port).close()

    def sockets(self) -> dict[int, socket.socket]:
        """Every listening socket by port, to hand over to a new process (an upgrade)."""
        return {**self._accepting, **self._pending}

    def from_store(self, store: FdStore, ports: frozenset[int]) -> dict[int, socket.socket]:
        """The listeners of `ports` the service manager kept for us (tcpproxy.fdstore),
        by port, to `open` on; any other it handed back is closed."""
        wanted = {
            f"{STORE_PREFIX}{port}": Wanted(self._bind, port, self._reuse_port)
            for port in sorted(ports)
        }
        taken = store.take(wanted)
        return {int(name.removeprefix(STORE_PREFIX)): sock for name, sock in taken.items()}

    def stored(self) -> dict[str, int]:
        """What the service manager's store keeps: every listener, by name."""
        return {
            f"{STORE_PREFIX}{port}": sock.fileno() for port, sock in sorted(self.sockets().items())
        }

    async def serve(
        self, proxy: Proxy, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._proxy = nursery, proxy
                self._start_pending()
                task_status.started()
                await trio.sleep_forever()  # the port set may become empty; keep serving reloads
        finally:
            self._nursery = None
            for sock in self._pending.values():
                sock.close()
            self._pending.clear()

    def _start_pending(self) -> None:
        assert self._nursery is not None and self._proxy is not None
        for port, sock in sorted(self._pending.items()):
            scope = trio.CancelScope()
            self._scopes[port] = scope
            self._accepting[port] = sock
            self._nursery.start_soon(self._accept, scope, sock, port, self._proxy)
        self._pending.clear()

    async def _accept(
        self, scope: trio.CancelScope, sock: socket.socket, port: int, proxy: Proxy
    ) -> None:
        try:
            with scope:
                await proxy.serve_listener(sock, port)
        finally:
            if self._accepting.get(port) is sock:
                del self._accepting[port]

    def update(self, old: Config, new: Config) -> None:
        added = new.ports - self.ports
        removed = self.ports - new.ports
        self._pending.update(self._open_all(added, new))  # may raise: nothing changed yet
        if self._nursery is not None:
            self._start_pending()
        for port in sorted(added):
            log.info("listening on port %d", port)
        for port in sorted(removed):
            scope = self._scopes.pop(port, None)
            self._accepting.pop(port, None)
            if scope is not None:
                scope.cancel()  # its loop closes the socket; its connections go on
            else:
                self._pending.pop(port).close()
            log.info("stopped listening on port %d", port)
