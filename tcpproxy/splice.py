"""The relay's rules and sizes, and how a connection is cut (`abort`).

The engine (tcpproxy/engine/) moves the bytes; what it follows is here.
Each direction starts by copying with recv/send (small messages cost the
same two syscalls either way, and need no pipe); once a read fills
COPY_SIZE, a bulk transfer is under way and the direction switches to
`splice(2)` through a pipe (zero copy: the bytes never enter Python) until
EOF. An idle connection holds no buffer and no pipe.

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
   another target can be tried (a target restarting resets the connections
   waiting in its accept queue; clients need not see that).
4. Backpressure is the kernel's: at most one pipe (64 KiB) or one read
   (16 KiB) per direction is in the proxy's hands, and nothing more is read
   until it has been written.
5. Idle timeout: when no byte has moved either way for the app's
   IdleTimeout, both directions stop and both sockets are closed.
"""

from __future__ import annotations

import enum
import socket
import struct

__all__ = ["CHUNK_SIZE", "COPY_SIZE", "FAIRNESS_BYTES", "EndReason", "abort"]

CHUNK_SIZE = 64 * 1024  # bytes per direction in flight in the proxy when splicing: one pipe
COPY_SIZE = 16 * 1024  # bytes per read when copying; a full read switches to splice
FAIRNESS_BYTES = 1024 * 1024  # after this many bytes without blocking, serve the others
_LINGER_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class EndReason(enum.StrEnum):
    """Why a relay ended, as logged per connection."""

    DONE = "done"  # both sides closed cleanly
    CLIENT_ERROR = "client-error"  # the client reset or failed
    TARGET_ERROR = "target-error"  # the target reset or failed
    TARGET_EARLY_ERROR = "target-early-error"  # target failed before any byte moved: retryable
    IDLE = "idle-timeout"  # no byte either way for the idle timeout
    CANCELLED = "cancelled"  # the proxy ended it (shutdown)


def abort(sock: socket.SocketType) -> None:
    """Close with RST: the peer sees a reset, not an orderly end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    sock.close()
