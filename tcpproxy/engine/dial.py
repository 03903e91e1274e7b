"""Connecting a connection to its target: resolve, happy eyeballs, the connect timeout.

Owns the attempts in flight (`conn.attempts`: sockets, each in the epoll set
waiting for its answer) and the addresses not tried yet, until one attempt
wins: its socket becomes the connection's target (`on_won`, the
composer's), the others are closed at once. A host name not in the
resolver's cache is looked up by a task on the loop's nursery, whose answer
comes back as an event, dropped if the connection moved on (its `gen`).

The PHASE timer (connect timeout) and STAGGER timer (happy eyeballs: the
next address after HAPPY_EYEBALLS_DELAY) are armed here; the composer calls
`next_attempt` when the stagger is due. Errors: every address failed, the
lookup failed, or the address check (self-loop guard) vetoed them:
`on_failed(conn, why, exc)`; a failure of ours (out of descriptors,
connect.LOCAL_ERRNOS) stops trying the other addresses. `drop_attempts`
closes whatever is in flight (on timeout, failover and the teardown).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from tcpproxy.connect import (
    HAPPY_EYEBALLS_DELAY,
    LOCAL_ERRNOS,
    AddressCheck,
    describe_error,
    interleave,
)
from tcpproxy.engine.conn import Conn
from tcpproxy.engine.loop import OUT, Loop
from tcpproxy.engine.timers import PHASE, STAGGER

if TYPE_CHECKING:
    from tcpproxy.resolve import Resolver

__all__ = ["Dialer"]

_Socket = socket.SocketType
_STREAM_NONBLOCK: Final = int(socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
_ESTABLISHED: Final = 1  # TCP_ESTABLISHED, the first byte of struct tcp_info
_SYN_SENT: Final = 2  # TCP_SYN_SENT: a connect still waiting for its answer


class Dialer:
    """Connects connections to `conn.flow.target`.

    Args:
      loop: the engine's loop (epoll set, table, timers, helper tasks).
      conns: the live connections (a lookup's answer for an ended one is dropped).
      resolver: target names to addresses (its cache at once, else a lookup task).
      check: vetoes an address before it is connected (the self-loop guard).
      on_won(conn, sock, registered): `sock` is connected (`registered`: in the epoll
        set, waiting for EPOLLOUT).
      on_failed(conn, why, exc): the target cannot be connected.
      on_error(obj): a lookup's answer raised while handled (a bug).
    """

    def __init__(
        self,
        loop: Loop,
        conns: set[Conn],
        resolver: Resolver,
        check: AddressCheck,
        on_won: Callable[[Conn, socket.SocketType, bool], None],
        on_failed: Callable[[Conn, str, OSError | None], None],
        on_error: Callable[[Any], None],
    ) -> None:
        self._loop = loop
        self._conns = conns
        self._resolver = resolver
        self._check = check
        self._on_won = on_won
        self._on_failed = on_failed
        self._on_error = on_error

    def connect(self, conn: Conn) -> None:
        """Connect to flow.target: resolve (from the cache, else a lookup task), then
        happy eyeballs over its addresses; the connect timeout bounds it all."""
        target = conn.flow.target
        assert target is not None
        loop = self._loop
        conn.connecting = loop.now
        if conn.attempt_errors:
            conn.attempt_errors = []
        conn.gen += 1  # a new phase: older timers and lookups are stale
        try:
            addresses = self._resolver.cached(target.host, target.port)
        except OSError as exc:
            self._on_failed(conn, describe_error(exc), exc)
            return
        if addresses is None:
            loop.at(loop.now + conn.app.config.connect_timeout, conn, PHASE)
            assert loop.tasks is not None
            loop.tasks.start_soon(self._lookup, conn, conn.gen, name="resolve")
            return
        self._try_addresses(conn, addresses, True)

    async def _lookup(self, conn: Conn, gen: int) -> None:
        """Resolve the conn's target on a trio task; feed the answer back unless stale."""
        target = conn.flow.target
        assert target is not None
        left = conn.connecting + conn.app.config.connect_timeout - time.monotonic()
        answer: list[tuple[int, tuple]] | OSError | None = None
        with trio.move_on_after(left):  # the resolver gives up just before: says "DNS"
            try:
                answer = await self._resolver.resolve(target.host, target.port)
            except OSError as exc:
                answer = exc
        if answer is None or conn.gen != gen or conn not in self._conns:
            return  # the connect timeout (or the connection's end) came first
        self._loop.now = time.monotonic()
        try:
            if isinstance(answer, OSError):
                self._on_failed(conn, describe_error(answer), answer)
            else:
                self._try_addresses(conn, answer, False)
        except Exception:
            self._on_error(conn)
        finally:
            # Outside the loop's turn: what it did (a slot freed, new descriptors,
            # timers) must be seen now, not after the loop's current sleep.
            self._loop.wake()

    def _try_addresses(self, conn: Conn, addresses: list[tuple[int, tuple]], arm: bool) -> None:
        """Happy eyeballs over `addresses`; `arm`: the connect timeout is not armed yet."""
        if not addresses:
            target = conn.flow.target
            assert target is not None
            self._on_failed(conn, describe_error(OSError(f"{target.host} has no address")), None)
            return
        conn.addresses = interleave(addresses) if len(addresses) > 1 else list(addresses)
        self.next_attempt(conn, arm)

    def next_attempt(self, conn: Conn, arm: bool = False) -> None:
        """Start the next address; a loopback connect is done at once (no wait)."""
        target = conn.flow.target
        assert target is not None
        check = self._check
        loop = self._loop
        err = 0
        while conn.addresses:
            family, sockaddr = conn.addresses.pop(0)
            sock: socket.SocketType | None = None
            try:
                check(target, family, sockaddr)
                sock = _Socket(family, _STREAM_NONBLOCK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = sock.connect_ex(sockaddr)
                # On loopback the handshake is done by now; one getsockopt spares a wait.
                if (
                    err == errno.EINPROGRESS
                    and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _ESTABLISHED
                ):
                    err = 0
                if err and err != errno.EINPROGRESS:
                    raise OSError(err, os.strerror(err))
            except OSError as exc:
                if sock is not None:
                    sock.close()
                conn.attempt_errors.append(exc)
                if exc.errno in LOCAL_ERRNOS:
                    break
                continue
            if not err:
                self._on_won(conn, sock, False)
                return
            fd = sock.fileno()
            conn.attempts.append(sock)
            loop.fds[fd] = (self.on_attempt, (conn, sock))
            loop.epoll.register(fd, OUT)
            if arm:
                arm = False
                loop.at(loop.now + conn.app.config.connect_timeout, conn, PHASE)
            if conn.addresses:
                loop.at(loop.now + HAPPY_EYEBALLS_DELAY, conn, STAGGER)
            return
        if conn.attempts:
            return  # others still in flight
        errors = conn.attempt_errors
        first = next((e for e in errors if e.errno in LOCAL_ERRNOS), errors[0])
        self._on_failed(conn, describe_error(first), first)

    def on_attempt(self, attempt: tuple[Conn, socket.SocketType], ev: int) -> None:
        """A connect in flight answered: won, or failed (then the next address)."""
        conn, sock = attempt
        try:
            # The state first: read after SO_ERROR, it could show a refusal that came
            # in between (CLOSE, its error still pending) and pass it for a success.
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _SYN_SENT:
                return  # still connecting: a stale event (its descriptor number was reused)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or errno.EIO
        conn.attempts.remove(sock)
        if not err:
            self._on_won(conn, sock, True)
            return
        self._close_attempt(sock)
        conn.attempt_errors.append(OSError(err, os.strerror(err)))
        if not conn.attempts:
            self.next_attempt(conn)

    def _close_attempt(self, sock: socket.SocketType) -> None:
        self._loop.fds.pop(sock.fileno(), None)
        sock.close()  # leaves the epoll set with its last descriptor

    def drop_attempts(self, conn: Conn) -> None:
        """Close the attempts in flight and forget the addresses not tried."""
        for sock in conn.attempts:
            self._close_attempt(sock)
        conn.attempts.clear()
        if conn.addresses:
            conn.addresses = []
