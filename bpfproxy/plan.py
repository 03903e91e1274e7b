"""bpfproxy's plan for its workers: one reuseport group, the BPF side in the supervisor."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from bpfproxy.errors import SteeringError
from bpfproxy.steered import check_listen_port
from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.listeners import open_listener
from tcpproxy.workers.link import worker_argv
from tcpproxy.workers.portlock import PortLocks

if TYPE_CHECKING:
    from bpfproxy.pinning import Instance
    from tcpproxy.privileges import Account

__all__ = ["BpfPlan"]

log = logging.getLogger("tcpproxy")


class BpfPlan:
    """bpfproxy's workers: one listener each, all in one SO_REUSEPORT group on
    the -p port; the supervisor owns the BPF program, its maps and link (pinned
    in ``pins``, the instance's state in bpffs, when given), and
    keeps a copy of every listener so it can steer to a live one when a worker
    dies (the sockmap entry of a closed socket disappears)."""

    name = "bpfproxy"

    def __init__(
        self,
        bind: str | None,
        listen_port: int,
        options: list[str],
        count: int,
        pins: Instance | None = None,
    ) -> None:
        from bpfproxy.dispatcher import Dispatcher

        self._bind, self._port, self._options, self._count = bind, listen_port, options, count
        self._listeners: list[socket.socket | None] = []
        self.dispatcher: Dispatcher | None = None
        self._locks = PortLocks(bind)
        try:
            # Locked (atomic against a second supervisor starting at the same
            # instant), then bound once WITHOUT SO_REUSEPORT: fails if anyone
            # listens on the port, where our reuseport group would otherwise join theirs.
            self._locks.take([listen_port])
            open_listener(bind, listen_port, listen=False).close()
            self._listeners = [self._open() for _ in range(count)]
            first = self._listeners[0]
            assert first is not None
            self.dispatcher = pins.dispatcher(first) if pins else Dispatcher(first)
            self._steered: int | None = 0  # whose listener is in the sockmap
        except BaseException:
            self.close()
            raise

    def hand_to(self, account: Account | None) -> None:
        """Make the listeners ``account``'s (fchown sets a socket's owner), before the
        supervisor drops to it: a listener it opens later for a restarted worker joins
        the SO_REUSEPORT group only if its owner is the group's."""
        if account is None:
            return
        for sock in self._listeners:
            if sock is not None:
                try:
                    os.fchown(sock.fileno(), account.uid, account.gid)
                except OSError as exc:
                    raise SteeringError(
                        f"cannot give the listener to uid {account.uid}: {exc.strerror}."
                    ) from exc

    def _open(self) -> socket.socket:
        return open_listener(self._bind, self._port, reuse_port=True)

    def steer(self, config: Config) -> None:
        assert self.dispatcher is not None
        self.dispatcher.set_ports(config.ports)

    def check(self, old: Config, new: Config) -> None:
        check_listen_port(self._port, new)

    def upgrade_fds(self) -> dict[str, int] | None:
        return None  # not yet: the BPF state and the group's listener would go too

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], tuple[int, ...]]:
        listener = self._listeners[index]
        if listener is None:  # its worker died: a fresh member of the group
            listener = self._listeners[index] = self._open()
        fd = listener.fileno()
        options = [*self._options, "--port", str(self._port), "--worker-listener", str(fd)]
        return worker_argv("bpfproxy", control_fd, index, self._count, options), (fd,)

    def worker_started(self, index: int) -> None:
        if self._steered is None:  # every worker had died: steer to this new one
            self._steer_to(index)

    def worker_died(self, index: int) -> None:
        dead = self._listeners[index]
        self._listeners[index] = None
        if self._steered == index:
            live = next((i for i, sock in enumerate(self._listeners) if sock is not None), None)
            self._steered = None
            if live is not None:
                self._steer_to(live)
        if dead is not None:
            dead.close()  # leaves the group; connections queued on it are reset

    def _steer_to(self, index: int) -> None:
        from bpfproxy.errors import SteeringError

        sock = self._listeners[index]
        if sock is None or self.dispatcher is None:
            return
        try:
            self.dispatcher.set_listener(sock)
        except SteeringError as exc:
            log.error("cannot steer to worker %d's listener: %s", index, exc)
            return
        self._steered = index

    def before_workers(self, old: Config, new: Config) -> None:
        self._set_ports(old.ports & new.ports)  # withdraw removed ports first

    def after_workers(self, old: Config, new: Config) -> None:
        self._set_ports(new.ports)  # then steer added ones, routes in place

    def restore(self, config: Config) -> None:
        self._set_ports(config.ports)  # a rejected reload: steer exactly the running ports

    def _set_ports(self, ports: frozenset[int]) -> None:
        from bpfproxy.errors import SteeringError

        assert self.dispatcher is not None
        try:
            self.dispatcher.set_ports(ports)
        except SteeringError as exc:
            raise StartupError(f"port map: {exc}") from None

    def serving(self) -> None:
        """The workers serve: hold SYNs while no listener is there (pinned state only)."""
        assert self.dispatcher is not None
        self.dispatcher.set_hold(True)

    def stopping(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.set_hold(False)  # a clean stop refuses at once, as before
        for sock in self._listeners:
            if sock is not None:
                sock.close()  # the workers' copies close as they stop; then ports refuse

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
        self.stopping()
        self._locks.close()
