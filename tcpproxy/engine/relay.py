"""Relaying a connected connection's bytes both ways (splice.py's rules).

Copy with recv/send; a read that fills COPY_SIZE switches that direction to
splice(2) through a pipe. A direction whose destination is full stops
reading its source (no EPOLLIN) and waits for EPOLLOUT on its destination.
What ends a direction (EOF, an error) is told to the composer
(`on_eof(conn, side)`, `on_error(conn, side, exc)`), which feeds the flow;
forwarding EOF (shutdown) or closing is its action.

Resources: the two `Way`s are made at `start`; a direction's pipe is made
at its first splice and closed at its EOF or by the teardown. If no pipe
can be had (out of descriptors), that direction copies instead. Errors: an
OSError on a socket is the side's error; anything else propagates (a bug,
costing this connection).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Final

from tcpproxy.engine.conn import Conn, Way
from tcpproxy.engine.loop import IN, IN_BITS, OUT, OUT_BITS, Loop
from tcpproxy.engine.timers import IDLE
from tcpproxy.flow import S_RELAY, SIDE_CLIENT, SIDE_TARGET, Side
from tcpproxy.splice import CHUNK_SIZE, COPY_SIZE, FAIRNESS_BYTES

__all__ = ["Relay"]

_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
HAVE_SPLICE: Final = hasattr(os, "splice")
_PIPE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class Relay:
    """The relay of every connection of one engine.

    Args:
      loop: the engine's loop (epoll set, clock, timers).
      use_splice: splice bulk transfers (else always copy).
      on_eof(conn, side): `side` ended its stream.
      on_error(conn, side, exc): `side`'s socket failed.
    """

    def __init__(
        self,
        loop: Loop,
        use_splice: bool,
        on_eof: Callable[[Conn, Side], None],
        on_error: Callable[[Conn, Side, OSError], None],
    ) -> None:
        self._loop = loop
        self._use_splice = use_splice and HAVE_SPLICE
        self._on_eof = on_eof
        self._on_error = on_error
        # One read buffer for every copy: reading into it spares a 16 KiB allocation
        # (and its shrink) per read; what a destination does not take is copied out.
        self._buf = memoryview(bytearray(COPY_SIZE))

    def start(self, conn: Conn) -> None:
        """Both sockets are connected: relay, under the idle timeout."""
        client, target = conn.client, conn.target
        assert target is not None
        loop = self._loop
        conn.up = Way(client, target, conn.cfd, conn.tfd, up=True)
        conn.down = Way(target, client, conn.tfd, conn.cfd, up=False)
        conn.moved = False
        conn.last = loop.now
        conn.gen += 1  # a new phase, whose timer is the idle one
        loop.at(loop.now + conn.app.config.idle_timeout, conn, IDLE)
        conn.interest(loop, IN, IN)

    def event(self, conn: Conn, ev: int, reading: Way, writing: Way) -> None:
        """An event on one socket while relaying: first flush what waits to be written
        to it (`writing`), then read from it (`reading`) if that direction is free."""
        if ev & OUT_BITS and (writing.pend is not None or writing.piped):
            self._flush(conn, writing)
        if (
            ev & IN_BITS and conn.flow.state is S_RELAY
            and not reading.done and reading.pend is None and not reading.piped
        ):  # fmt: skip
            self._pump(conn, reading)
        if conn.flow.state is S_RELAY:
            self._update(conn)

    def _update(self, conn: Conn) -> None:
        """Interest: read where the way is open and unblocked, write where blocked."""
        up, down = conn.up, conn.down
        assert up is not None and down is not None
        up_blocked = up.pend is not None or up.piped > 0
        down_blocked = down.pend is not None or down.piped > 0
        cmask = (0 if up.done or up_blocked else IN) | (OUT if down_blocked else 0)
        tmask = (0 if down.done or down_blocked else IN) | (OUT if up_blocked else 0)
        if cmask != conn.cmask or tmask != conn.tmask:
            conn.interest(self._loop, cmask, tmask)

    def _pump(self, conn: Conn, way: Way) -> None:
        """`way.src` is readable: move what it has to `way.dst`, as far as dst takes it."""
        if way.splice:
            self._pump_splice(conn, way)
            return
        buf = self._buf
        try:
            n = way.src.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._on_error(conn, SIDE_CLIENT if way.up else SIDE_TARGET, exc)
            return
        if not n:
            way.done = True
            if way.pipe_r >= 0:
                way.close_pipe()
            self._on_eof(conn, SIDE_CLIENT if way.up else SIDE_TARGET)
            return
        conn.moved = True
        conn.last = self._loop.now
        data = buf[:n]
        try:
            sent = way.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._on_error(conn, SIDE_TARGET if way.up else SIDE_CLIENT, exc)
            return
        if way.up:
            conn.up_bytes += sent
        else:
            conn.down_bytes += sent
        if sent < n:  # the buffer is the next read's: keep a copy of the rest
            way.pend = memoryview(bytes(data[sent:]))
        elif n == COPY_SIZE and self._use_splice:
            way.splice = True  # a bulk transfer: the next read splices

    def _pump_splice(self, conn: Conn, way: Way) -> None:
        src_side, dst_side = (SIDE_CLIENT, SIDE_TARGET) if way.up else (SIDE_TARGET, SIDE_CLIENT)
        if way.pipe_r < 0:
            try:
                way.pipe_r, way.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _PIPE_ERRNOS:
                    raise
                way.splice = False  # out of descriptors for a pipe: copy
                self._pump(conn, way)
                return
        splice = os.splice
        moved = 0
        while moved < FAIRNESS_BYTES:
            try:
                n = splice(way.src_fd, way.pipe_w, CHUNK_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self._on_error(conn, src_side, exc)
                return
            if n == 0:
                way.done = True
                way.close_pipe()
                self._on_eof(conn, src_side)
                return
            conn.last = self._loop.now
            moved += n
            try:
                m = splice(way.pipe_r, way.dst_fd, n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as exc:
                self._on_error(conn, dst_side, exc)
                return
            _count(conn, way, m)
            if m < n:
                way.piped = n - m
                return
            if n < CHUNK_SIZE:
                return

    def _flush(self, conn: Conn, way: Way) -> None:
        """`way.dst` is writable: hand it what it did not take before."""
        conn.last = self._loop.now
        try:
            if way.pend is not None:
                sent = way.dst.send(way.pend)
                _count(conn, way, sent)
                way.pend = way.pend[sent:] if sent < len(way.pend) else None
            else:
                m = os.splice(way.pipe_r, way.dst_fd, way.piped, flags=_SPLICE_FLAGS)
                _count(conn, way, m)
                way.piped -= m
        except BlockingIOError:
            return
        except OSError as exc:
            self._on_error(conn, SIDE_TARGET if way.up else SIDE_CLIENT, exc)


def _count(conn: Conn, way: Way, n: int) -> None:
    if way.up:
        conn.up_bytes += n
    else:
        conn.down_bytes += n
