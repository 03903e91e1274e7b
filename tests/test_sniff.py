"""The sniffer: TLS SNI and HTTP Host from the first bytes as they arrive, never routed early."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpproxy.sniff import (
    BAD,
    KINDS,
    MAX_HEAD,
    MAX_HELLO,
    MAX_RECORD,
    MAX_WIRE,
    MORE,
    NAME,
    NO_NAME,
    Sniffer,
    Verdict,
    sniff,
)
from tests.hellos import (
    GREASE,
    client_hello,
    extension,
    handshake,
    hello_body,
    records,
    server_name,
    sni_offset,
    typical,
)

pytestmark = pytest.mark.engine  # the per-connection path's: CI runs them interpreted too


def kind(verdict: Verdict) -> str:
    return KINDS[verdict.kind]


def feed_in_steps(data: bytes, cuts: Sequence[int]) -> tuple[Verdict, list[Verdict]]:
    """Feed the prefixes of `data` ending at each cut, then all of it: the last answer
    and those before it (each checked: a partial answer is MORE with room to grow)."""
    sniffer = Sniffer()
    before = []
    for cut in sorted(cuts):
        verdict = sniffer.feed(data[:cut])
        if verdict.kind != MORE:
            return verdict, before
        assert cut < verdict.at_least <= max(len(data), cut + 1) or verdict.at_least > len(data)
        before.append(verdict)
    return sniffer.feed(data), before


def by_at_least(data: bytes) -> tuple[Verdict, int]:
    """Feed as the engine would: each time `at_least` bytes are there. Returns the answer
    and how many feeds it took."""
    sniffer = Sniffer()
    size, feeds = 0, 0
    while True:
        verdict = sniffer.feed(data[:size])
        feeds += 1
        if verdict.kind != MORE or size >= len(data):
            return verdict, feeds
        assert verdict.at_least > size
        size = min(verdict.at_least, len(data))


# --- TLS: whole, split, trickled ---------------------------------------------------


def test_a_whole_hello_in_one_record_names_its_server() -> None:
    wire = records(client_hello(b"Example.COM."))
    verdict = sniff(wire)
    assert (kind(verdict), verdict.name) == ("NAME", "example.com")
    sniffer = Sniffer()
    assert sniffer.feed(wire).name == "example.com"
    assert sniffer.protocol == "tls"
    assert sniffer.feed(wire + b"more").name == "example.com"  # the answer stays


def test_a_post_quantum_hello_written_in_two_parts() -> None:
    wire = records(client_hello(b"pq.example"))
    assert 1700 <= len(wire) <= 2300  # as Chrome's with X25519MLKEM768
    first = Sniffer().feed(wire[:1000])
    assert (kind(first), first.at_least) == ("MORE", len(wire))
    verdict, before = feed_in_steps(wire, [1000])
    assert verdict.name == "pq.example" and len(before) == 1


def test_one_byte_at_a_time_is_more_until_the_last_byte() -> None:
    wire = records(client_hello(b"trickle.example"))
    verdict, before = feed_in_steps(wire, range(len(wire)))
    assert verdict.name == "trickle.example"
    assert len(before) == len(wire)
    # cut inside the record header: it and the handshake header are needed at least
    assert [v.at_least for v in before[:5]] == [1, 9, 9, 9, 9]
    assert before[5].at_least == 9  # then the handshake header
    assert all(v.at_least == len(wire) for v in before[9:])  # then the hello's end


def test_a_hello_trickled_in_1_byte_records_needs_few_wakes() -> None:
    """`at_least` counts every byte the hello still needs (and a record header): an
    engine that waits for it (SO_RCVLOWAT) wakes a few dozen times, not per record."""
    wire = records(client_hello(b"slow.example", size=4000), 1)
    sniffer, seen, wakes = Sniffer(), 0, 0
    verdict = sniffer.feed(b"")
    while verdict.kind == MORE:
        assert seen < verdict.at_least <= len(wire)  # a lower bound, never past the end
        seen = verdict.at_least
        wakes += 1
        verdict = sniffer.feed(wire[:seen])
    assert verdict.name == "slow.example" and seen == len(wire)
    assert wakes < 60  # 4,000 records


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_a_hello_in_small_records(size: int) -> None:
    wire = records(client_hello(b"small.example"), size)
    assert sniff(wire).name == "small.example"
    verdict, feeds = by_at_least(wire)
    assert verdict.name == "small.example"
    count = -(-len(wire) // (size + 5))  # records
    assert feeds <= 2 * count + 4  # a wake-up per header and per payload, not per byte


def test_one_byte_records_fed_byte_by_byte() -> None:
    wire = records(client_hello(b"bytes.example", post_quantum=False), 1)
    verdict, before = feed_in_steps(wire, range(len(wire)))
    assert verdict.name == "bytes.example"
    assert all(v.kind == MORE for v in before)


def test_a_long_hello_in_one_byte_records_costs_linear_time() -> None:
    """10 KiB in 1-byte records, fed at each record: a sniffer that parsed again from the
    start at each feed would do ~10^9 steps here and hit the test's timeout."""
    wire = records(client_hello(b"long.example", size=10_000), 1)
    assert len(wire) < MAX_WIRE
    verdict, before = feed_in_steps(wire, range(0, len(wire), 6))  # at each record
    assert verdict.name == "long.example"
    assert len(before) >= 10_000


@pytest.mark.parametrize(
    "cut", [1, 2, 3, 4], ids=lambda c: f"handshake-header+{c}"
)  # boundaries inside the 4-byte handshake header
def test_records_split_inside_the_handshake_header(cut: int) -> None:
    message = client_hello(b"hs.example")
    wire = records(message, [cut, len(message)])
    assert sniff(wire).name == "hs.example"
    verdict, _ = feed_in_steps(wire, range(0, len(wire), 7))
    assert verdict.name == "hs.example"


@pytest.mark.parametrize("into", [-3, -1, 0, 1, 5, 9])
def test_records_split_inside_the_server_name(into: int) -> None:
    message = client_hello(b"inside.sni.example")
    at = sni_offset(message, b"inside.sni.example") + into
    wire = records(message, [at, 3, len(message)])  # three records around the name
    assert sniff(wire).name == "inside.sni.example"
    verdict, before = feed_in_steps(wire, range(len(wire)))
    assert verdict.name == "inside.sni.example" and all(v.kind == MORE for v in before)


def test_sixteen_kib_hellos_are_accepted_one_byte_more_refused() -> None:
    largest = client_hello(b"big.example", size=MAX_HELLO)
    assert len(largest) == MAX_HELLO + 4
    wire = records(largest, MAX_RECORD)
    assert sniff(wire).name == "big.example"
    assert by_at_least(wire)[0].name == "big.example"
    over = records(client_hello(b"big.example", size=MAX_HELLO + 1), MAX_RECORD)
    assert kind(sniff(over)) == "BAD"
    # refused from its handshake header, without waiting for the rest
    assert kind(sniff(over[:9])) == "BAD"


def test_hellos_ending_past_the_wire_limit_are_refused() -> None:
    wire = records(client_hello(b"far.example", size=12_000), 1)  # 72 KB on the wire
    assert len(wire) > MAX_WIRE
    assert kind(sniff(wire)) == "BAD"
    verdict, _ = by_at_least(wire)
    assert kind(verdict) == "BAD" and "65536" in verdict.why


def retyped(wire: bytes, at: int, value: int) -> bytes:
    return wire[:at] + bytes([value]) + wire[at + 1 :]


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (
            records(client_hello(), [1, 4000]).replace(
                b"\x16\x03\x01\x00\x01", b"\x16\x03\x01\x00\x00", 1
            ),
            "empty",
        ),
        (b"\x16\x03\x01\x40\x01" + bytes(20), "16385 bytes"),
        (retyped(records(client_hello(), [10, 5000]), 15, 0x17), "type 23"),
        (records(client_hello(), [10, 100])[:15] + b"\x14\x03\x03\x00\x01\x01", "type 20"),
        (retyped(records(client_hello(), [10, 5000]), 16, 0x02), "record version"),
        (records(handshake(hello_body(typical()), kind=2)), "type 2"),
        (records(handshake(hello_body(typical()), length=MAX_HELLO * 4)), "65536 bytes"),
    ],
    ids=[
        "empty-record",
        "oversize-record",
        "app-data-record",
        "ccs-between",
        "bad-version-later",
        "server-hello",
        "huge-length",
    ],
)
def test_bad_records(wire: bytes, why: str) -> None:
    verdict = sniff(wire)
    assert kind(verdict) == "BAD" and why in verdict.why, verdict


def _hello(extensions: list[bytes] | None, **options: object) -> bytes:
    return records(handshake(hello_body(extensions, **options)))  # type: ignore[arg-type]


SNI = extension(0, server_name((0, b"ok.example")))


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        # lengths that lie
        (_hello([SNI], extensions_length=len(SNI) + 1), "BAD"),
        (_hello([SNI], extensions_length=len(SNI) - 1), "BAD"),
        (_hello([extension(0, server_name((0, b"ok.example")), length=100)]), "BAD"),
        (_hello([extension(0, server_name((0, b"ok.example"), list_length=30))]), "BAD"),
        (_hello([extension(0, server_name((0, b"ok.example"), list_length=5))]), "BAD"),
        (_hello([extension(0, server_name((0, b"ok.example"), entry_length=40))]), "BAD"),
        (_hello([SNI], session_id=bytes(33)), "BAD"),
        (_hello([SNI], ciphers=b"\x13"), "BAD"),
        (_hello([SNI], compression=b""), "BAD"),
        (records(handshake(hello_body([SNI])[:30])), "BAD"),
        (records(handshake(hello_body([SNI]) + b"\x00")), "BAD"),
        # malformed names
        (_hello([extension(0, server_name((0, b"")))]), "BAD"),
        (_hello([extension(0, b"")]), "BAD"),
        (_hello([extension(0, server_name((0, b"a.example"), (0, b"b.example")))]), "BAD"),
        (_hello([SNI, extension(0x17, b""), SNI]), "BAD"),  # server_name twice
        (_hello([SNI, extension(0x17, b""), extension(0x17, b"")]), "BAD"),  # any type twice
        (_hello([extension(0, server_name((0, b"nul\x00.example")))]), "NO_NAME"),
        (_hello([extension(0, server_name((0, b"a" * 256)))]), "NO_NAME"),
        (_hello([extension(0, server_name((0, b"a..example")))]), "NO_NAME"),
        (_hello([extension(0, server_name((0, b"caf\xc3\xa9.example")))]), "NO_NAME"),
        (_hello([extension(0, server_name((1, b"ok.example")))]), "NO_NAME"),  # wrong type
        (_hello([extension(0, server_name((1, b"x"), (0, b"ok.example")))]), "NAME"),
        # no name to be had
        (_hello(None), "NO_NAME"),  # no extensions at all
        (_hello([]), "NO_NAME"),
        (records(client_hello(None)), "NO_NAME"),
        (_hello([SNI], version=0x0300), "NAME"),
    ],
)
def test_hello_contents(wire: bytes, expected: str) -> None:
    verdict = sniff(wire)
    assert kind(verdict) == expected, verdict
    if expected == "NAME":
        assert verdict.name == "ok.example"
    # the same answer, however it arrives
    assert kind(feed_in_steps(wire, range(0, len(wire), 3))[0]) == expected


@pytest.mark.parametrize(
    "version", [b"\x03\x00", b"\x03\x01", b"\x03\x02", b"\x03\x03", b"\x03\x04"]
)
def test_record_versions_ssl3_to_tls13(version: bytes) -> None:
    assert sniff(records(client_hello(b"v.example"), version=version)).name == "v.example"


def test_grease_and_ech_route_on_the_outer_name() -> None:
    message = client_hello(b"public.example", grease=True, ech=True)
    assert GREASE.to_bytes(2, "big") in message and b"\xfe\x0d" in message
    assert sniff(records(message)).name == "public.example"
    plain = client_hello(b"public.example", grease=False, ech=False, post_quantum=False)
    assert sniff(records(plain)).name == "public.example"


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + bytes(37),  # SSLv2-compatible hello
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"\x00\x00\x00\x01",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"get / HTTP/1.1\r\n",  # methods are case-sensitive
        b"\x16\x02\x00",  # 0x16, then no record version
        b"\x16\x03\x07",
        b"\r\nGET / HTTP/1.1\r\n",
    ],
)
def test_other_protocols_have_no_name_at_once(data: bytes) -> None:
    verdict, _ = feed_in_steps(data, range(1, len(data)))
    assert kind(verdict) == "NO_NAME"
    for size in range(1, len(data) + 1):  # known within the first bytes
        if Sniffer().feed(data[:size]).kind == NO_NAME:
            assert size <= 3
            break


def test_zero_bytes_is_more() -> None:
    verdict = sniff(b"")
    assert (kind(verdict), verdict.at_least) == ("MORE", 1)


# --- HTTP -----------------------------------------------------------------------------


def request(*headers: str, line: str = "GET / HTTP/1.1", end: str = "\r\n") -> bytes:
    return (end.join([line, *headers, "", ""])).encode("latin-1")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (request("Host: WWW.Example.com"), "www.example.com"),
        (
            request("User-Agent: x", "hOsT:   www.example.com:8080  ", "Accept: */*"),
            "www.example.com",
        ),
        (request("Host: www.example.com.:80"), "www.example.com"),
        (request("Host: www.example.com", end="\n"), "www.example.com"),  # bare LF
        (request("Host: other", line="GET http://Abs.Example:81/p?q HTTP/1.1"), "abs.example"),
        (request("Host: other", line="GET https://abs.example?x HTTP/1.1"), "abs.example"),
        (
            request("Host: x.example:443", line="CONNECT tunnel.example:443 HTTP/1.1"),
            "tunnel.example",
        ),
        (request("Host: star.example", line="OPTIONS * HTTP/1.1"), "star.example"),
        (request("Host: dav.example", line="PROPFIND /d HTTP/1.1"), "dav.example"),
        (request("Host: 10.0.0.1:80"), "10.0.0.1"),
        (request("Host: h.example") + b"POST body after the head", "h.example"),
    ],
)
def test_http_names(data: bytes, expected: str) -> None:
    sniffer = Sniffer()
    verdict = sniffer.feed(data)
    assert (kind(verdict), verdict.name) == ("NAME", expected)
    assert sniffer.protocol == "http"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (request(line="GET / HTTP/1.0"), "NO_NAME"),
        (request("Accept: */*"), "NO_NAME"),
        (request("Host:"), "NO_NAME"),
        (request("Host: [::1]:8080"), "NO_NAME"),
        (request("Host: [::1]"), "NO_NAME"),
        (request("Host: user@h.example"), "NO_NAME"),
        (b"GET /\r\n", "NO_NAME"),  # HTTP/0.9
        (request("Host: a.example", "Host: a.example"), "BAD"),
        (request("Host: a.example", "host: b.example"), "BAD"),
        (
            request("Host: a.example", line="GET http://b.example/ HTTP/1.1").replace(
                b"\r\n\r\n", b"\r\nHOST: c\r\n\r\n"
            ),
            "BAD",
        ),
        (request("X-A: 1", " Host: a.example"), "BAD"),  # obs-fold
        (request("Host: a.example", "X-A: 1", "\tcontinued"), "BAD"),
        (request("Host : a.example"), "BAD"),  # whitespace before the colon
        (request("Host: a.example:http"), "BAD"),
        (request("Host: a .example"), "BAD"),
        (request("Host: [::1"), "BAD"),
        (request("Host: a.example", "X: a\x00b"), "BAD"),
        (request("Host: a.example", "X: a\rb"), "BAD"),
        (request("Host: a.example", line="GET / HTTP/2.0"), "BAD"),
        (request("Host: a.example", line="GET  / HTTP/1.1"), "BAD"),
        (request("Host: a.example", line="GET / HTTP/1.1 x"), "BAD"),
        (request("Host: a.example", "no colon here"), "BAD"),
    ],
)
def test_http_without_a_name_or_refused(data: bytes, expected: str) -> None:
    verdict = sniff(data)
    assert kind(verdict) == expected, verdict
    assert kind(feed_in_steps(data, range(len(data)))[0]) == expected


def test_http_is_more_until_the_head_ends() -> None:
    data = request("Host: slow.example", "Accept: */*")
    verdict, before = feed_in_steps(data, range(len(data)))
    assert verdict.name == "slow.example"
    assert all(v.kind == MORE and v.at_least == i + 1 for i, v in enumerate(before))


def test_http_heads_are_bounded() -> None:
    head = request("Host: big.example", "X-Fill: ")
    fill = MAX_HEAD - len(head)
    exact = head.replace(b"X-Fill: ", b"X-Fill: " + b"f" * fill)
    assert len(exact) == MAX_HEAD
    assert sniff(exact).name == "big.example"
    over = head.replace(b"X-Fill: ", b"X-Fill: " + b"f" * (fill + 1))
    assert kind(sniff(over)) == "BAD"
    assert kind(feed_in_steps(over, range(0, len(over), 1000))[0]) == "BAD"
    endless = b"GET / HTTP/1.1\r\nX: " + b"x" * MAX_HEAD
    assert kind(sniff(endless[:MAX_HEAD])) == "BAD"  # no end in sight within the limit
    assert kind(sniff(endless[: MAX_HEAD - 1])) == "MORE"
    long_line = b"GET /" + b"p" * MAX_HEAD + b"\r\n"
    assert kind(sniff(long_line)) == "BAD"


# --- properties -----------------------------------------------------------------------

names = st.from_regex(
    r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)


@st.composite
def wires(draw: st.DrawFn) -> bytes:
    """A valid hello with a random name and shape, in randomly sized records."""
    sni = draw(st.one_of(st.none(), names.map(str.encode)))
    extensions = typical(
        sni,
        grease=draw(st.booleans()),
        post_quantum=draw(st.booleans()),
        ech=draw(st.booleans()),
    )
    extensions = draw(st.permutations(extensions))
    message = handshake(hello_body(extensions))
    sizes = draw(st.lists(st.integers(1, 2000), min_size=1, max_size=6))
    return records(message, sizes)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(wire=wires(), data=st.data())
def test_any_split_gives_the_one_shot_answer(wire: bytes, data: st.DataObject) -> None:
    whole = sniff(wire)
    assert whole.kind in (NAME, NO_NAME)
    cuts = data.draw(st.lists(st.integers(0, len(wire) - 1), max_size=12))
    verdict, before = feed_in_steps(wire, cuts)
    assert (verdict.kind, verdict.name) == (whole.kind, whole.name)
    assert all(v.kind == MORE for v in before)  # a partial hello never routes
    for cut in cuts:
        assert sniff(wire[:cut]).kind == MORE


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    wire=wires(),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    data=st.data(),
)
def test_broken_hellos_never_raise_and_split_agrees(
    wire: bytes, flips: list[tuple[int, int]], data: st.DataObject
) -> None:
    broken = bytearray(wire)
    for at, value in flips:
        broken[at % len(broken)] = value
    wire = bytes(broken)
    whole = sniff(wire)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    verdict, before = feed_in_steps(wire, cuts)
    if whole.kind != MORE:
        assert (verdict.kind, verdict.name) == (whole.kind, whole.name)
    for v in before:
        assert v.kind == MORE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_never_raise(data: bytes) -> None:
    for prefix in (b"", b"\x16\x03\x01", b"GET / HTTP/1.1\r\n"):
        verdict = sniff(prefix + data)
        assert verdict.kind in (MORE, NAME, NO_NAME, BAD)


# --- against the generator and a reference parse ------------------------------------

GREASES = [0x0A0A + 0x1010 * i for i in range(16)]  # RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA
label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9])?", fullmatch=True)
host_names = st.builds(
    lambda labels, dot: ".".join(labels) + dot,
    st.lists(label, min_size=1, max_size=6),
    st.sampled_from(["", "."]),
).filter(lambda name: len(name.rstrip(".")) <= 253)


class Reader:
    """Reads a TLS structure front to back; any length past the end raises (an
    invalid hello, which these tests never build)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        assert self.at + size <= len(self.data), "past the end"
        self.at += size
        return self.data[self.at - size : self.at]

    def number(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, width: int) -> bytes:
        """A vector with a `width`-byte length in front (RFC 8446 3.4)."""
        return self.take(self.number(width))

    def done(self) -> bool:
        return self.at == len(self.data)


def reference_sni(wire: bytes) -> str | None:
    """The host name a valid ClientHello at the start of `wire` asks for, lowercased, its
    trailing dot dropped; None if it has none. The plain reading of RFC 8446 (records, the
    handshake, the hello) and RFC 6066 (server_name): all the records first, then one
    pass, nothing shared with the sniffer, no limits, no incremental state."""
    message, at = b"", 0
    while len(message) < 4 or len(message) < 4 + int.from_bytes(message[1:4], "big"):
        kind, version, size = struct.unpack_from("!BHH", wire, at)
        assert kind == 0x16 and version >> 8 == 3
        message += wire[at + 5 : at + 5 + size]
        at += 5 + size
    hello = Reader(message)
    assert hello.number(1) == 1  # client_hello
    body = Reader(hello.vector(3))
    body.take(2 + 32)  # legacy_version, random
    body.vector(1), body.vector(2), body.vector(1)  # session id, cipher suites, compression
    if body.done():
        return None  # no extensions at all
    extensions = Reader(body.vector(2))
    assert body.done()
    found = None
    while not extensions.done():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind == 0:  # server_name: a list of (name type, name)
            outer = Reader(data)
            entries = Reader(outer.vector(2))
            assert outer.done()
            while not entries.done():
                name_type, name = entries.number(1), entries.vector(2)
                if name_type == 0:  # host_name
                    found = name
    if found is None:
        return None
    text = found.decode("ascii")
    return (text[:-1] if text.endswith(".") else text).lower()


@st.composite
def valid_hellos(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A valid ClientHello in random records, and the name its maker put in it (None:
    none). Random extensions (types, GREASE among them, sizes, order), a random
    server_name place and other name types around its host_name, random vectors before;
    the case and the trailing dot of the name random too."""
    sni = draw(st.one_of(st.none(), host_names))
    others = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(GREASES), st.integers(1, 0xFFFF)),
                st.binary(max_size=300),
            ),
            unique_by=lambda pair: pair[0],
            max_size=12,
        )
    )
    extensions = [extension(kind, data) for kind, data in others]
    other_names = st.tuples(st.integers(1, 255), st.binary(min_size=1, max_size=40))
    entries = draw(st.lists(other_names, max_size=2))
    if sni is not None:
        entries.insert(draw(st.integers(0, len(entries))), (0, sni.encode()))
    if entries and draw(st.booleans() if sni is None else st.just(True)):
        place = draw(st.integers(0, len(extensions)))
        extensions.insert(place, extension(0, server_name(*entries)))
    body = hello_body(
        None if sni is None and not extensions and draw(st.booleans()) else extensions,
        version=draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303])),
        session_id=draw(st.binary(max_size=32)),
        ciphers=draw(st.binary(min_size=1, max_size=40).map(lambda b: b * 2)),
        compression=draw(st.binary(min_size=1, max_size=4)),
    )
    version = draw(st.sampled_from([b"\x03\x01", b"\x03\x02", b"\x03\x03"]))
    sizes = draw(st.lists(st.integers(1, 3000), min_size=1, max_size=6))
    wire = records(handshake(body), sizes, version=version)
    expected = None if sni is None else (sni[:-1] if sni.endswith(".") else sni).lower()
    return wire, expected


@settings(max_examples=300, deadline=None)
@given(hello=valid_hellos())
def test_valid_hellos_name_what_their_maker_put_in_as_a_reference_parse_reads_it(
    hello: tuple[bytes, str | None],
) -> None:
    wire, expected = hello
    assert reference_sni(wire) == expected  # the reference reads what the maker wrote
    verdict = sniff(wire + b"\x17\x03\x03")  # what follows the hello is not read
    wanted = ("NO_NAME", "") if expected is None else ("NAME", expected)
    assert (kind(verdict), verdict.name) == wanted, verdict
    fed, _ = by_at_least(wire)
    assert (fed.kind, fed.name) == (verdict.kind, verdict.name)


@settings(max_examples=100, deadline=None)
@given(wire=wires())
def test_browser_shaped_hellos_agree_with_the_reference_parse(wire: bytes) -> None:
    verdict = sniff(wire)
    expected = reference_sni(wire)
    wanted = ("NO_NAME", "") if expected is None else ("NAME", expected)
    assert (kind(verdict), verdict.name) == wanted, verdict


# --- real clients ---------------------------------------------------------------------

CLIENT_TIMEOUT = 10.0  # seconds a client may take to send its first bytes


def capture(argv: list[str], listener: socket.socket) -> Verdict:
    """Run a client against `listener`; feed what it sends until an answer; stop it."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        listener.settimeout(CLIENT_TIMEOUT)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            sniffer, data = Sniffer(), b""
            deadline = time.monotonic() + CLIENT_TIMEOUT
            while time.monotonic() < deadline:
                chunk = conn.recv(65536)
                data += chunk
                verdict = sniffer.feed(data)
                if verdict.kind != MORE or not chunk:
                    return verdict
            return verdict
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def test_openssl_s_client(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    argv = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "S-Client.Example",
    ]
    verdict = capture(argv, listener)
    assert (kind(verdict), verdict.name) == ("NAME", "s-client.example")


def test_openssl_s_client_tls12_without_sni(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-noservername", "-tls1_2"]
    assert kind(capture(argv, listener)) == "NO_NAME"


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_curl(listener: socket.socket, scheme: str) -> None:
    port = listener.getsockname()[1]
    argv = [
        "curl", "--silent", "--max-time", str(CLIENT_TIMEOUT),
        "--resolve", f"curl.example:{port}:127.0.0.1", f"{scheme}://curl.example:{port}/",
    ]  # fmt: skip
    verdict = capture(argv, listener)
    assert (kind(verdict), verdict.name) == ("NAME", "curl.example")
