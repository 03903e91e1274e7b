"""Synthetic TLS ClientHellos for the sniffer's tests: shaped like real ones, or broken on purpose.

Layers, each with an optional lying length: `extension` and `server_name`
(extension data), `hello_body` (a ClientHello body), `handshake` (its 4-byte
header), `records` (the TLS records that carry it, split at given sizes).
`typical()` makes the extension list of a current browser: GREASE, a post-
quantum key share (X25519MLKEM768: 1,216 bytes of ML-KEM plus 32 of X25519,
as Chrome sends, which makes the hello ~1.8 KiB), an ECH extension, padding
to a given size.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "GREASE",
    "client_hello",
    "extension",
    "handshake",
    "hello_body",
    "records",
    "server_name",
    "sni_offset",
    "typical",
]

GREASE = 0x0A0A  # a GREASE value (RFC 8701): 0x?A?A
_PADDING = 21  # the padding extension (RFC 7685)
_EXT_HEADER = 4


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def extension(kind: int, data: bytes, length: int | None = None) -> bytes:
    """One extension: type, length (the true one unless `length` lies), data."""
    return _u16(kind) + _u16(len(data) if length is None else length) + data


def server_name(
    *entries: tuple[int, bytes], list_length: int | None = None, entry_length: int | None = None
) -> bytes:
    """server_name's data (RFC 6066): its list of (name type, name); lengths may lie."""
    body = b"".join(
        bytes([kind]) + _u16(len(name) if entry_length is None else entry_length) + name
        for kind, name in entries
    )
    return _u16(len(body) if list_length is None else list_length) + body


def hello_body(
    extensions: Sequence[bytes] | None,
    *,
    version: int = 0x0303,
    session_id: bytes = bytes(32),
    ciphers: bytes = bytes.fromhex("130113021303c02bc02fc02cc030cca9cca8c013c014009c009d002f0035"),
    compression: bytes = b"\x00",
    extensions_length: int | None = None,
) -> bytes:
    """A ClientHello body; `extensions` None: none at all (not even their length)."""
    body = (
        _u16(version)
        + bytes(range(32))  # random
        + bytes([len(session_id)])
        + session_id
        + _u16(len(ciphers))
        + ciphers
        + bytes([len(compression)])
        + compression
    )
    if extensions is None:
        return body
    joined = b"".join(extensions)
    return body + _u16(len(joined) if extensions_length is None else extensions_length) + joined


def handshake(body: bytes, *, kind: int = 1, length: int | None = None) -> bytes:
    """The handshake message: type, 3-byte length (true unless `length` lies), body."""
    return bytes([kind]) + (len(body) if length is None else length).to_bytes(3, "big") + body


def records(
    message: bytes,
    sizes: int | Sequence[int] | None = None,
    *,
    kind: int = 0x16,
    version: bytes = b"\x03\x01",
) -> bytes:
    """`message` in TLS records: one (`sizes` None), all of `sizes` bytes (an int), or
    of the sizes listed, the last record taking what is left."""
    if sizes is None:
        sizes = [len(message)]
    elif isinstance(sizes, int):
        sizes = [sizes] * -(-len(message) // sizes)
    out = []
    at = 0
    for index, size in enumerate(sizes):
        end = len(message) if index == len(sizes) - 1 else min(at + size, len(message))
        out.append(bytes([kind]) + version + _u16(end - at) + message[at:end])
        at = end
        if at >= len(message):
            break
    return b"".join(out)


def typical(
    sni: bytes | None = b"example.com",
    *,
    grease: bool = True,
    post_quantum: bool = True,
    ech: bool = True,
) -> list[bytes]:
    """The extensions of a current browser's hello, in its order (padding apart)."""
    groups = ([GREASE] if grease else []) + ([0x11EC] if post_quantum else []) + [0x001D, 0x0017]
    shares = b""
    if grease:
        shares += _u16(GREASE) + _u16(1) + b"\x00"
    if post_quantum:
        shares += _u16(0x11EC) + _u16(1216) + bytes(range(256)) * 4 + bytes(192)
    shares += _u16(0x001D) + _u16(32) + bytes(range(32, 64))
    found = [
        extension(0x0000, server_name((0, sni))) if sni is not None else b"",
        extension(0x0017, b""),  # extended_master_secret
        extension(0xFF01, b"\x00"),  # renegotiation_info
        extension(0x000A, _u16(2 * len(groups)) + b"".join(_u16(g) for g in groups)),
        extension(0x000B, b"\x01\x00"),  # ec_point_formats
        extension(0x0023, b""),  # session_ticket
        extension(0x0010, bytes.fromhex("000c02683208687474702f312e31")),  # ALPN h2, http/1.1
        extension(0x0005, b"\x01\x00\x00\x00\x00"),  # status_request
        extension(0x000D, bytes.fromhex("0010040308040401050308050501080606010201")),
        extension(0x0012, b""),  # signed_certificate_timestamp
        extension(0x0033, _u16(len(shares)) + shares),  # key_share
        extension(0x002D, b"\x01\x01"),  # psk_key_exchange_modes
        extension(0x002B, b"\x06\x03\x04\x03\x03\x03\x02"),  # supported_versions 1.3-1.1
        extension(0x001B, b"\x02\x00\x02"),  # compress_certificate
    ]
    if ech:  # what a GREASE ECH looks like: outer, a config id, an enc key, a payload
        found.append(
            extension(
                0xFE0D, b"\x00\x00\x01\x00\x01\x42" + _u16(32) + bytes(32) + _u16(144) + bytes(144)
            )
        )
    if grease:
        found = [extension(GREASE, b""), *found, extension(0x1A1A, b"\x00")]
    return [part for part in found if part]


def client_hello(
    sni: bytes | None = b"example.com",
    *,
    size: int | None = None,
    extensions: Sequence[bytes] | None = None,
    **typical_options: bool,
) -> bytes:
    """A whole handshake message: `typical(sni)` extensions (or `extensions`), padded with
    the padding extension so its body is `size` bytes if given."""
    listed = list(typical(sni, **typical_options) if extensions is None else extensions)
    body = hello_body(listed)
    if size is not None:
        room = size - len(body) - _EXT_HEADER
        if room < 0:
            raise ValueError(f"a hello of {len(body)} bytes does not fit in {size}")
        body = hello_body([*listed, extension(_PADDING, bytes(room))])
        assert len(body) == size
    return handshake(body)


def sni_offset(message: bytes, sni: bytes) -> int:
    """Where the host name `sni` starts inside `message` (to split there)."""
    at = message.find(sni)
    assert at > 0
    return at
