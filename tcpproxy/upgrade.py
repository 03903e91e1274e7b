"""Upgrade on SIGUSR2: start the new version and hand it the listening sockets.

The old process (`start_successor`) starts its own command line again (the
interpreter and the code are read from disk anew, so a newly installed
version runs), with one end of a SOCK_SEQPACKET socket pair inherited; its
number is in UPGRADE_FD_ENV. Over it go the listening sockets (SCM_RIGHTS,
in batches of FDS_PER_MESSAGE, each with the ports it carries), then any
other descriptors the new process needs, by name (bpfproxy: its BPF program,
maps, link and instance lock; the --metrics listener, METRICS_FD, which has
no SO_REUSEPORT: the new process serves on the same socket; the socket
connected to systemd's notify socket, NOTIFY_FD, which the new process,
unprivileged, might not be allowed to connect), then an end mark, with the
names the old process keeps in the service manager's store (tcpproxy.fdstore:
the new one stores nothing twice). The new process
(`take_handover`) serves on them (binding only ports its config added), then
says "ready" and waits for "go" (`Handover.confirm`).

Rules:
1. The old process stops accepting only after "ready". Before that, the
   new one may fail in any way (bad config, crash, no answer within
   READY_TIMEOUT): it is stopped (SIGTERM, SIGKILL after STOP_GRACE) and
   the old one goes on as if nothing happened; the log says why.
2. The hand-over is decided by the old process alone, at one instant: on
   "ready" it answers "go" only if it still accepts the hand-over (its
   timeout has not passed, it is not stopping), and from then on it is
   committed (it stops accepting, whatever comes). The new process takes over
   (rewrites the pid file, sends MAINPID= and READY=1) only after "go"; if
   the old one refuses or vanishes first, it does not take over: it stops
   accepting, drains what it accepted, and exits. So the pid file and systemd
   never name a process the old one is about to stop.
3. Both processes hold the same listening sockets (the same open file, not
   copies): the accept queue is one, so a connection waiting in it is
   accepted by one process or the other, never lost. The old one then
   closes its descriptors; close(2) of one reference does not shut down a
   socket another process still holds (shutdown(2) would: nothing here
   calls it on a listener).
4. One upgrade at a time (the caller keeps that).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import trio

from tcpproxy.errors import StartupError

__all__ = [
    "CONFIG_FD",
    "METRICS_FD",
    "NOTIFY_FD",
    "READY_TIMEOUT",
    "UPGRADE_FD_ENV",
    "UPGRADE_LOAD_TIMEOUT",
    "Handover",
    "config_fd",
    "duplicates",
    "read_config_fd",
    "start_successor",
    "successor_environment",
    "take_handover",
]

log = logging.getLogger("tcpproxy")

UPGRADE_FD_ENV = "TCPPROXY_UPGRADE_FD"  # set in the new process only: its end of the pair
READY_TIMEOUT = 10.0  # seconds the new process may take to serve, or it is stopped
STOP_GRACE = 5.0  # seconds a failed new process gets after SIGTERM before SIGKILL
FDS_PER_MESSAGE = 200  # the kernel takes at most 253 descriptors in one message (SCM_MAX_FD)
MESSAGE_SIZE = 65536  # bytes of one message: a batch of ports as JSON, or an answer
METRICS_FD = "metrics"  # the --metrics listener's name among the named descriptors
NOTIFY_FD = "notify"  # the socket connected to $NOTIFY_SOCKET (tcpproxy.notify)
CONFIG_FD = "config"  # the config served (a fleet node's), in a memfd: its last good apps
UPGRADE_LOAD_TIMEOUT = 4.0  # seconds a new process waits for etcd before it starts from the
# config handed over (well within READY_TIMEOUT: the rest is for binding and serving)
READY = b"ready"  # new -> old: it serves on what it was handed
GO = b"go"  # old -> new: the hand-over is decided (rule 2); anything else, or nothing, refuses


def successor_argv() -> list[str]:
    """This process's command line, with the interpreter named by its full path."""
    return [sys.executable, *sys.orig_argv[1:]]


def successor_environment(fd: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The new process's environment: ours, its end of the pair, and no WATCHDOG_PID
    (systemd's names us: with it, the new process would think the watchdog is not
    its own and send no pings once it is the main process)."""
    env = dict(os.environ if environ is None else environ)
    env.pop("WATCHDOG_PID", None)
    env[UPGRADE_FD_ENV] = str(fd)
    return env


async def start_successor(
    sockets: Mapping[int, socket.socket],
    fds: Mapping[str, int] | None = None,
    *,
    unset: tuple[str, ...] = (),
    accept: Callable[[], bool] = lambda: True,
    stored: Sequence[str] | None = None,
) -> int | None:
    """Start the new process, hand it `sockets` (port -> listener) and `fds` (name ->
    descriptor, still ours: the new process gets its own references), wait until it serves.
    `unset`: environment variables the new process must not inherit. `accept`: asked
    once the new process says it serves; False (e.g. this process is stopping)
    refuses the hand-over (rule 2). `stored`: the names this process keeps in the
    service manager's store (tcpproxy.fdstore), so that the new one, serving on
    the same sockets, does not store them again.

    Returns its pid once it was told "go": from then on the caller must stop
    accepting (rule 2). None: it was stopped (rule 1), and the log says why.
    """
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as exc:  # EMFILE, ENFILE: this process goes on serving
        log.error("upgrade failed: cannot make the socket pair: %s", exc)
        return None
    env = successor_environment(theirs.fileno())
    for name in unset:
        env.pop(name, None)
    try:
        process = await trio.lowlevel.open_process(
            successor_argv(), pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        ours.close()
        log.error("upgrade: cannot start the new process: %s", exc)
        return None
    finally:
        theirs.close()
    log.info("upgrade: started pid %d, handing it %d listening sockets, %d descriptors "
             "by name", process.pid, len(sockets), len(fds or {}))  # fmt: skip
    channel = trio.socket.from_stdlib_socket(ours)
    why = "it did not say it serves"
    try:
        with channel:
            with trio.move_on_after(READY_TIMEOUT) as timer:
                try:
                    await _send_sockets(channel, sockets, fds or {}, stored)
                    answer = await channel.recv(MESSAGE_SIZE)
                except OSError as exc:
                    answer, why = b"", f"the socket pair failed: {exc}"
                if answer != READY:
                    await process.wait()  # its end closed: it is exiting (said by its exit code)
                elif not accept():  # rule 2: decided here, no checkpoint until "go" is sent
                    why = "this process is stopping: it refused the hand-over"
                elif _tell(ours, GO):
                    log.info("upgrade: pid %d serves; this process (pid %d) stops accepting",
                             process.pid, os.getpid())  # fmt: skip
                    return process.pid
                else:
                    why = "it was gone before it was told to go"
            if timer.cancelled_caught:
                why = f"it did not serve within {READY_TIMEOUT:g}s"
    except BaseException:  # this process ends meanwhile: it must not leave a half-started one
        with trio.CancelScope(shield=True):
            await _stop(process, "this process stopped during the upgrade")
        raise
    await _stop(process, why)
    return None


async def _send_sockets(
    channel: trio.socket.SocketType,
    sockets: Mapping[int, socket.socket],
    named: Mapping[str, int],
    stored: Sequence[str] | None,
) -> None:
    items = sorted(sockets.items())
    for start in range(0, len(items), FDS_PER_MESSAGE):
        batch = items[start : start + FDS_PER_MESSAGE]
        payload = json.dumps({"ports": [port for port, _ in batch]}).encode()
        fds = [sock.fileno() for _, sock in batch]
        await channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack(fds))])
    others = sorted(named.items())
    for start in range(0, len(others), FDS_PER_MESSAGE):
        batch2 = others[start : start + FDS_PER_MESSAGE]
        payload = json.dumps({"names": [name for name, _ in batch2]}).encode()
        fds = [fd for _, fd in batch2]
        await channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack(fds))])
    done: dict[str, object] = {"done": True}
    if stored is not None:
        done["fdstore"] = list(stored)
    await channel.send(json.dumps(done).encode())


def _tell(channel: socket.socket, message: bytes) -> bool:
    """Send without a checkpoint (rule 2: the decision and "go" are one step); False
    if the peer is gone (a message this small never finds a full buffer)."""
    try:
        return channel.send(message) == len(message)
    except OSError:
        return False


def _pack(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()


async def _stop(process: trio.Process, why: str) -> None:
    """Stop a new process that failed (rule 1), and say why."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.error("upgrade failed: pid %d was stopped: %s; this process goes on serving",
                  process.pid, why)  # fmt: skip
    else:
        log.error("upgrade failed: pid %d exited with code %s before it served (its log "
                  "says why); this process goes on serving", process.pid,
                  process.returncode)  # fmt: skip


def duplicates(named: Iterable[tuple[str, int]]) -> dict[str, int]:
    """A duplicate of each descriptor by name, for a hand-over; all or none (the
    ones already made are closed if one fails)."""
    fds: dict[str, int] = {}
    try:
        for name, fd in named:
            fds[name] = os.dup(fd)
    except BaseException:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return fds


def config_fd(data: bytes) -> int:
    """A descriptor holding `data` (a memfd), to hand the config served to the new
    process as CONFIG_FD; the caller closes it."""
    fd = os.memfd_create("tcpproxy-config", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_config_fd(fd: int) -> bytes:
    """The config handed over in CONFIG_FD (and closes it)."""
    with os.fdopen(fd, "rb") as file:
        file.seek(0)
        return file.read()


class Handover:
    """The new process's end: the sockets it was handed, other descriptors by name
    (`fds`), the --metrics listener (`metrics`) and the notify socket (`notify`),
    if they were handed over, the names the old process keeps in the service
    manager's store (`stored`; None: it said none), and the "ready"/"go"
    exchange (`confirm`).

    Resource handling: owns the channel until `confirm()` or `close()`; the
    sockets, `fds`, `metrics` and `notify` are the caller's once taken.
    """

    def __init__(
        self,
        channel: socket.socket,
        sockets: dict[int, socket.socket],
        fds: dict[str, int] | None = None,
        metrics: socket.socket | None = None,
        notify: socket.socket | None = None,
        stored: list[str] | None = None,
    ) -> None:
        self._channel: socket.socket | None = channel
        self.sockets = sockets
        self.fds = fds if fds is not None else {}
        self.metrics = metrics
        self.notify = notify
        self.stored = stored  # names the old process keeps in the manager's store
        self.served = False  # "go" came: this process has taken over (rule 2)

    def abandoned(self) -> bool:
        """The old process closed its end: it gave up on this one (no answer
        within READY_TIMEOUT) and sent SIGTERM, so this one must not take over."""
        if self._channel is None:
            return False
        poller = select.poll()
        poller.register(self._channel.fileno(), select.POLLIN)
        return any(event & select.POLLHUP for _fd, event in poller.poll(0))

    async def confirm(self) -> bool:
        """Say "ready" (this process serves) and wait for the old one's "go" (rule 2).

        Returns True once told "go": this process has taken over (`served`); only
        then may it name itself in the pid file and to systemd. False: the old one
        refused, is gone, or did not answer within READY_TIMEOUT; this process must
        not take over (the old one stops it, or has gone with the service).
        Shielded from cancellation: a signal meanwhile is handled once decided.
        """
        channel = self._channel
        if channel is None:
            return False
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(READY_TIMEOUT):
                channel.send(READY)
                await trio.lowlevel.wait_readable(channel)
                self.served = channel.recv(MESSAGE_SIZE) == GO
        except OSError as exc:  # the old process is gone
            log.warning("upgrade: no answer from the old process: %s", exc)
        finally:
            self.close()
        return self.served

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def take_handover(environ: dict[str, str] | None = None) -> Handover | None:
    """In a process started by an upgrade: receive the listening sockets (and any
    named descriptors); else None.

    Removes UPGRADE_FD_ENV from the environment, so that a later upgrade of
    this process starts with a fresh pair.

    Raises StartupError if the old process does not send them all (it stops this
    one anyway).
    """
    env = os.environ if environ is None else environ
    value = env.pop(UPGRADE_FD_ENV, None)
    if value is None:
        return None
    try:
        channel = socket.socket(fileno=int(value))
        os.set_inheritable(channel.fileno(), False)
    except (OSError, ValueError) as exc:
        raise StartupError(f"upgrade: {UPGRADE_FD_ENV}={value!r}: {exc}") from None
    sockets: dict[int, socket.socket] = {}
    named: dict[str, int] = {}
    pending: list[int] = []  # received, not yet in `sockets` or `named`
    metrics: socket.socket | None = None
    stored: list[str] | None = None
    try:
        while True:
            data, pending, _flags, _address = socket.recv_fds(
                channel, MESSAGE_SIZE, FDS_PER_MESSAGE, socket.MSG_CMSG_CLOEXEC
            )
            if not data:
                raise OSError("the old process closed the socket pair")
            message = json.loads(data)
            if message.get("done"):
                names = message.get("fdstore")
                stored = [str(name) for name in names] if isinstance(names, list) else None
                break
            if "names" in message:
                if len(message["names"]) != len(pending):
                    raise ValueError("descriptors missing from a message")
                for name, fd in zip(message["names"], pending, strict=True):
                    os.set_inheritable(fd, False)
                    named[name] = fd
                pending = []
                continue
            if len(message["ports"]) != len(pending):
                raise ValueError("descriptors missing from a message")
            for port in message["ports"]:
                sockets[port] = socket.socket(fileno=pending[0])
                pending.pop(0)  # now closed with `sockets` if a later one fails
                sockets[port].setblocking(False)
        metrics = socket.socket(fileno=named[METRICS_FD]) if METRICS_FD in named else None
        named.pop(METRICS_FD, None)  # now closed with `metrics`
        notify = socket.socket(fileno=named[NOTIFY_FD]) if NOTIFY_FD in named else None
        named.pop(NOTIFY_FD, None)  # now closed with `notify`
    except BaseException as exc:
        for sock in sockets.values():
            sock.close()
        if metrics is not None:
            metrics.close()
        for fd in [*named.values(), *pending]:
            with contextlib.suppress(OSError):
                os.close(fd)
        channel.close()
        if isinstance(exc, (OSError, ValueError, KeyError)):
            raise StartupError(f"upgrade: receiving the listeners: {exc}") from None
        raise
    return Handover(channel, sockets, named, metrics, notify, stored)
