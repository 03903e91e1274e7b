"""tcpproxy's frontend: one listening socket per configured port."""

from __future__ import annotations

import logging
import socket

import trio

from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.fdstore import FdStore, Wanted
from tcpproxy.listeners import ListenerHost, open_listener

__all__ = ["STORE_PREFIX", "PortListeners"]

log = logging.getLogger("tcpproxy")

STORE_PREFIX = "tcpproxy-port-"  # + PORT: a listener's name in the service manager's store


class PortListeners:
    """A listener per port, opened and closed as the config's ports change.

    Resource handling: owns every listening socket. `open()` opens all or
    none; `serve()` hands them to the engine, and takes them back and closes
    them when it is cancelled; `update()` opens the new ports before anything
    else changes, so a port that cannot be bound rejects the whole reload,
    ports that stay keep their socket (no gap), and a removed port's socket
    is taken back from the engine and closed at once.
    """

    name = "tcpproxy"

    def __init__(self, bind: str | None = None, *, reuse_port: bool = False) -> None:
        self._bind = bind
        self._reuse_port = reuse_port  # workers: each has its own socket per port
        self._pending: dict[int, socket.socket] = {}  # opened, not yet accepting
        self._accepting: dict[int, socket.socket] = {}  # handed to the engine
        self._host: ListenerHost | None = None  # the engine, while serving

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._pending) | frozenset(self._accepting)

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
        self, host: ListenerHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hand every listener to `host` (the engine, which accepts on them) until
        cancelled; then take each back and close it (its connections go on)."""
        self._host = host
        try:
            self._start_pending()
            task_status.started()
            await trio.sleep_forever()  # the port set may become empty; keep serving reloads
        finally:
            for port in sorted(self._accepting):
                self._stop(port)
            self._host = None
            for sock in self._pending.values():
                sock.close()
            self._pending.clear()

    def _start_pending(self) -> None:
        assert self._host is not None
        for port, sock in sorted(self._pending.items()):
            self._host.add_listener(sock, port)
            self._accepting[port] = sock
        self._pending.clear()

    def _stop(self, port: int) -> None:
        """Stop accepting on `port` and close its socket; its connections go on."""
        assert self._host is not None
        sock = self._accepting.pop(port)
        self._host.remove_listener(sock)
        sock.close()

    def update(self, old: Config, new: Config) -> None:
        added = new.ports - self.ports
        removed = self.ports - new.ports
        self._pending.update(self._open_all(added, new))  # may raise: nothing changed yet
        if self._host is not None:
            self._start_pending()
        for port in sorted(added):
            log.info("listening on port %d", port)
        for port in sorted(removed):
            if port in self._accepting:
                self._stop(port)
            else:
                self._pending.pop(port).close()
            log.info("stopped listening on port %d", port)
