"""The splice core: move bytes both ways between two connected sockets.

Both binaries hand every proxied connection to `relay()`. Each direction
starts by copying with recv/send (small messages cost the same two syscalls
either way, and need no pipe); once a read fills COPY_SIZE, a bulk transfer
is under way and the direction switches to `splice(2)` through a pipe (zero
copy: the bytes never enter Python) until EOF. An idle connection holds no
buffer and no pipe.

Rules:
1. Each direction runs until its source reaches EOF, then shuts down the
   write side of its destination (half-close is forwarded, so
   `echo hello | nc -N` gets its answer).
2. The relay ends when both directions have ended.
3. An error on either side (reset, broken pipe, timeout) ends both at once:
   the other peer's socket is aborted with an RST so it learns promptly that
   the stream is incomplete, instead of waiting or seeing a clean FIN.
   Except: a target that fails before a single byte was taken from the
   client or from it (reason TARGET_EARLY_ERROR) leaves the client open, so
   the caller can try another target (a target restarting resets the
   connections waiting in its accept queue; clients need not see that).
4. Backpressure is the kernel's: at most one pipe (64 KiB) or one read
   (16 KiB) per direction is in the proxy's hands, and nothing more is read
   until it has been written.
5. Idle timeout: when no byte has moved either way for `idle_timeout`
   seconds, both directions stop (the caller then closes both sockets).
   Activity pushes a deadline forward rather than running a timer task, so
   an idle timeout costs no task per connection.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

__all__ = ["CHUNK_SIZE", "EndReason", "RelayStats", "abort", "relay"]

CHUNK_SIZE = 64 * 1024  # bytes per direction in flight in the proxy when splicing: one pipe
COPY_SIZE = 16 * 1024  # bytes per read when copying; a full read switches to splice
FAIRNESS_BYTES = 1024 * 1024  # after this many bytes without blocking, yield to other tasks
IDLE_DEADLINE_STEP = 1.0  # seconds: how stale the idle deadline may get (so ends up to 1 s late)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_HAVE_SPLICE = hasattr(os, "splice")
_PIPE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})  # pipe2() may fail with
_LINGER_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class EndReason(enum.StrEnum):
    """Why a relay ended, as logged per connection."""

    DONE = "done"  # both sides closed cleanly
    CLIENT_ERROR = "client-error"  # the client reset or failed
    TARGET_ERROR = "target-error"  # the target reset or failed
    TARGET_EARLY_ERROR = "target-early-error"  # target failed before any byte moved: retryable
    IDLE = "idle-timeout"  # no byte either way for the idle timeout
    CANCELLED = "cancelled"  # the proxy ended it (shutdown)


@dataclass(slots=True)
class RelayStats:
    """Bytes moved each way and why the relay ended; updated live."""

    up: int = 0  # client -> target
    down: int = 0  # target -> client
    reason: EndReason = EndReason.DONE
    error: str = field(default="")


class _Idle:
    """Pushes a cancel scope's deadline forward on activity, at most every `step` seconds."""

    __slots__ = ("idle", "pushed_at", "scope", "step")

    def __init__(self, scope: trio.CancelScope, idle: float) -> None:
        self.scope = scope
        self.idle = idle
        self.step = min(IDLE_DEADLINE_STEP, idle / 4)
        self.pushed_at = trio.current_time()
        scope.deadline = self.pushed_at + idle

    def touch(self) -> None:
        now = trio.current_time()
        if now - self.pushed_at >= self.step:
            self.pushed_at = now
            self.scope.deadline = now + self.idle


class _SideError(Exception):
    def __init__(self, side: EndReason, exc: OSError) -> None:
        self.side = side
        self.exc = exc


def abort(sock: socket.SocketType) -> None:
    """Close with RST: the peer sees a reset, not an orderly end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    sock.close()


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # peer already gone: the other direction will report it
        pass


class _Direction:
    """One way of a relay; `up` says which counter of the stats it feeds."""

    __slots__ = ("dst", "dst_side", "idle", "src", "src_side", "stats", "taken", "up")

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        stats: RelayStats,
        idle: _Idle | None,
        *,
        up: bool,
    ) -> None:
        self.src, self.dst, self.stats, self.idle, self.up = src, dst, stats, idle, up
        self.taken = 0  # bytes read from src, delivered or not
        client, target = EndReason.CLIENT_ERROR, EndReason.TARGET_ERROR
        self.src_side, self.dst_side = (client, target) if up else (target, client)

    def _count(self, n: int) -> None:
        if self.up:
            self.stats.up += n
        else:
            self.stats.down += n
        if self.idle is not None:
            self.idle.touch()

    async def run(self, use_splice: bool) -> None:
        """Copy with recv/send; on the first full read switch to splice (if allowed).

        Small messages cost the same two syscalls as splice, with no pipe to
        set up; a read that fills COPY_SIZE means a bulk transfer is under
        way, for which splice saves copying (HAProxy's splice-auto). One
        coroutine frame for the common path: idle connections are many, and
        each frame of a waiting task is memory held per connection.
        """
        src, dst = self.src, self.dst
        wait_readable, wait_writable = trio.lowlevel.wait_readable, trio.lowlevel.wait_writable
        drained = False  # the last read emptied the socket: wait before reading again
        while True:
            if drained:
                await wait_readable(src)
            try:
                data = src.recv(COPY_SIZE)
            except BlockingIOError:
                drained = True
                continue
            except OSError as exc:
                raise _SideError(self.src_side, exc) from None
            if not data:
                break
            n = len(data)
            self.taken += n
            view = memoryview(data)
            while True:
                try:
                    sent = dst.send(view)
                except BlockingIOError:
                    await wait_writable(dst)
                    continue
                except OSError as exc:
                    raise _SideError(self.dst_side, exc) from None
                if sent == len(view):
                    break
                view = view[sent:]
            self._count(n)
            if n < COPY_SIZE:
                drained = True
            elif use_splice:
                await self._bulk()
                break
            else:
                drained = False
                await trio.lowlevel.checkpoint()  # bulk copy: let others run
        _shutdown_write(dst)

    async def _bulk(self) -> None:
        """Splice until EOF; copy instead when no pipe can be had."""
        try:
            rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in _PIPE_ERRNOS:
                raise
            await self.run(use_splice=False)  # out of descriptors for a pipe
            return
        try:
            await self._splice(rfd, wfd)
        finally:
            os.close(rfd)
            os.close(wfd)

    async def _splice(self, rfd: int, wfd: int) -> None:
        src_fd, dst_fd = self.src.fileno(), self.dst.fileno()
        splice = os.splice
        wait_readable, wait_writable = trio.lowlevel.wait_readable, trio.lowlevel.wait_writable
        unyielded = 0
        while True:
            try:
                n = splice(src_fd, wfd, CHUNK_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                unyielded = 0
                await wait_readable(src_fd)
                continue
            except OSError as exc:
                raise _SideError(self.src_side, exc) from None
            if n == 0:
                return
            self.taken += n
            pending = n
            while pending:
                try:
                    m = splice(rfd, dst_fd, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    unyielded = 0
                    await wait_writable(dst_fd)
                    continue
                except OSError as exc:
                    raise _SideError(self.dst_side, exc) from None
                pending -= m
                self._count(m)
            unyielded += n
            if unyielded >= FAIRNESS_BYTES:
                unyielded = 0
                await trio.lowlevel.checkpoint()


async def relay(
    client: socket.socket,
    target: socket.socket,
    stats: RelayStats | None = None,
    *,
    use_splice: bool = True,
    idle_timeout: float | None = None,
) -> RelayStats:
    """Relay between `client` and `target` until both directions end.

    Args:
      client, target: connected, non-blocking stream sockets (the standard
        library's: the relay makes its own syscalls and waits with trio).
      stats: updated live (so an idle timer or metrics can read it); a new one
        is made when omitted.
      use_splice: move bytes with splice(2); False copies through a buffer.
      idle_timeout: seconds without a byte either way that end the relay
        (reason IDLE); None for no limit.

    Returns:
      The stats, with `reason` saying how it ended.

    Resource handling:
      Closes neither socket on a clean end; the caller owns both. On an error
      on one side, the *other* socket is aborted (closed with RST) here so its
      peer learns at once (but see rule 3's exception); closing the failed one
      is still the caller's job (closing twice is harmless).

    Error handling:
      Peer errors (resets, broken pipes) end the relay and are reported in the
      stats, never raised. Cancellation propagates as usual.
    """
    if stats is None:
        stats = RelayStats()
    else:  # reused after a redispatch: this relay's outcome only
        stats.reason, stats.error = EndReason.DONE, ""
    use_splice = use_splice and _HAVE_SPLICE
    up = _Direction(client, target, stats, None, up=True)
    down = _Direction(target, client, stats, None, up=False)
    try:
        async with trio.open_nursery() as nursery:
            if idle_timeout:  # the nursery's own scope carries the deadline: no extra scope
                up.idle = down.idle = _Idle(nursery.cancel_scope, idle_timeout)
            # A constant name: trio would otherwise build one per task.
            nursery.start_soon(down.run, use_splice, name="relay:down")
            await up.run(use_splice)  # in this task: one task fewer per connection
        if nursery.cancel_scope.cancelled_caught:
            stats.reason = EndReason.IDLE
    except BaseExceptionGroup as group:  # trio wraps a failed direction's error
        matched, rest = group.split(_SideError)
        if rest is not None:
            raise rest from None
        assert matched is not None
        err: _SideError = matched.exceptions[0]  # type: ignore[assignment]
        stats.error = os.strerror(err.exc.errno) if err.exc.errno else str(err.exc)
        if err.side is EndReason.TARGET_ERROR and up.taken == 0 and down.taken == 0:
            # Nothing was taken from the client or given to it: the caller may
            # still try another target, so the client is left open.
            stats.reason = EndReason.TARGET_EARLY_ERROR
        else:
            stats.reason = err.side
            abort(target if err.side is EndReason.CLIENT_ERROR else client)
    return stats
