"""What a connection reads or writes before relaying: PROXY header in, the name it asks
for (TLS SNI, HTTP Host: peeked, never taken), first byte, header out.

Functions of a `Conn` that do the I/O and say what happened; what follows
(the flow's event, the timer, the epoll interest, the warning) is the
composer's (core.Engine), so nothing here calls up.

Resources: the header read so far lives in `conn.hbuf`, ours still to send in
`conn.header`, the inspection's parser in `conn.sniffer`; all are dropped by
the teardown. An inspection raises the socket's SO_RCVLOWAT to the bytes the
parser still needs, so level-triggered epoll does not report the bytes it
already peeked again and again; `end_inspection` lowers it back to 1. Errors: a bad, truncated or
unreadable header raises ProxyHeaderError or OSError to the caller; a
descriptor that is not ready yet (a stale event) is "not yet", never an error.
"""

from __future__ import annotations

import socket
from typing import Final

from tcpproxy.engine.conn import Conn
from tcpproxy.proxy_protocol import ProxyHeaderError, build_header, header_extent, parse_header
from tcpproxy.sniff import MAX_WIRE, MORE, Sniffer, Verdict

__all__ = [
    "HEADER_PEEK",
    "discard_peeked",
    "end_inspection",
    "inspect",
    "peek_first_byte",
    "read_header_in",
    "send_header_out",
]

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


def inspect(conn: Conn) -> Verdict | None:
    """Peek at what the client sent so far and feed it to the connection's sniffer
    (made at the first call): its verdict, or None if nothing new came (a stale event,
    or the client closed: the caller tells them apart). Raises OSError (the client
    failed)."""
    sniffer = conn.sniffer
    if sniffer is None:
        conn.sniffer = sniffer = Sniffer()
    try:
        data = conn.client.recv(MAX_WIRE, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    if len(data) <= conn.peeked:
        return None
    conn.peeked = len(data)
    verdict = sniffer.feed(data)
    if verdict.kind == MORE:  # wake when the bytes it needs are there, not for each segment
        lowat = min(max(verdict.at_least, len(data) + 1), MAX_WIRE)
        if lowat != conn.lowat:
            conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            conn.lowat = lowat
    return verdict


def discard_peeked(conn: Conn) -> None:
    """Drop the bytes peeked (unread bytes make close() reset): the client is closed
    cleanly, with a FIN. MSG_TRUNC: TCP discards them without copying."""
    if conn.peeked:
        try:
            conn.client.recv(conn.peeked, socket.MSG_TRUNC | socket.MSG_DONTWAIT)
        except OSError:  # gone already: it is closed either way
            pass


def end_inspection(conn: Conn) -> None:
    """The app is chosen: the socket wakes for every byte again, the parser goes."""
    conn.sniffer = None
    if conn.lowat > 1:
        try:
            conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:  # the client is gone: the relay will find out
            pass
        conn.lowat = 1


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
