"""What a connection reads or writes before relaying: PROXY header in, first byte, header out.

Functions of a `Conn` that do the I/O and say what happened; what follows
(the flow's event, the timer, the epoll interest, the warning) is the
composer's (core.Engine), so nothing here calls up.

Resources: the header read so far lives in `conn.hbuf`, ours still to send in
`conn.header`; both are dropped by the teardown. Errors: a bad, truncated or
unreadable header raises ProxyHeaderError or OSError to the caller; a
descriptor that is not ready yet (a stale event) is "not yet", never an error.
"""

from __future__ import annotations

import socket
from typing import Final

from tcpproxy.engine.conn import Conn
from tcpproxy.proxy_protocol import ProxyHeaderError, build_header, header_extent, parse_header

__all__ = ["HEADER_PEEK", "peek_first_byte", "read_header_in", "send_header_out"]

HEADER_PEEK: Final = 16 + 65535  # bytes peeked at most while reading a PROXY header (v2's max)


def read_header_in(conn: Conn) -> bool:
    """Take the balancer's PROXY header as it arrives, not one byte past its end.

    Returns whether it is complete (then `conn.peer` is the client it names, and
    `conn.hbuf` is empty again). Raises ProxyHeaderError (bad, or the client
    closed first) or OSError.
    """
    client = conn.client
    try:
        peeked = client.recv(HEADER_PEEK - len(conn.hbuf), socket.MSG_PEEK)
        if not peeked:
            raise ProxyHeaderError("closed before a PROXY header")
        data = conn.hbuf + peeked
        extent = header_extent(data)
        take = len(peeked) if extent is None else min(len(peeked), extent - len(conn.hbuf))
        conn.hbuf += client.recv(take)
        if extent is None or len(conn.hbuf) < extent:
            return False
        source = parse_header(conn.hbuf)
    except BlockingIOError:
        return False
    conn.hbuf = b""
    if source is not None:
        conn.peer = source
    return True


def peek_first_byte(conn: Conn) -> bool:
    """Whether the client said something (or closed, or failed: the relay reports
    those); False: a stale event, nothing to read yet. Peeks: the byte stays."""
    try:
        conn.client.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        pass  # an error is the relay's to report
    return True


def send_header_out(conn: Conn, version: str) -> bool:
    """Send our PROXY header (`version`: SendProxyProtocol) to the target, made at the
    first call; returns whether it is all sent. Raises OSError (the target failed)."""
    if conn.header is None:
        destination = conn.client.getsockname()
        conn.header = memoryview(build_header(version, conn.peer, destination))  # type: ignore[arg-type]
    try:
        sent = conn.target.send(conn.header)  # type: ignore[union-attr]
    except BlockingIOError:
        sent = 0
    conn.header = conn.header[sent:]
    if conn.header:
        return False
    conn.header = None
    return True
