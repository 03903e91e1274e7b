"""A connection's data as the engine holds it: its sockets, buffers, counts and flow.

Owns no behaviour beyond tiny helpers: what a connection does is the flow's
decision (tcpproxy.flow) carried out by the rooms above. `Conn` is made at
accept and lives until `core.Engine.finish`, its one teardown, which closes
its sockets and pipes and releases its ticket; a stale timer may keep the
object a while after that, so the teardown drops its buffers too. `Way` (one
direction of the relay) exists only from RELAY on; its pipe, while
splicing, is closed by `close_pipe` (at EOF, on redispatch, at the end).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from tcpproxy.admission import Ticket
from tcpproxy.flow import Flow

if TYPE_CHECKING:
    from tcpproxy.engine.loop import Loop
    from tcpproxy.sniff import Sniffer

__all__ = ["Conn", "Way"]


class Way:
    """One direction of a relay: bytes from `src` to `dst`."""

    __slots__ = (
        "done",
        "dst",
        "dst_fd",
        "pend",
        "pipe_r",
        "pipe_w",
        "piped",
        "splice",
        "src",
        "src_fd",
        "up",
    )  # fmt: skip

    def __init__(
        self, src: socket.SocketType, dst: socket.SocketType, src_fd: int, dst_fd: int, *, up: bool
    ) -> None:
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src_fd, dst_fd
        self.up = up  # client -> target
        self.done = False  # src reached EOF (and dst was told)
        self.pend: memoryview | None = None  # copied bytes dst has not taken yet
        self.splice = False  # bulk: moving through a pipe
        self.pipe_r = self.pipe_w = -1
        self.piped = 0  # bytes in the pipe dst has not taken yet

    @property
    def blocked(self) -> bool:
        return self.pend is not None or self.piped > 0

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class Conn:
    """One connection's I/O state; its decisions are `flow`'s."""

    __slots__ = (
        "addresses",
        "app",
        "attempt_errors",
        "attempts",
        "cfd",
        "cid",
        "client",
        "cmask",
        "connecting",
        "down",
        "down_bytes",
        "flow",
        "gen",
        "hbuf",
        "header",
        "last",
        "lowat",
        "moved",
        "name",
        "peeked",
        "peer",
        "port",
        "sniffer",
        "started",
        "target",
        "tfd",
        "ticket",
        "tmask",
        "up",
        "up_bytes",
    )  # fmt: skip

    def __init__(
        self,
        client: socket.SocketType,
        port: int,
        peer: tuple,
        ticket: Ticket,
        flow: Flow,
        now: float,
    ) -> None:
        self.client, self.cfd, self.port, self.peer = client, client.fileno(), port, peer
        self.ticket, self.flow = ticket, flow  # its slot and counts: admission.Ticket
        # the port's app until routed (its preamble settings, log lines), then its own
        self.app, self.cid = ticket.router.app, ticket.cid
        self.started = self.last = self.connecting = now
        self.target: socket.SocketType | None = None
        self.tfd = -1
        self.cmask = self.tmask = 0  # registered epoll interest (0: not registered)
        self.gen = 0  # bumped on every phase change: older timers and lookups are stale
        self.up: Way | None = None
        self.down: Way | None = None
        self.moved = False  # a byte was taken from either side of the current target
        self.up_bytes = self.down_bytes = 0
        self.hbuf = b""  # PROXY header bytes read so far
        self.header: memoryview | None = None  # our PROXY header, still to send
        # inspection (a port told apart by name): the parser, the bytes it was shown,
        # the socket's SO_RCVLOWAT; then the name that routed it ("": none)
        self.sniffer: Sniffer | None = None
        self.peeked = 0
        self.lowat = 1
        self.name = ""
        self.attempts: list[socket.SocketType] = []  # connects in flight to the current target
        self.addresses: list[tuple[int, tuple]] = []  # the target's addresses not tried yet
        self.attempt_errors: list[OSError] = []

    def interest(self, loop: Loop, cmask: int, tmask: int) -> None:
        """Make the registered epoll interest of both sockets `cmask` and `tmask`."""
        if cmask != self.cmask:
            loop.watch(self.cfd, self.cmask, cmask)
            self.cmask = cmask
        if tmask != self.tmask:
            loop.watch(self.tfd, self.tmask, tmask)
            self.tmask = tmask
