"""The PROXY protocol (HAProxy's), so backends see the client's address.

Sending: a v1 (text) or v2 (binary) header is written to each target before
any client byte. Accepting: a load balancer in front writes one to us first;
we consume exactly its bytes as they arrive (not one payload byte after it)
and take the client's address from it. Packing and parsing are the
`proxy-protocol` library's; this module says where a header ends, fed the
bytes seen so far (it reads no socket: the engine moves the bytes).
"""

from __future__ import annotations

import ipaddress
import socket

from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
)
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

__all__ = [
    "HEADER_TIMEOUT",
    "ProxyHeaderError",
    "build_header",
    "header_extent",
    "parse_header",
]

HEADER_TIMEOUT = 5.0  # seconds a client may take to send its PROXY header
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MAX = 107  # bytes, CRLF included (the spec's limit)


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


def header_extent(data: bytes) -> int | None:
    """How many bytes the PROXY header that `data` starts with takes; None: not known yet.

    Pure, for a reader that takes bytes as they arrive (the engine):
    v2 says its length in its first 16 bytes, v1 ends at its LF. Raises
    ProxyHeaderError as soon as `data` cannot start a header.
    """
    if not (_V1_PREFIX.startswith(data[:6]) or _V2_SIGNATURE.startswith(data[:12])):
        raise ProxyHeaderError("no PROXY protocol header")
    if data.startswith(_V1_PREFIX):
        end = data.find(b"\n", 0, _V1_MAX)
        if end >= 0:
            return end + 1
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 header longer than {_V1_MAX} bytes")
        return None
    if len(data) < 16:
        return None
    return 16 + int.from_bytes(data[14:16], "big")


def parse_header(header: bytes) -> tuple[str, int] | None:
    """The client's (host, port) from one whole header; None for LOCAL/UNKNOWN.

    Raises ProxyHeaderError for a header the library cannot read.
    """
    protocol = ProxyProtocolV2() if header.startswith(_V2_SIGNATURE) else ProxyProtocolV1()
    try:
        result = protocol.unpack(header)
    except Exception as exc:  # the library raises struct.error too: all mean "bad header"
        raise ProxyHeaderError(f"bad PROXY header: {exc or type(exc).__name__}") from None
    source = getattr(result, "source", None)
    if not isinstance(source, tuple):
        return None
    return str(source[0]), int(source[1])
