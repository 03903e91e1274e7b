"""bpfproxy's plan for its workers: one reuseport group, the BPF side in the supervisor.

An upgrade hands the new supervisor the group's listeners (``group:INDEX``:
the copy of each worker's), the port lock and the BPF state
(bpfproxy.handover: programs, maps, link, the instance's locked directory);
its worker INDEX serves on the old worker INDEX's listener, so no member of
the group closes and nothing queued is reset. Once it serves the old plan
touches neither the maps nor the hold flag again (`handed_over`).

With the service manager's store (tcpproxy.fdstore) the supervisor keeps
every member there (``bpfproxy-group-INDEX``), in step as workers die and
start again: after a crash of the whole service the members come back
(`kept_group`), open all along and in the sockmap, with what they queued;
the group goes on with them and the first one is steered to again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bpfproxy.errors import SteeringError
from bpfproxy.steered import check_listen_port
from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.fdstore import FdStore, Wanted
from tcpproxy.listeners import open_listener
from tcpproxy.upgrade import duplicates
from tcpproxy.workers.link import worker_argv
from tcpproxy.workers.portlock import LOCK_FD_PREFIX, PortLocks

if TYPE_CHECKING:
    from bpfproxy.dispatcher import Dispatcher
    from bpfproxy.pinning import Instance
    from tcpproxy.privileges import Account
    from tcpproxy.upgrade import Handover

__all__ = ["GROUP_FD_PREFIX", "GROUP_STORE_PREFIX", "BpfPlan", "kept_group"]

log = logging.getLogger("tcpproxy")

GROUP_FD_PREFIX = "group:"  # worker INDEX's member of the group among an upgrade's descriptors
GROUP_STORE_PREFIX = "bpfproxy-group-"  # + INDEX: its name in the service manager's store


def kept_group(
    store: FdStore, bind: str | None, listen_port: int, count: int
) -> dict[int, socket.socket]:
    """The members of the group the service manager kept (a crash), by worker index."""
    wanted = {
        f"{GROUP_STORE_PREFIX}{index}": Wanted(bind, listen_port, reuse_port=True)
        for index in range(count)
    }
    taken = store.take(wanted)
    return {int(name.removeprefix(GROUP_STORE_PREFIX)): sock for name, sock in taken.items()}


class BpfPlan:
    """bpfproxy's workers: one listener each, all in one SO_REUSEPORT group on
    the -p port; the supervisor owns the BPF program, its maps and link (pinned
    in ``pins``, the instance's state in bpffs, when given), and
    keeps a copy of every listener so it can steer to a live one when a worker
    dies (the sockmap entry of a closed socket disappears)."""

    name = "bpfproxy"
    worker_listeners = False  # the supervisor holds a copy of each: nothing to ask the workers

    def __init__(
        self,
        bind: str | None,
        listen_port: int,
        options: list[str],
        count: int,
        pins: Instance | None = None,
        kept: Mapping[int, socket.socket] | None = None,
    ) -> None:
        """`kept`: members of the group the service manager kept after a crash
        (tcpproxy.fdstore), by worker index, now ours: the group goes on with them,
        with what they queued, and the first is steered to (put in the sockmap,
        whatever the pinned one holds)."""
        from bpfproxy.dispatcher import Dispatcher

        self._init(bind, listen_port, options, count)
        self.pins = pins
        try:
            # Locked (atomic against a second supervisor starting at the same
            # instant), then bound once WITHOUT SO_REUSEPORT: fails if anyone
            # listens on the port, where our reuseport group would otherwise join theirs.
            self._locks.take([listen_port])
            if kept:  # the group lives on; a missing member is opened by its worker's start,
                # as the serving user (a member joins the group of its owner only)
                self._listeners = [kept.get(index) for index in range(count)]
            else:
                open_listener(bind, listen_port, listen=False).close()
                self._listeners = [self._open() for _ in range(count)]
            steered = next(i for i, sock in enumerate(self._listeners) if sock is not None)
            first = self._listeners[steered]
            assert first is not None
            self.dispatcher = pins.dispatcher(first) if pins else Dispatcher(first)
            self._steered = steered
        except BaseException:
            for sock in (kept or {}).values():
                sock.close()
            self.close()
            raise

    def _init(self, bind: str | None, listen_port: int, options: list[str], count: int) -> None:
        self._bind, self._port, self._options, self._count = bind, listen_port, options, count
        self._listeners: list[socket.socket | None] = [None] * count
        self.dispatcher: Dispatcher | None = None
        self.pins: Instance | None = None
        self._locks = PortLocks(self._bind)
        self._steered: int | None = None  # whose listener is in the sockmap
        self._handover: Handover | None = None  # set in a supervisor an upgrade started
        self.handed_over = False  # an upgrade's new supervisor owns the BPF state now

    @classmethod
    def adopt(
        cls,
        bind: str | None,
        listen_port: int,
        options: list[str],
        count: int,
        handover: Handover,
        bpffs: str,
        instance: str,
    ) -> BpfPlan:
        """The plan of a supervisor an upgrade started, on what the old one handed over
        (`handover.fds`, all taken: ours, closed on failure too): the group's
        listeners (its worker i serves on the old worker i's; a missing one is opened
        anew, joining the group), the port lock and the BPF state (no compile, no
        capability). `plan.pins` is then the caller's to close.

        Raises SteeringError if the BPF state is incomplete or refused.
        """
        from bpfproxy.handover import adopt

        plan = cls.__new__(cls)
        plan._init(bind, listen_port, options, count)
        plan._handover = handover
        taken, handover.fds = dict(handover.fds), {}
        try:
            locks = [key for key in taken if key.startswith(LOCK_FD_PREFIX)]
            plan._locks.adopt({key: taken.pop(key) for key in locks})
            for key in [k for k in taken if k.startswith(GROUP_FD_PREFIX)]:
                index = int(key.removeprefix(GROUP_FD_PREFIX))
                sock = socket.socket(fileno=taken.pop(key))
                if index < count and plan._listeners[index] is None:
                    plan._listeners[index] = sock
                else:
                    sock.close()
            steered = next((i for i, sock in enumerate(plan._listeners) if sock is not None), 0)
            listener = plan._listeners[steered]
            if listener is None:
                listener = plan._listeners[steered] = plan._open()
            bpf, taken = taken, {}
            plan.pins, plan.dispatcher = adopt(bpf, listener, bpffs, instance)
            plan._steered = steered
        except BaseException:
            for fd in taken.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            plan.close()
            raise
        return plan

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

    def upgrade_fds(self, listeners: Mapping[int, Mapping[int, socket.socket]]) -> dict[str, int]:
        """Duplicates of the port lock, the group's listeners (``group:INDEX``) and
        the BPF state (bpfproxy.handover, the instance's locked directory included)."""
        from bpfproxy.handover import state_fds

        assert self.dispatcher is not None
        group = {
            f"{GROUP_FD_PREFIX}{index}": sock.fileno()
            for index, sock in enumerate(self._listeners)
            if sock is not None
        }
        state = state_fds(self.dispatcher, self.pins)
        return duplicates([*self._locks.fds().items(), *group.items(), *state.items()])

    def upgraded(self, succeeded: bool, config: Config) -> None:
        """True: the BPF state is the new supervisor's (no map, hold flag or pin is
        touched here again). False: ours still, but the new one may have diffed the
        port map and steered to another member: both are brought back."""
        from bpfproxy.errors import SteeringError

        if succeeded:
            self.handed_over = True
            return
        assert self.dispatcher is not None
        try:
            self.dispatcher.resync()
            self.dispatcher.set_hold(True)  # still serving here
            if self._steered is not None:
                self._steer_to(self._steered)
            self._set_ports(config.ports)
        except (OSError, SteeringError, StartupError) as exc:
            log.error("upgrade failed and the BPF state could not be taken back: %s", exc)

    def _owns_state(self) -> bool:
        """Not handed to a new supervisor, and (if an upgrade started this one) taken over."""
        return not self.handed_over and (self._handover is None or self._handover.served)

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], tuple[int, ...]]:
        listener = self._listeners[index]
        if listener is None:  # its worker died: a fresh member of the group
            listener = self._listeners[index] = self._open()
        fd = listener.fileno()
        options = [*self._options, "--port", str(self._port), "--worker-listener", str(fd)]
        return worker_argv("bpfproxy", control_fd, index, self._count, options), (fd,)

    def worker_started(self, index: int) -> None:
        if self._steered is None and not self.handed_over:  # every worker had died
            self._steer_to(index)

    def worker_died(self, index: int) -> None:
        dead = self._listeners[index]
        self._listeners[index] = None
        if self._steered == index and not self.handed_over:
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
        if self.handed_over:
            raise StartupError("the port map is the new supervisor's (upgraded)")
        try:
            self.dispatcher.set_ports(ports)
        except SteeringError as exc:
            raise StartupError(f"port map: {exc}") from None

    def serving(self) -> None:
        """The workers serve: hold SYNs while no listener is there (pinned state only)."""
        assert self.dispatcher is not None
        self.dispatcher.set_hold(True)

    def stopping(self) -> None:
        if self.dispatcher is not None and self._owns_state():
            self.dispatcher.set_hold(False)  # a clean stop refuses at once, as before
        for sock in self._listeners:
            if sock is not None:
                # close(), never shutdown(): after an upgrade the new workers accept on it
                sock.close()  # the workers' copies close as they stop; then ports refuse

    def stored(self) -> dict[str, int]:
        """The group's members, to keep in the service manager's store."""
        return {
            f"{GROUP_STORE_PREFIX}{index}": sock.fileno()
            for index, sock in enumerate(self._listeners)
            if sock is not None
        }

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
        self.stopping()
        self._locks.close()
