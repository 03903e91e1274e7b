"""PROXY protocol: to targets (v1, v2) and from a balancer in front.

The backend parses the header with the same maintained library a real
backend might use, and answers with the client address it learned.
"""

from __future__ import annotations

import socket

import pytest
from proxyprotocol.detect import ProxyProtocolDetect

from tests.helpers import app, connect, free_ports, recv_all, running_tcpproxy, write_config


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
