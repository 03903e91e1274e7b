"""bpfproxy's frontend: one listening socket, every configured port steered to it."""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

import trio

from bpfproxy.dispatcher import Dispatcher
from bpfproxy.errors import SteeringError
from bpfproxy.handover import state_fds
from tcpproxy.config import Config
from tcpproxy.diff import format_ports
from tcpproxy.errors import StartupError
from tcpproxy.listeners import ListenerHost
from tcpproxy.metrics import NullMetrics

if TYPE_CHECKING:
    from bpfproxy.pinning import Instance

__all__ = ["STORE_NAME", "SharedListener", "SteeredListener", "check_listen_port"]

log = logging.getLogger("tcpproxy")

STORE_NAME = "bpfproxy-listener"  # the one listener's name in the service manager's store


def check_listen_port(listen_port: int, config: Config) -> None:
    """The listening port is served normally, so no app may claim it."""
    if listen_port not in config.ports:
        return
    for app in config.apps:
        if listen_port in app.ports:
            index = app.ports.index(listen_port)
            raise StartupError(
                f"port {listen_port} of app {app.name!r} (Ports[{index}]) is bpfproxy's own "
                f"listening port (-p): choose another -p or remove the port from the app"
            )


class SharedListener:
    """A bpfproxy worker's frontend: its member of the listeners' reuseport group.

    The supervisor owns the port map, so a reload changes nothing here.
    """

    name = "bpfproxy"

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener

    async def serve(
        self, host: ListenerHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hand the listener to `host` (the engine, which accepts on it) until cancelled;
        then take it back and close it (its connections go on)."""
        # port None: each connection's own destination port (getsockname) picks its app
        host.add_listener(self._listener, None)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            host.remove_listener(self._listener)
            self._listener.close()

    def update(self, old: Config, new: Config) -> None:
        pass


class SteeredListener(SharedListener):
    """One listener; the BPF port map decides which connections reach it.

    Resource handling: owns neither the socket nor the dispatcher (the CLI
    opens and closes both, dispatcher first so no port stays captured);
    `serve()` accepts until cancelled. After an upgrade handed the state over
    (`handed_over`), nothing here touches the maps again: they are the new
    process's.
    """

    name = "bpfproxy"

    def __init__(
        self,
        listener: socket.socket,
        dispatcher: Dispatcher,
        listen_port: int,
        metrics: NullMetrics | None = None,
        pins: Instance | None = None,
    ) -> None:
        super().__init__(listener)
        self._dispatcher = dispatcher
        self._metrics = metrics or NullMetrics()
        self._listen_port = listen_port
        self._pins = pins
        self._config: Config | None = None
        self.handed_over = False

    def sockets(self) -> dict[int, socket.socket]:
        """The one listener, for an upgrade (tcpproxy.upgrade)."""
        return {self._listen_port: self._listener}

    def stored(self) -> dict[str, int]:
        """What the service manager's store keeps (tcpproxy.fdstore): the listener,
        so that it stays open, in the sockmap, with its queue, if this process dies."""
        return {STORE_NAME: self._listener.fileno()}

    def fds(self) -> dict[str, int]:
        """The BPF descriptors an upgrade hands over (bpfproxy.handover)."""
        return state_fds(self._dispatcher, self._pins)

    def upgraded(self, succeeded: bool) -> None:
        """After an upgrade: the state is the new process's (leave the maps, the hold
        flag and the pins alone), or, if it failed, ours again: the new process may
        have diffed the port map to its config, so it is brought back to ours."""
        if succeeded:
            self.handed_over = True
            return
        try:
            self._dispatcher.resync()
            self._dispatcher.set_hold(True)  # still serving here
        except (OSError, SteeringError) as exc:
            log.error("upgrade failed and the BPF state could not be taken back: %s", exc)
        if self._config is not None:
            try:
                self.steer(self._config)
            except StartupError as exc:
                log.error("upgrade failed and the port map could not be restored: %s", exc)

    async def serve(
        self, host: ListenerHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until cancelled; SYNs are held (pinned state) while serving, and refused
        again from the moment serving stops (a clean stop), as without pinned state."""
        self._dispatcher.set_hold(True)
        try:
            await super().serve(host, task_status=task_status)
        except trio.Cancelled:
            if not self.handed_over:  # else the new process serves: SYNs stay held
                self._dispatcher.set_hold(False)
            raise

    def steer(self, config: Config) -> None:
        """Make the port map hold exactly `config`'s ports, logging the change."""
        started = time.perf_counter()
        try:
            added, removed = self._dispatcher.set_ports(config.ports)
        except SteeringError as exc:
            raise StartupError(f"port map: {exc}") from None
        self._config = config
        elapsed = (time.perf_counter() - started) * 1000
        self._metrics.steered_ports(len(self._dispatcher.ports))
        if added or removed:
            log.info(
                "port map: %d ports steered (added %s; removed %s) in %.1f ms",
                len(self._dispatcher.ports), format_ports(added) if added else "none",
                format_ports(removed) if removed else "none", elapsed,
            )  # fmt: skip

    def update(self, old: Config, new: Config) -> None:
        check_listen_port(self._listen_port, new)
        self.steer(new)
