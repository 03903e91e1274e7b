"""Admission: what a connection must pass before it may hold a target connection.

Per-app and per-source limits, the first-byte timeout, trusted PROXY-protocol
peers, and the cost of clients that send part of a header and stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator

from tcpproxy.proxy import WarnLimiter
from tests.helpers import TIMEOUT, app, connect, free_ports, running_tcpproxy, write_config

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


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


def test_many_bad_headers_log_few_lines(config_path, backends) -> None:
    target = backends("t")
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], AcceptProxyProtocol=True)])
    n = 200
    with running_tcpproxy(config_path) as proxy:
        for _ in range(n):
            with connect(port) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert wait_until(lambda: proxy.output.count("end=client-error") == n), proxy.output
        warnings = proxy.output.count("no PROXY protocol header")
        assert 1 <= warnings <= 2, proxy.output  # one per LIMIT_LOG_INTERVAL


def test_warn_limiter_logs_once_per_interval_and_counts_the_rest(caplog) -> None:
    now = [100.0]
    warn = WarnLimiter(interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tcpproxy"):
        assert warn("bad-header A", "bad header from %s", "x")
        for _ in range(5):
            assert not warn("bad-header A", "bad header from %s", "y")
        assert warn("bad-header B", "other app %s", "z")  # each key has its own budget
        now[0] += 10.5
        assert warn("bad-header A", "bad header from %s", "w")
        now[0] += 10.5
        assert warn("bad-header A", "bad header from %s", "v")
    assert [r.getMessage() for r in caplog.records] == [
        "bad header from x",
        "other app z",
        "bad header from w (5 more like this in the last 10 s not logged)",
        "bad header from v",
    ]
