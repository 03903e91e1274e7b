"""A worker's end of its socket pair to the supervisor, and the messages both ends speak.

A worker runs the same service as a single process, but takes its configs
from the supervisor over a socket pair (pickled, already validated) and
answers each with APPLIED or the reason it refused. Its command line says
which worker it is (`worker_argv` writes it, `SupervisorLink.join` reads it).

For an upgrade the supervisor asks for the worker's listening sockets
(LISTENERS): the worker answers with their ports, then the sockets
themselves (SCM_RIGHTS, FDS_PER_MESSAGE a message, each with one byte), and
goes on accepting on them until it is stopped.

Workers stop with their supervisor, so no worker is left serving a config
nobody watches: the end of the socket pair (EOF, however the supervisor
died) stops a worker as SIGTERM does, draining. Not PR_SET_PDEATHSIG: it
fires when the *thread* that forked the child exits, and trio forks from
worker threads it retires after 10 s idle.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import trio

from tcpproxy.config import Config
from tcpproxy.errors import StartupError

__all__ = [
    "APPLIED",
    "LISTENERS",
    "SupervisorLink",
    "recv",
    "recv_listeners",
    "send",
    "worker_argv",
]

log = logging.getLogger("tcpproxy")

APPLIED = "applied"  # a worker's answer to a config it now serves
LISTENERS = "listeners"  # the supervisor's request for the worker's listeners, and the answer
FDS_PER_MESSAGE = 200  # the kernel takes at most 253 descriptors in one message (SCM_MAX_FD)


async def recv(conn: Connection) -> Any:
    """Receive one message without blocking the event loop while none is there."""
    await trio.lowlevel.wait_readable(conn.fileno())
    return conn.recv()


async def send(conn: Connection, message: Any) -> None:
    """Send one message as `Connection.send` frames it, without blocking a thread.

    A peer that does not read (stopped, hung) cannot hold us: each write is
    non-blocking and we wait for room in the event loop, so the caller's
    cancel scope bounds the whole send. Cancelled halfway, the peer is left
    a half message; the caller then kills it (nothing else can use it).
    Raises OSError when the peer is gone.
    """
    payload = ForkingPickler.dumps(message)
    if len(payload) > 0x7FFFFFFF:  # Connection's framing for large messages
        header = struct.pack("!i", -1) + struct.pack("!Q", len(payload))
    else:
        header = struct.pack("!i", len(payload))
    # A second descriptor for the same socket: MSG_DONTWAIT leaves the
    # connection's own (blocking) mode alone, and closing it does not close `conn`.
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        data = memoryview(header + payload)
        while data:
            try:
                data = data[sock.send(data, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


async def recv_listeners(conn: Connection, ports: list[int]) -> dict[int, socket.socket]:
    """The sockets that follow a worker's LISTENERS answer naming `ports` (now ours).

    Every batch is read even if one came truncated (no descriptors left
    here: EMFILE), so the stream stays in step; then OSError says so.
    """
    fds: list[int] = []
    truncated = False
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        for start in range(0, len(ports), FDS_PER_MESSAGE):
            wanted = len(ports[start : start + FDS_PER_MESSAGE])
            while True:
                try:
                    data, got, flags, _ = socket.recv_fds(
                        sock, 1, wanted, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                    )
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
            if not data:
                for fd in fds + got:
                    os.close(fd)
                raise EOFError("the worker closed its socket pair")
            fds += got
            truncated |= bool(flags & socket.MSG_CTRUNC) or len(got) != wanted
    if truncated:
        for fd in fds:
            os.close(fd)
        raise OSError("the worker's listeners did not all arrive (out of descriptors?)")
    return {port: socket.socket(fileno=fd) for port, fd in zip(ports, fds, strict=True)}


def worker_argv(
    module: str, control_fd: int, index: int, count: int, options: list[str]
) -> list[str]:
    """A worker's command line: the same binary, told it is worker `index` of `count`."""
    return [sys.executable, "-m", module, *options, "--worker", f"{control_fd}:{index}:{count}"]


class SupervisorLink:
    """A worker's end of its socket pair to the supervisor."""

    @classmethod
    def join(cls, worker: str) -> SupervisorLink:
        """Become the worker that `--worker FD:INDEX:COUNT` names (the caller sets
        up logging with `log_prefix`; `follow` stops us when the supervisor goes)."""
        fd, index, count = (int(part) for part in worker.split(":"))
        return cls(fd, index, count)

    @property
    def log_prefix(self) -> str:
        return f"[w{self.index}] "

    def __init__(self, fd: int, index: int, count: int) -> None:
        self._conn = Connection(fd)
        self.index = index
        self.count = count  # workers in all: limits are shared among them

    def initial_config(self) -> Config:
        """The config to start with (blocking: called before the event loop runs).

        Exits quietly if the supervisor is already gone.
        """
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise SystemExit(0) from None
        assert kind == "config", kind
        return pickle.loads(payload)

    async def follow(
        self,
        current: Callable[[], Config],
        apply: Callable[[Config, Config], Awaitable[None]],
        listeners: Callable[[], dict[int, socket.socket]] | None = None,
    ) -> None:
        """Say ready, then apply every config the supervisor sends, answering each,
        and hand over `listeners` (by port; None: none) when asked (an upgrade).

        When the supervisor is gone (EOF, or a send fails), stop as on SIGTERM:
        drain, then exit.
        """
        try:
            self._conn.send(("ready", os.getpid()))
            while True:
                kind, payload = await recv(self._conn)
                if kind == LISTENERS:
                    self._hand_listeners(listeners() if listeners is not None else {})
                    continue
                if kind != "config":
                    continue
                new: Config = pickle.loads(payload)
                try:
                    await apply(current(), new)
                except StartupError as exc:
                    self._conn.send(("refused", str(exc)))
                else:
                    self._conn.send((APPLIED, ""))
        except (EOFError, OSError):
            log.warning("the supervisor is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)  # the service's own stop: drain, then exit
            await trio.sleep_forever()

    def _hand_listeners(self, sockets: dict[int, socket.socket]) -> None:
        """The ports, then the sockets (references: this worker goes on accepting on
        them until it is stopped, and then closes them, never shuts them down)."""
        ports = sorted(port for port, sock in sockets.items() if sock.fileno() >= 0)
        self._conn.send((LISTENERS, ports))
        with socket.fromfd(self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            for start in range(0, len(ports), FDS_PER_MESSAGE):
                batch = ports[start : start + FDS_PER_MESSAGE]
                socket.send_fds(sock, [b"L"], [sockets[port].fileno() for port in batch])
