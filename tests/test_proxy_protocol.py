"""PROXY protocol: to targets (v1, v2) and from a balancer in front.

The backend parses the header with the same maintained library a real
backend might use, and answers with the client address it learned.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest
import trio
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from tcpproxy.config import AppConfig, Target
from tcpproxy.proxy_protocol import build_header
from tests.helpers import app, connect, free_ports, recv_all, running_tcpproxy, write_config
from tests.inproc import PORT, arrive, serve

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too


def announce_client(conn: socket.socket) -> None:
    """Read one PROXY header, reply with 'host:port' of the client it names, then echo."""
    data = b""
    while True:
        data += conn.recv(1)
        try:
            result = ProxyProtocolDetect().unpack(data)
            break
        except Exception:  # incomplete: read on
            if len(data) > 300:
                raise
    host, port = result.source  # type: ignore[attr-defined, misc]
    conn.sendall(f"{host}:{port}\n".encode())
    while chunk := conn.recv(65536):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_targets_learn_the_client_address(config_path, backends, version: str) -> None:
    target = backends("t", announce_client)
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], SendProxyProtocol=version)])
    with running_tcpproxy(config_path), connect(port) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(b"payload")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == f"127.0.0.1:{client_port}\n".encode() + b"payload"


def test_address_from_a_balancer_in_front_is_passed_on(config_path, backends) -> None:
    target = backends("t", announce_client)
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], AcceptProxyProtocol=True,
                                   SendProxyProtocol="v2")])  # fmt: skip
    with running_tcpproxy(config_path), connect(port) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 4444 80\r\nhello")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"203.0.113.7:4444\nhello"  # not one payload byte lost


def test_client_without_the_expected_header_is_closed(config_path, backends) -> None:
    target = backends("t")
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], AcceptProxyProtocol=True)])
    with running_tcpproxy(config_path) as proxy:
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:  # closed with its request unread: the kernel may answer with a reset
                assert recv_all(sock) == b""
            except ConnectionResetError:
                pass
        proxy.wait_for(r"no PROXY protocol header")
        assert target.accepted == 0


def test_malformed_v2_header_is_a_client_error(config_path, backends) -> None:
    target = backends("t")
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], AcceptProxyProtocol=True)])
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    with running_tcpproxy(config_path) as proxy:
        with connect(port) as sock:  # v2, TCP over IPv4, but 2 bytes of addresses
            sock.sendall(signature + b"\x21\x11\x00\x02ab")
            try:
                assert recv_all(sock) == b""
            except ConnectionResetError:
                pass
        proxy.wait_for(r"bad PROXY header")
    assert "internal error" not in proxy.output


# --- build_header: pure, no sockets -------------------------------------------------


def _unpack(version: str, header: bytes) -> tuple[tuple, tuple]:
    protocol = ProxyProtocolV2() if version == "v2" else ProxyProtocolV1()
    result = protocol.unpack(header)
    return result.source, result.dest  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("source", "destination", "family", "expected_source", "expected_destination"),
    [
        # Same family: as is.
        (("192.0.2.1", 5), ("198.51.100.2", 80), "TCP4", "192.0.2.1", "198.51.100.2"),
        (("2001:db8::7", 5, 0, 0), ("2001:db8::1", 80, 0, 0), "TCP6", "2001:db8::7", "2001:db8::1"),
        # An IPv4 client on a dual-stack socket: both ends are v4-mapped, so TCP4.
        (("::ffff:192.0.2.1", 5, 0, 0), ("::ffff:198.51.100.2", 80, 0, 0), "TCP4",
         "192.0.2.1", "198.51.100.2"),
        # Mixed: an IPv4 client (from a balancer's header) reached us over IPv6: the
        # IPv4 side is written v4-mapped, and the backend still learns the client.
        (("192.0.2.1", 5), ("2001:db8::1", 80, 0, 0), "TCP6", "::ffff:192.0.2.1", "2001:db8::1"),
        (("2001:db8::7", 5), ("198.51.100.2", 80), "TCP6", "2001:db8::7", "::ffff:198.51.100.2"),
        # Mixed, but the IPv6 side is v4-mapped: unmapped, so plain TCP4.
        (("192.0.2.1", 5), ("::ffff:198.51.100.2", 80, 0, 0), "TCP4", "192.0.2.1",
         "198.51.100.2"),
        # A link-local address's scope (%eth0) is not part of the address sent.
        (("fe80::1%lo", 5, 0, 1), ("fe80::2%lo", 80, 0, 1), "TCP6", "fe80::1", "fe80::2"),
    ],
)  # fmt: skip
def test_build_header_keeps_the_client_address(
    version: str,
    source: tuple,
    destination: tuple,
    family: str,
    expected_source: str,
    expected_destination: str,
) -> None:
    header = build_header(version, source, destination)
    if version == "v1":
        assert header.startswith(f"PROXY {family} ".encode())
    else:
        assert header[13] == (0x11 if family == "TCP4" else 0x21)  # family<<4 | STREAM
    (src_host, src_port), (dst_host, dst_port) = _unpack(version, header)
    assert (src_host, src_port) == (ipaddress.ip_address(expected_source), source[1])
    assert (dst_host, dst_port) == (ipaddress.ip_address(expected_destination), destination[1])


# --- a header read by the engine: byte by byte, and nothing after it --------------


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_header_in_pieces_leaves_the_payload_unread(version: str) -> None:
    """The client's address is taken from the header (our v1 header to the target
    names it) and the payload behind it reaches the target whole."""
    header = build_header(version, ("203.0.113.7", 4444), ("192.0.2.1", 80))
    listener = socket.socket()
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        target = Target("127.0.0.1", listener.getsockname()[1])
        app = AppConfig(
            "A", (PORT,), (target,), accept_proxy_protocol=True, send_proxy_protocol="v1"
        )
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app)
            with arrive(proxy, tcp=True) as client:
                for byte in header:  # one byte at a time, with pauses between
                    client.send(bytes([byte]))
                    await trio.sleep(0.001)
                client.send(b"payload")
                client.shutdown(socket.SHUT_WR)
                with trio.fail_after(5):
                    await trio.lowlevel.wait_readable(listener)
                served = listener.accept()[0]
                with served:
                    received = await trio.to_thread.run_sync(recv_all, served)
            nursery.cancel_scope.cancel()
    assert received.startswith(b"PROXY TCP4 203.0.113.7 127.0.0.1 4444 ")
    assert received.split(b"\r\n", 1)[1] == b"payload"


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"PROXY " + b"1" * 200, "longer than 107 bytes"),
        (b"GET / HTTP/1.0\r\n\r\n", "no PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIz\n" + b"\0" * 8, "no PROXY protocol header"),
        (b"PROX", "closed before a PROXY header"),
        (b"PROXY TCP4 nonsense\r\n", "bad PROXY header"),
    ],
)
async def test_a_bad_header_closes_the_client_and_says_why(sent: bytes, error: str, caplog) -> None:
    app = AppConfig("A", (PORT,), (Target("127.0.0.1", 9),), accept_proxy_protocol=True)
    async with trio.open_nursery() as nursery:
        proxy, _ = await serve(nursery, app)
        with caplog.at_level(logging.WARNING, logger="tcpproxy"), arrive(proxy) as client:
            client.sendall(sent)
            client.shutdown(socket.SHUT_WR)
            with trio.fail_after(5):  # closed (reset: it closed with our bytes unread)
                try:
                    assert await trio.to_thread.run_sync(client.recv, 1) == b""
                except ConnectionResetError:
                    pass
        nursery.cancel_scope.cancel()
    (line,) = [r.getMessage() for r in caplog.records if "app=A: " in r.getMessage()]
    assert error in line, line
