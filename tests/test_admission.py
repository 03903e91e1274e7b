"""Admission: what a connection must pass before it may hold a target connection.

Per-app and per-source limits, the first-byte timeout, trusted PROXY-protocol
peers, and the cost of clients that send part of a header and stop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

from tests.helpers import app, connect, free_ports, running_tcpproxy, write_config

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


@contextlib.contextmanager
def clients(port: int, n: int, first: bytes = b"") -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = connect(port)
            if first:
                sock.sendall(first)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_partial_proxy_headers_cost_little_cpu(config_path, backends) -> None:
    target = backends("t")
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], AcceptProxyProtocol=True)])
    with running_tcpproxy(config_path) as proxy, clients(port, 250, b"PROXY "):
        time.sleep(0.5)  # all accepted and waiting for the rest of their header
        before = cpu_seconds(proxy.proc.pid)
        time.sleep(2.0)
        used = cpu_seconds(proxy.proc.pid) - before
        # Peeking every 10 ms costs about a core (~2 s in 2 s); waiting costs ~0.
        assert used < 0.5, f"{used:.2f} s of CPU in 2 s for 250 idle partial headers"
        assert target.accepted == 0
