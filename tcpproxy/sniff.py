"""Which host name a connection asks for, from its first bytes: TLS SNI or HTTP Host (pure).

Sans-IO, for the engine: it peeks the client's bytes (MSG_PEEK: they stay in
the socket for the target) each time more arrive and feeds them all to its
connection's `Sniffer`, which answers a `Verdict`:
- MORE: not known yet; `at_least` is how many bytes (from the first) the next
  answer needs at least: the engine sets SO_RCVLOWAT to it, so a level-
  triggered epoll does not wake it for every byte of a trickle;
- NAME: the name asked for, normalized (`hostnames.normalize_wire_name`),
  ready for `NameTable.lookup`;
- NO_NAME: nothing to route on (the port's default app takes it), `why` says
  which case;
- BAD: close the connection, `why` says what was wrong.
Never an exception on the peer's bytes (a bug is one).

Rules:
1. The first bytes choose: 0x16 then 0x03 0x00-0x04 is a TLS record (SSL 3.0
   to TLS 1.3 record versions); a known HTTP/1 method and a space is HTTP;
   anything else is NO_NAME as soon as its first bytes show it (SSH's
   "SSH-", an SSLv2-compatible hello, a binary protocol, "PRI * HTTP/2.0").
2. NAME and NO_NAME only ever come from a whole ClientHello or a whole
   request head: a partial one is MORE, or BAD at a limit, never the default.
3. TLS: the handshake message is reassembled across records (1-byte records,
   boundaries anywhere); every record before its end must be a handshake
   record of 1 to 2^14 bytes (RFC 8446 5.1: a 0-length handshake record is
   forbidden). The hello may be MAX_HELLO bytes at most and must end within
   MAX_WIRE bytes of the stream. Lengths that do not add up (a vector past
   its parent's end, extensions that do not fill the hello exactly), an
   extension type twice (RFC 8446 4.2; two server_names would let us and the
   target route differently) or two host_name entries are BAD: such a hello
   is refused by a conforming server anyway. Bytes after the hello (early
   data, the rest of its record) are not looked at.
4. TLS names: a hello without extensions (SSL 3.0 style) or without
   server_name, or whose server_name has no host_name entry (other name types
   are skipped, RFC 6066), is NO_NAME. A host_name that is well encoded but not
   a host name (NUL, other bytes, empty labels, over 253 characters) is
   NO_NAME, not BAD: such a client could reach the default by sending no SNI
   at all, so refusing it protects nothing, and the target's TLS stack judges
   it. An empty host_name is an encoding error (RFC 6066: 1 byte or more): BAD.
   With ECH the outer hello's SNI (the public name) is the one read; GREASE
   values are extensions like any other.
5. HTTP/1.x: the head ends at the first empty line (CRLF or a bare LF, as
   h11 and most servers accept); it must end within MAX_HEAD bytes. The
   request line is `method SP target SP HTTP/1.d` (an HTTP/0.9 line without
   a version is NO_NAME: it has no headers). The name is the authority of an
   absolute-form target (`GET http://name/ HTTP/1.1`) or of CONNECT's target,
   else the Host header's; its port is dropped. Two Host headers, a line
   starting with whitespace (obs-fold, which h11 unfolds and RFC 9112 5.2
   lets a server refuse: unfolding it differently from the target is how
   smuggling starts), whitespace before a colon, a NUL or a bare CR are BAD,
   as a port that is not digits. No Host (HTTP/1.0), an empty one, an IP
   literal `[v6]:port` (no config name can be one) or one that is not a host
   name is NO_NAME.
6. Incremental: each feed passes every byte seen so far (the same prefix,
   grown); the sniffer resumes where it stopped (the TLS records walked, the
   handshake bytes gathered, where the search for the head's end got to), so
   a hello in 1-byte records costs O(n) in all. The usual case, a whole hello
   in one record, is parsed in place in one pass. After NAME, NO_NAME or BAD
   the same answer is given again.
"""

from __future__ import annotations

from typing import Final, final

from tcpproxy.hostnames import normalize_wire_name

__all__ = [
    "BAD",
    "KINDS",
    "MAX_HEAD",
    "MAX_HELLO",
    "MAX_RECORD",
    "MAX_WIRE",
    "MORE",
    "NAME",
    "NO_NAME",
    "Sniffer",
    "Verdict",
    "sniff",
]

MORE: Final = 0
NAME: Final = 1
NO_NAME: Final = 2
BAD: Final = 3
KINDS: Final = ("MORE", "NAME", "NO_NAME", "BAD")  # the kinds' names, by number

# bytes of a ClientHello message (the length in its handshake header): Chrome's with a
# post-quantum key share is ~1.7-2.2 KiB, the largest seen in practice a few KiB (many
# PSK identities, big padding); nginx's ssl_preread and HAProxy's default buffer stop
# near 16 KiB too. Bounds the copy a hello split over records costs.
MAX_HELLO: Final = 16 * 1024
# bytes of the stream up to the hello's end, record headers included (the most the engine
# ever peeks, per connection): a MAX_HELLO hello fits in records of 2 bytes or more; in
# 1-byte records (6 bytes on the wire each) a hello of 10,918 bytes does.
MAX_WIRE: Final = 64 * 1024
MAX_RECORD: Final = 16 * 1024  # bytes of a record's payload (TLSPlaintext, RFC 8446 5.1)
# bytes of an HTTP request head, request line to empty line: node's default and h11's
# default incomplete-event size; nginx's default allows 8 KiB per line
MAX_HEAD: Final = 16 * 1024

_UNKNOWN: Final = 0
_TLS: Final = 1
_HTTP: Final = 2

_RECORD_HEADER: Final = 5  # type, version (2), length (2)
_HANDSHAKE_HEADER: Final = 4  # type, length (3)
_HANDSHAKE: Final = 0x16  # the record type of handshake messages
_CLIENT_HELLO: Final = 1  # the handshake type
_SERVER_NAME: Final = 0  # the extension type (RFC 6066)
_HOST_NAME: Final = 0  # the server_name entry type

# HTTP/1 methods (RFC 9110, PATCH, WebDAV), each with its space: what starts a request
_METHODS: Final = tuple(
    method + b" "
    for method in (
        b"GET",
        b"HEAD",
        b"POST",
        b"PUT",
        b"DELETE",
        b"CONNECT",
        b"OPTIONS",
        b"TRACE",
        b"PATCH",
        b"PROPFIND",
        b"PROPPATCH",
        b"MKCOL",
        b"COPY",
        b"MOVE",
        b"LOCK",
        b"UNLOCK",
        b"REPORT",
        b"SEARCH",
    )
)
_METHOD_FIRST: Final = frozenset(method[0] for method in _METHODS)
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VCHAR: Final = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))  # and obs-text
_SCHEME: Final = b"+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@final
class Verdict:
    """The sniffer's answer: `kind` (MORE, NAME, NO_NAME, BAD) and what goes with it."""

    def __init__(
        self, kind: int, at_least: int = 0, name: str = "", why: str = "", oversize: bool = False
    ) -> None:
        self.kind = kind
        self.oversize = oversize  # BAD: over a limit (MAX_HELLO, MAX_WIRE, MAX_HEAD)
        self.at_least = at_least  # MORE: bytes (from the first) the next answer needs at least
        self.name = name  # NAME: normalized, for NameTable.lookup
        self.why = why  # NO_NAME, BAD: which case, in words for a log line

    def __repr__(self) -> str:
        detail = {MORE: str(self.at_least), NAME: self.name}.get(self.kind, self.why)
        return f"Verdict({KINDS[self.kind]}, {detail!r})"


def _bad(why: str) -> Verdict:
    return Verdict(BAD, why=why)


def _oversize(why: str) -> Verdict:
    """BAD for a size over a limit (the engine counts these apart: "oversize")."""
    return Verdict(BAD, why=why, oversize=True)


def _no_name(why: str) -> Verdict:
    return Verdict(NO_NAME, why=why)


def _named(raw: bytes, what: str) -> Verdict:
    """NAME for a host name the client sent; NO_NAME (rule 4, 5) if it is not one."""
    name = normalize_wire_name(raw)
    if name is None:
        return _no_name(f"{what} that is not a host name")
    return Verdict(NAME, name=name)


def _u16(data: bytes, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def _server_name(data: bytes, at: int, end: int) -> Verdict:
    """The server_name extension's data, data[at:end] (RFC 6066 3): rules 3, 4."""
    if end - at < 2:
        return _bad("a server_name extension without its list")
    size = _u16(data, at)
    at += 2
    if size == 0 or at + size != end:
        return _bad("a server_name list whose length does not match its extension")
    host_at = host_end = -1
    while at < end:
        if at + 3 > end:
            return _bad("a server_name entry cut short")
        kind = data[at]
        size = _u16(data, at + 1)
        at += 3
        if at + size > end:
            return _bad("a server_name entry longer than its list")
        if kind == _HOST_NAME:
            if host_at >= 0:
                return _bad("two host_name entries in server_name")
            if size == 0:
                return _bad("an empty host_name in server_name")
            host_at, host_end = at, at + size
        at += size
    if host_at < 0:
        return _no_name("a server_name without a host_name entry")
    return _named(data[host_at:host_end], "a server name")


def _client_hello(data: bytes, at: int, end: int) -> Verdict:
    """NAME, NO_NAME or BAD for the ClientHello body data[at:end] (rules 3, 4)."""
    if end - at < 2 + 32 + 1 or data[at] != 3:
        return _bad("a ClientHello too short, or not of SSL 3.0 to TLS 1.3")
    at += 2 + 32  # legacy_version, random
    size = data[at]  # legacy_session_id
    if size > 32:
        return _bad(f"a session id of {size} bytes (at most 32)")
    at += 1 + size
    if at + 2 > end:
        return _bad("a ClientHello cut before its cipher suites")
    size = _u16(data, at)
    if size < 2 or size & 1:
        return _bad(f"cipher suites of {size} bytes")
    at += 2 + size
    if at + 1 > end:
        return _bad("a ClientHello cut before its compression methods")
    size = data[at]
    if size == 0:
        return _bad("no compression method")
    at += 1 + size
    if at > end:
        return _bad("compression methods past the ClientHello's end")
    if at == end:
        return _no_name("a ClientHello without extensions")
    if at + 2 > end or at + 2 + _u16(data, at) != end:
        return _bad("extensions whose length does not match the ClientHello's")
    at += 2
    seen: set[int] = set()
    verdict: Verdict | None = None
    while at < end:
        if at + 4 > end:
            return _bad("an extension header cut short")
        kind = _u16(data, at)
        size = _u16(data, at + 2)
        at += 4
        if at + size > end:
            return _bad(f"extension {kind} longer than the extensions")
        if kind in seen:
            return _bad(f"extension {kind} twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            verdict = _server_name(data, at, at + size)
            if verdict.kind == BAD:
                return verdict
        at += size
    return verdict if verdict is not None else _no_name("a ClientHello without server_name")


def _authority(raw: bytes, what: str) -> Verdict:
    """The name in an authority (`host[:port]`, `[v6]:port`): rule 5."""
    if not raw:
        return _no_name(f"an empty {what}")
    if raw.translate(None, _VCHAR):
        return _bad(f"whitespace or a control byte inside the {what}")
    if raw[0] == 0x5B:  # '[': an IP literal
        close = raw.find(b"]")
        port = raw[close + 1 :]
        if close < 0 or (port and not (port[0] == 0x3A and (len(port) == 1 or port[1:].isdigit()))):
            return _bad(f"a {what} with a malformed IP literal")
        return _no_name(f"an IP literal as the {what}")
    colon = raw.rfind(b":")
    if colon >= 0:
        port = raw[colon + 1 :]
        if port and not port.isdigit():
            return _bad(f"a {what} whose port is not a number")
        raw = raw[:colon]
    return _named(raw, f"a {what}")


def _target_authority(method: bytes, target: bytes) -> bytes | None:
    """The authority a request target names (absolute form, CONNECT's), else None."""
    if method == b"CONNECT":
        return target
    if target[0] == 0x2F or target == b"*":  # origin form, asterisk form
        return None
    mark = target.find(b"://")
    if mark <= 0 or target[:mark].translate(None, _SCHEME):
        return None
    rest = target[mark + 3 :]
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if 0 <= found < end:
            end = found
    return rest[:end]


@final
class Sniffer:
    """One connection's sniffing: `feed` it every byte seen so far (rule 6)."""

    def __init__(self) -> None:
        self.protocol = ""  # "tls" or "http" once the first bytes have said it
        self._mode = _UNKNOWN
        self._done: Verdict | None = None  # the final answer, once given
        # TLS: the records walked so far
        self._pos = 0  # where the next byte to take is (stream offset)
        self._record_end = 0  # where the current record's payload ends (== _pos: a header next)
        self._gathered = bytearray()  # the handshake bytes taken so far (hello over records)
        self._want = 0  # the hello's bytes, its handshake header included; 0: not known yet
        self._in_place = False  # the whole hello is in the first record: parsed from the data
        # HTTP: the search for the end of the head
        self._line_end = -1  # the request line's LF, once it is checked
        self._authority: bytes | None = None  # the target's authority, if it names one
        self._last_lf = 0  # the last LF whose next line is not known to be non-empty
        self._searched = 0  # where the next search for an LF starts

    def feed(self, data: bytes) -> Verdict:
        """The answer for `data`, every byte the client sent so far."""
        if self._done is not None:
            return self._done
        mode = self._mode
        if mode == _TLS:
            verdict = self._tls(data)
        elif mode == _HTTP:
            verdict = self._http(data)
        else:
            verdict = self._start(data)
        if verdict.kind != MORE:
            self._done = verdict
        return verdict

    def _start(self, data: bytes) -> Verdict:
        """Rule 1: which protocol the first bytes show."""
        size = len(data)
        if size == 0:
            return Verdict(MORE, at_least=1)
        first = data[0]
        if first == _HANDSHAKE:
            self._mode = _TLS
            self.protocol = "tls"
            return self._tls(data)
        if first in _METHOD_FIRST:
            prefix = data[:16]
            maybe = False
            for method in _METHODS:
                if prefix.startswith(method):
                    self._mode = _HTTP
                    self.protocol = "http"
                    return self._http(data)
                if method.startswith(prefix):
                    maybe = True
            if maybe:
                return Verdict(MORE, at_least=size + 1)
        if first & 0x80:
            return _no_name("an SSLv2-style record (an SSLv2-compatible hello has no name)")
        return _no_name("neither TLS nor HTTP/1")

    def _more(self, at_least: int) -> Verdict:
        if at_least > MAX_WIRE:
            return _oversize(f"a ClientHello that does not end within {MAX_WIRE} bytes")
        return Verdict(MORE, at_least=at_least)

    def _tls(self, data: bytes) -> Verdict:
        """Rule 3: walk the records from where the last feed stopped."""
        size = len(data)
        if self._in_place:
            end = _RECORD_HEADER + self._want
            if size < end:
                return Verdict(MORE, at_least=end)
            return _client_hello(data, _RECORD_HEADER + _HANDSHAKE_HEADER, end)
        gathered = self._gathered
        while True:
            pos = self._pos
            if pos == self._record_end:  # a record header next
                if pos == 0 and ((size > 1 and data[1] != 3) or (size > 2 and data[2] > 4)):
                    return _no_name("a first byte of 0x16 but no TLS record version")
                if size < pos + _RECORD_HEADER:  # this header, and the hello's bytes left
                    left = (self._want or _HANDSHAKE_HEADER) - len(gathered)
                    return self._more(pos + _RECORD_HEADER + left)
                if data[pos] != _HANDSHAKE:
                    return _bad(f"a record of type {data[pos]} inside the ClientHello")
                if data[pos + 1] != 3 or data[pos + 2] > 4:
                    return _bad("a record version that is not SSL 3.0 to TLS 1.3")
                length = _u16(data, pos + 3)
                if length == 0:
                    return _bad("an empty handshake record")
                if length > MAX_RECORD:
                    return _oversize(f"a record of {length} bytes (at most {MAX_RECORD})")
                pos += _RECORD_HEADER
                self._pos = pos
                self._record_end = pos + length
            if pos == _RECORD_HEADER and not gathered:  # the first record: in place?
                record_end = self._record_end
                header_end = pos + _HANDSHAKE_HEADER
                if record_end >= header_end:
                    if size < header_end:
                        return Verdict(MORE, at_least=header_end)
                    verdict = self._hello_header(data, pos)
                    if verdict is not None:
                        return verdict
                    if pos + self._want <= record_end:
                        self._in_place = True
                        return self._tls(data)
            # take this record's bytes, as many as the hello still wants
            want = self._want if self._want else _HANDSHAKE_HEADER
            end = min(self._record_end, size, pos + want - len(gathered))
            if pos < end:
                gathered += data[pos:end]
                pos = end
                self._pos = end
                if not self._want and len(gathered) >= _HANDSHAKE_HEADER:
                    verdict = self._hello_header(gathered, 0)
                    if verdict is not None:
                        return verdict
                    want = self._want
                if len(gathered) == want:
                    if pos > MAX_WIRE:
                        return _oversize(f"a ClientHello that does not end within {MAX_WIRE} bytes")
                    return _client_hello(bytes(gathered), _HANDSHAKE_HEADER, want)
            if pos < self._record_end:  # this record has more to come
                if pos < size:  # here already: the hello's size was just learnt
                    continue
                # the hello's bytes left, and a record header if they go past this record:
                # a hello trickled in small records wakes the engine a few dozen times,
                # not once per record (each wake peeks, and copies, from the start)
                left = want - len(gathered)
                if pos + left > self._record_end:
                    return self._more(pos + left + _RECORD_HEADER)
                return self._more(pos + left)

    def _hello_header(self, data: bytes | bytearray, at: int) -> Verdict | None:
        """The handshake header at data[at:]: sets the hello's size, or BAD."""
        if data[at] != _CLIENT_HELLO:
            return _bad(f"a handshake message of type {data[at]}, not a ClientHello")
        length = (data[at + 1] << 16) | (data[at + 2] << 8) | data[at + 3]
        if length > MAX_HELLO:
            return _oversize(f"a ClientHello of {length} bytes (at most {MAX_HELLO})")
        self._want = _HANDSHAKE_HEADER + length
        return None

    def _http(self, data: bytes) -> Verdict:
        """Rule 5: the request line once it is here, then the head once it ends."""
        size = len(data)
        if self._line_end < 0:
            lf = data.find(b"\n", self._searched)
            if lf < 0:
                self._searched = size
                return self._more_head(size)
            if lf >= MAX_HEAD:  # as a feed that stopped at MAX_HEAD bytes would have said
                return _oversize(f"a request head over {MAX_HEAD} bytes")
            verdict = self._request_line(data, lf)
            if verdict is not None:
                return verdict
            self._line_end = self._last_lf = lf
            self._searched = lf + 1
        last = self._last_lf
        end = -1
        while last + 1 < size:
            after = data[last + 1]
            if after == 0x0A:  # LF LF
                end = last + 2
                break
            if after == 0x0D:
                if last + 2 >= size:
                    break
                if data[last + 2] == 0x0A:  # LF CR LF
                    end = last + 3
                    break
            lf = data.find(b"\n", max(last + 1, self._searched))
            if lf < 0:
                self._searched = size
                break
            last = lf
        self._last_lf = last
        if end < 0:
            return self._more_head(size)
        if end > MAX_HEAD:
            return _oversize(f"a request head over {MAX_HEAD} bytes")
        return self._headers(data, end)

    def _more_head(self, size: int) -> Verdict:
        if size >= MAX_HEAD:
            return _oversize(f"a request head over {MAX_HEAD} bytes")
        return Verdict(MORE, at_least=size + 1)

    def _request_line(self, data: bytes, lf: int) -> Verdict | None:
        """The request line, data[:lf]: BAD, NO_NAME (HTTP/0.9), or None and its authority."""
        line = data[: lf - 1] if lf > 0 and data[lf - 1] == 0x0D else data[:lf]
        parts = line.split(b" ")
        if len(parts) == 2 and parts[1]:
            return _no_name("an HTTP/0.9 request (no headers)")
        if len(parts) != 3 or not parts[1] or parts[1].translate(None, _VCHAR):
            return _bad("a malformed request line")
        version = parts[2]
        if len(version) != 8 or not version.startswith(b"HTTP/1.") or not version[7:].isdigit():
            return _bad("a request line whose version is not HTTP/1.x")
        self._authority = _target_authority(parts[0], parts[1])
        return None

    def _headers(self, data: bytes, end: int) -> Verdict:
        """The header lines between the request line and the empty line at `end`."""
        block = data[self._line_end + 1 : end]
        if b"\0" in block:
            return _bad("a NUL in the request head")
        host: bytes | None = None
        for line in block.split(b"\n"):
            if line and line[-1] == 0x0D:
                line = line[:-1]
            if not line:
                break  # the empty line that ends the head
            if b"\r" in line:
                return _bad("a bare CR in a header line")
            if line[0] == 0x20 or line[0] == 0x09:
                return _bad("a header line folded (obs-fold)")
            colon = line.find(b":")
            if colon <= 0 or line[:colon].translate(None, _TCHAR):
                return _bad("a header line whose name is not a token (whitespace before ':'?)")
            if colon == 4 and line[:4].lower() == b"host":
                if host is not None:
                    return _bad("two Host headers")
                host = line[5:].strip(b" \t")
        if self._authority is not None:
            return _authority(self._authority, "request target's authority")
        if host is None:
            return _no_name("a request without Host (HTTP/1.0)")
        return _authority(host, "Host")


def sniff(data: bytes) -> Verdict:
    """The answer for `data` at once (a new Sniffer fed once)."""
    return Sniffer().feed(data)
