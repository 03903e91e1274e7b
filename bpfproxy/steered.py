"""bpfproxy's frontend: one listening socket, every configured port steered to it."""

from __future__ import annotations

import logging
import socket
import time

import trio

from bpfproxy.dispatcher import Dispatcher
from bpfproxy.errors import SteeringError
from tcpproxy.config import Config
from tcpproxy.diff import format_ports
from tcpproxy.errors import StartupError
from tcpproxy.metrics import NullMetrics
from tcpproxy.proxy import Proxy

__all__ = ["SharedListener", "SteeredListener", "check_listen_port"]

log = logging.getLogger("tcpproxy")


def check_listen_port(listen_port: int, config: Config) -> None:
    """The listening port is served normally, so no app may claim it."""
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
        self, proxy: Proxy, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # port None: each connection's own destination port (getsockname) picks its app
        await proxy.serve_listener(self._listener, None, task_status=task_status)

    def update(self, old: Config, new: Config) -> None:
        pass


class SteeredListener(SharedListener):
    """One listener; the BPF port map decides which connections reach it.

    Resource handling: owns neither the socket nor the dispatcher (the CLI
    opens and closes both, dispatcher first so no port stays captured);
    `serve()` accepts until cancelled.
    """

    name = "bpfproxy"

    def __init__(
        self,
        listener: socket.socket,
        dispatcher: Dispatcher,
        listen_port: int,
        metrics: NullMetrics | None = None,
    ) -> None:
        super().__init__(listener)
        self._dispatcher = dispatcher
        self._metrics = metrics or NullMetrics()
        self._listen_port = listen_port

    async def serve(
        self, proxy: Proxy, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until cancelled; SYNs are held (pinned state) while serving, and refused
        again from the moment serving stops (a clean stop), as without pinned state."""
        self._dispatcher.set_hold(True)
        try:
            await super().serve(proxy, task_status=task_status)
        except trio.Cancelled:
            self._dispatcher.set_hold(False)
            raise

    def steer(self, config: Config) -> None:
        """Make the port map hold exactly `config`'s ports, logging the change."""
        started = time.perf_counter()
        try:
            added, removed = self._dispatcher.set_ports(config.ports)
        except SteeringError as exc:
            raise StartupError(f"port map: {exc}") from None
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
