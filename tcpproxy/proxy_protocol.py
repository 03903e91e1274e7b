"""The PROXY protocol (HAProxy's), so backends see the client's address.

Sending: a v1 (text) or v2 (binary) header is written to each target before
any client byte. Accepting: a load balancer in front writes one to us first;
we read exactly its length (peeking, so not one payload byte is consumed)
and take the client's address from it. Packing and parsing are the
`proxy-protocol` library's; this module only moves bytes.
"""

from __future__ import annotations

import ipaddress
import socket

import trio
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
)
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

__all__ = ["HEADER_TIMEOUT", "ProxyHeaderError", "build_header", "read_header", "send_all"]

HEADER_TIMEOUT = 5.0  # seconds a client may take to send its PROXY header
PARTIAL_HEADER_WAIT = 0.010  # seconds between looks at a header that is still arriving
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # bytes, CRLF included (the spec's limit)
_V2_MAX = 16 + 65535


class ProxyHeaderError(Exception):
    """Theirs: a client that should send a PROXY header sent something else."""


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(host: str) -> _IP:
    """`host` as an address to send: v4-mapped IPv6 unmapped, a link-local scope dropped."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # an IPv4 client on a dual-stack socket
            return address.ipv4_mapped
        if address.scope_id is not None:  # "fe80::1%eth0": the scope means nothing elsewhere
            return ipaddress.IPv6Address(address.packed)
    return address


def _mapped(address: _IP) -> ipaddress.IPv6Address:
    """IPv4 as ::ffff:a.b.c.d (RFC 4291), so it fits beside an IPv6 address."""
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def build_header(version: str, source: tuple, destination: tuple) -> bytes:
    """The header for a TCP connection from `source` to `destination` (address tuples).

    Both ends must be of one family in a header: when one is IPv4 and the other
    IPv6 (a balancer's IPv4 client reaching us over IPv6), the IPv4 one is sent
    v4-mapped in a TCP6 header, so the backend still learns the client's address.
    """
    src, dst = _address(source[0]), _address(destination[0])
    result: ProxyResult
    if src.version == dst.version == 4:
        result = ProxyResultIPv4(
            (src, source[1]), (dst, destination[1]), protocol=socket.SOCK_STREAM
        )
    else:
        result = ProxyResultIPv6(
            (_mapped(src), source[1]), (_mapped(dst), destination[1]), protocol=socket.SOCK_STREAM
        )
    protocol = ProxyProtocolV2() if version == "v2" else ProxyProtocolV1()
    return protocol.pack(result)


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def _header_length(data: bytes) -> int | None:
    """Bytes the header at the start of `data` takes; None if more are needed."""
    if data.startswith(_V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return None
    if data.startswith(_V2_SIGNATURE):
        return 16 + int.from_bytes(data[14:16], "big")
    if data.startswith(b"PROXY "[: len(data)]) and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, _V1_MAX)
        if end >= 0:
            return end + 2
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None
    raise ProxyHeaderError("no PROXY protocol header")


async def read_header(sock: socket.socket) -> tuple[str, int] | None:
    """Read one PROXY header from `sock`; return the client's (host, port).

    None for a LOCAL/UNKNOWN header (a health check of the balancer itself:
    keep the socket's own peer). Raises ProxyHeaderError for anything else
    and trio.TooSlowError after HEADER_TIMEOUT.
    """
    with trio.fail_after(HEADER_TIMEOUT):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(_V2_MAX, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not data:
                raise ProxyHeaderError("closed before a PROXY header")
            length = _header_length(data)
            if length is not None and len(data) >= length:
                break
            # Peeked bytes stay readable: wait a little for the rest instead of spinning.
            await trio.sleep(PARTIAL_HEADER_WAIT)
    header = sock.recv(length)
    protocol = ProxyProtocolV2() if header.startswith(_V2_SIGNATURE) else ProxyProtocolV1()
    try:
        result = protocol.unpack(header)
    except Exception as exc:  # the library raises struct.error too: all mean "bad header"
        raise ProxyHeaderError(f"bad PROXY header: {exc or type(exc).__name__}") from None
    source = getattr(result, "source", None)
    if not isinstance(source, tuple):
        return None
    return str(source[0]), int(source[1])
