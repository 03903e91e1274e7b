"""Apps sharing a port, told apart by TLS SNI or HTTP Host: tcpproxy as a user runs it.

Real processes and sockets on loopback; hellos from tests/hellos.py. The
backends are named echoes: each announces its name, then echoes every byte,
so a test sees both which app took the connection and that the bytes the
proxy peeked reached it intact, exactly once and in order.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from pathlib import Path

import pytest

from tests import deploy, test_faults
from tests.deploy import Deployment
from tests.hellos import client_hello, records
from tests.helpers import (
    TIMEOUT,
    app,
    connect,
    free_port,
    recv_all,
    recv_line,
    running_tcpproxy,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow
deployment = deploy.deployment  # the fixture: each test using it runs on both binaries
many_descriptors = test_faults.many_descriptors  # the fixture: a soft RLIMIT_NOFILE of 5,000

INSPECT = 0.6  # seconds: the InspectTimeout of these tests' ports (short, for silent clients)
HALF_OPEN = 2000  # partial hellos held open at once
HALF_OPEN_INSPECT = 5.0  # seconds: their InspectTimeout, time enough to open them all
HALF_OPEN_KIB = 4  # KiB of proxy RSS each may cost at most (README's limits; measured: under 2)
STALL_CPU = 0.1  # seconds of CPU the proxy may use in a second while they all stall
TRICKLE_INSPECT = 1.0  # seconds: the InspectTimeout the trickler runs into
TRICKLE_PAUSE = 0.1  # seconds between the trickler's bytes: its hello takes ~30 s


def _shared(config_path: Path, backends, port: int, *, default: bool = True, **options) -> dict:
    """Three apps on `port`: a.test, *.w.test and (if `default`) the default."""
    made = {name: backends(name) for name in ("a", "w", "d")}
    apps = [
        app("A", [port], [made["a"].address], Hostnames=["a.test", "A2.Test."], **options),
        app("W", [port], [made["w"].address], Hostnames=["*.w.test"], **options),
    ]
    if default:
        apps.append(app("D", [port], [made["d"].address], **options))
    write_config(config_path, apps, Defaults={"InspectTimeout": INSPECT})
    return made


def _named_and_default(config_path: Path, backends, port: int, inspect: float) -> dict:
    """Two apps on `port`: a.test and the default, under InspectTimeout `inspect`."""
    made = {name: backends(name) for name in ("a", "d")}
    write_config(
        config_path,
        [
            app("A", [port], [made["a"].address], Hostnames=["a.test"]),
            app("D", [port], [made["d"].address]),
        ],
        Defaults={"InspectTimeout": inspect},
    )
    return made


def _through(port: int, parts: list[bytes], pause: float = 0.0) -> tuple[str, bytes]:
    """Send `parts` (one write each, `pause` apart), half-close; the backend's name and
    what it echoed."""
    with connect(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index, part in enumerate(parts):
            if index and pause:
                time.sleep(pause)
            sock.sendall(part)
        sock.shutdown(socket.SHUT_WR)
        name = recv_line(sock).decode().strip()
        return name, recv_all(sock)


def _hello(name: str, after: bytes = b"after the hello") -> bytes:
    return records(client_hello(name.encode())) + after


def test_tls_names_pick_their_apps_and_every_byte_reaches_it(config_path: Path, backends) -> None:
    port = free_port()
    _shared(config_path, backends, port)
    with running_tcpproxy(config_path):
        for asked, expected in [
            ("a.test", "a"),
            ("A.TEST.", "a"),  # case and a trailing dot do not matter
            ("a2.test", "a"),
            ("x.w.test", "w"),
            ("w.test", "d"),  # a wildcard is not its apex
            ("a.x.w.test", "d"),  # nor two labels
            ("unknown.test", "d"),
        ]:
            wire = _hello(asked)
            assert _through(port, [wire]) == (expected, wire), asked
        plain = b"SSH-2.0-OpenSSH_9.2\r\n"  # not TLS, not HTTP: the default
        assert _through(port, [plain]) == ("d", plain)
        no_sni = records(client_hello(None))
        assert _through(port, [no_sni]) == ("d", no_sni)


def test_http_host_picks_the_app(config_path: Path, backends) -> None:
    port = free_port()
    _shared(config_path, backends, port)
    with running_tcpproxy(config_path):
        for request, expected in [
            (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", "a"),
            (b"GET / HTTP/1.1\r\nhost: X.W.test:8080\r\n\r\nbody", "w"),
            (b"GET http://a.test/x HTTP/1.1\r\nHost: other.test\r\n\r\n", "a"),
            (b"GET / HTTP/1.0\r\n\r\n", "d"),  # no Host: the default
        ]:
            assert _through(port, [request]) == (expected, request), request


def test_a_hello_split_over_writes_and_records_is_routed_whole(config_path: Path, backends) -> None:
    port = free_port()
    _shared(config_path, backends, port)
    message = client_hello(b"x.w.test")
    assert len(message) > 1500  # a post-quantum key share: two segments
    with running_tcpproxy(config_path):
        wire = records(message) + b"early data"
        assert _through(port, [wire[:1000], wire[1000:]], pause=0.1) == ("w", wire)
        cut = records(message)[:3]  # inside the 5-byte record header
        wire = records(message)
        assert _through(port, [cut, wire[3:]], pause=0.1) == ("w", wire)
        wire = records(message, [3, 1, 700, 2])  # records cut inside the handshake header
        assert _through(port, [wire[:4], wire[4:9], wire[9:]], pause=0.05) == ("w", wire)
        big = records(client_hello(b"a.test", size=16 * 1024), 4096)  # the largest taken
        assert _through(port, [big[:9000], big[9000:]], pause=0.05) == ("a", big)
        small = records(client_hello(b"a.test", post_quantum=False, ech=False, grease=False), 1)
        one_byte = [small[i : i + 1] for i in range(len(small))]  # 1-byte records, 1-byte writes
        assert _through(port, one_byte) == ("a", small)


def test_a_silent_client_goes_to_the_default_a_partial_hello_is_closed(
    config_path: Path, backends
) -> None:
    port = free_port()
    made = _shared(config_path, backends, port)
    with running_tcpproxy(config_path):
        with connect(port) as sock:  # server speaks first: after InspectTimeout, the default
            assert recv_line(sock) == b"d\n"
        wire = _hello("a.test")
        with connect(port) as sock:
            sock.sendall(wire[:200])  # then nothing: never the default
            assert recv_all(sock) == b""
        assert made["a"].accepted == 0 and made["d"].accepted == 1


def test_a_slow_trickle_is_closed_at_the_deadline_never_routed_to_the_default(
    config_path: Path, backends
) -> None:
    """A hello sent a byte every 100 ms, never whole by InspectTimeout: closed then, not
    earlier, and neither its app nor the default ever sees it. A client silent alongside
    it, in the same window, does reach the default (which is there to be wrongly had)."""
    port = free_port()
    made = _named_and_default(config_path, backends, port, TRICKLE_INSPECT)
    wire = records(client_hello(b"a.test", post_quantum=False, ech=False, grease=False))
    with running_tcpproxy(config_path) as proxy, connect(port) as silent:
        with connect(port) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started, sent, closed_at = time.monotonic(), 0, None
            while closed_at is None and time.monotonic() - started < TRICKLE_INSPECT + TIMEOUT:
                try:
                    if select.select([sock], [], [], TRICKLE_PAUSE)[0]:
                        assert sock.recv(100) == b"", "routed: the backend spoke"
                        closed_at = time.monotonic() - started
                    else:
                        sock.sendall(wire[sent : sent + 1])
                        sent += 1
                except (ConnectionResetError, BrokenPipeError):  # closed with bytes in flight
                    closed_at = time.monotonic() - started
        assert closed_at is not None, f"still open after {sent} bytes"
        assert closed_at >= TRICKLE_INSPECT, f"closed after {closed_at:.2f} s, before the deadline"
        assert sent < len(wire)  # it never had a whole hello to route on
        proxy.wait_for(r"no complete hello or request within 1 s")
        assert recv_line(silent) == b"d\n"  # the silent one: the default, as it should
    assert made["a"].accepted == 0 and made["d"].accepted == 1


def _cpu_rss_fds(pid: int) -> tuple[float, int, int]:
    """The process's CPU seconds so far, its RSS in KiB, its open descriptors."""
    with open(f"/proc/{pid}/stat") as stat:
        utime, stime = stat.read().rsplit(")", 1)[1].split()[11:13]
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    cpu = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
    return cpu, rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_many_partial_hellos_cost_little_and_are_closed_at_the_deadline(
    many_descriptors: None, config_path: Path, backends
) -> None:
    """2,000 clients send part of a hello and stall: bounded memory, the proxy idle
    (SO_RCVLOWAT: level-triggered epoll would otherwise report the peeked bytes
    again and again), each closed at InspectTimeout, none to the default, and
    every descriptor given back."""
    port = free_port()
    made = _named_and_default(config_path, backends, port, HALF_OPEN_INSPECT)
    partial = _hello("a.test")[:1000]
    socks: list[socket.socket] = []
    with running_tcpproxy(config_path, "--log-level", "info") as proxy:
        pid = proxy.proc.pid
        _, rss_before, fds_before = _cpu_rss_fds(pid)
        started = time.monotonic()
        try:
            for _ in range(HALF_OPEN):
                socks.append(connect(port))
                socks[-1].sendall(partial)
            opened = time.monotonic() - started
            assert opened < HALF_OPEN_INSPECT / 2, f"{HALF_OPEN} clients took {opened:.1f} s"
            assert wait_until(lambda: _cpu_rss_fds(pid)[2] >= fds_before + HALF_OPEN)
            cpu, rss, _ = _cpu_rss_fds(pid)
            time.sleep(1.0)
            assert _cpu_rss_fds(pid)[0] - cpu < STALL_CPU, "busy while every client stalls"
            assert rss - rss_before < HALF_OPEN * HALF_OPEN_KIB, (rss_before, rss)
            for sock in socks:  # each closed cleanly at its deadline
                sock.settimeout(HALF_OPEN_INSPECT + TIMEOUT)
                assert sock.recv(100) == b""
        finally:
            for sock in socks:
                sock.close()
        assert wait_until(lambda: _cpu_rss_fds(pid)[2] == fds_before)
    assert sum(backend.accepted for backend in made.values()) == 0


def test_without_a_default_unknown_names_are_reset(config_path: Path, backends) -> None:
    port = free_port()
    made = _shared(config_path, backends, port, default=False)
    with running_tcpproxy(config_path) as proxy:
        assert _through(port, [_hello("a.test")])[0] == "a"
        with connect(port) as sock:
            sock.sendall(_hello("nobody.test"))
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        proxy.wait_for("no app for name 'nobody.test'")
    assert made["d"].accepted == 0


@pytest.mark.parametrize(
    "wire",
    [
        records(client_hello(b"a.test", size=17 * 1024), 4096),  # over 16 KiB
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: x.w.test\r\n\r\n",  # smuggling
    ],
    ids=["oversize", "empty-record", "two-hosts"],
)
def test_bad_hellos_are_closed_never_routed(config_path: Path, backends, wire: bytes) -> None:
    port = free_port()
    made = _shared(config_path, backends, port)
    with running_tcpproxy(config_path):
        with connect(port) as sock:
            sock.sendall(wire)
            try:
                assert recv_all(sock) == b""
            except ConnectionResetError:  # closed with our bytes unread
                pass
        assert _through(port, [_hello("a.test")])[0] == "a"  # still serving
    assert sum(backend.accepted for backend in made.values()) == 1


def test_a_reload_moves_a_name_for_new_connections(config_path: Path, backends) -> None:
    port = free_port()
    made = _shared(config_path, backends, port)
    with running_tcpproxy(config_path) as proxy:
        held = connect(port)
        held.sendall(_hello("a.test"))
        assert recv_line(held) == b"a\n"
        write_config(
            config_path,
            [
                app("A", [port], [made["a"].address], Hostnames=["other.test"]),
                app("W", [port], [made["w"].address], Hostnames=["*.w.test", "a.test"]),
                app("D", [port], [made["d"].address]),
            ],
            Defaults={"InspectTimeout": INSPECT},
        )
        wait_until(lambda: _through(port, [_hello("a.test")])[0] == "w")
        held.sendall(b"still here")  # the open connection kept its app
        assert held.recv(100).startswith(b"\x16")  # the hello's echo first
        held.close()
        proxy.stop()


def test_overlapping_names_are_refused_with_both_apps(config_path: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    port = free_port()
    write_config(
        config_path,
        [
            app("A", [port], ["127.0.0.1:1"], Hostnames=["a.test"]),
            app("B", [port], ["127.0.0.1:2"], Hostnames=["x.test", "A.test."]),
        ],
    )
    done = subprocess.run(
        [sys.executable, "-m", "tcpproxy", "--config", str(config_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Apps[1].Hostnames[1]: hostname 'a.test' on port" in done.stderr
    assert "app 'A' (Apps[0].Hostnames[0]) and app 'B'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", [None, "2"])
def test_both_binaries_route_by_name(deployment: Deployment, workers: str | None) -> None:
    """bpfproxy's steering is unchanged (the port into the map); the app is chosen after
    the peek, in every worker."""
    a, w, d = (deployment.backend(name) for name in ("a", "w", "d"))
    port, other = deployment.ports(2)
    deployment.start(
        [
            app("A", [port], [a.address], Hostnames=["a.test"]),
            app("W", [port, other], [w.address], Hostnames=["*.w.test"]),
            app("D", [port], [d.address]),
        ],
        *(["--workers", workers] if workers else []),
        Defaults={"InspectTimeout": INSPECT},
    )
    for asked, expected in [("a.test", "a"), ("x.w.test", "w"), ("b.test", "d")]:
        wire = _hello(asked)
        assert deployment.exchange(port, wire) == f"{expected}\n".encode() + wire
    request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert deployment.exchange(port, request) == b"a\n" + request
    with deployment.connect(other) as sock:  # W alone there, with a name: no default
        sock.sendall(_hello("a.test"))
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    assert deployment.exchange(other, _hello("y.w.test")).startswith(b"w\n")


def test_proxy_headers_metrics_status_and_the_log_line(deployment: Deployment) -> None:
    """A PROXY header comes before the hello; ours goes out as the target opens; each
    routing is counted by how, each refusal by reason; /status shows the names."""
    from tests.test_metrics import scrape, value

    seen: list[bytes] = []

    def header_then_echo(conn: socket.socket) -> None:
        head = recv_line(conn)  # our PROXY v1 header
        seen.append(head)
        conn.sendall(b"a\n")
        while data := conn.recv(65536):
            conn.sendall(data)

    a, d = deployment.backend("a", header_then_echo), deployment.backend("d")
    port, metrics_port = deployment.ports(2)
    shared = {"AcceptProxyProtocol": True}
    proxy = deployment.start(
        [
            app("A", [port], [a.address], Hostnames=["a.test"], SendProxyProtocol="v1", **shared),
            app("D", [port], [d.address], **shared),
        ],
        "--metrics", f"127.0.0.1:{metrics_port}",
        Defaults={"InspectTimeout": INSPECT},
    )  # fmt: skip
    wire = _hello("a.test")
    balancer = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n"
    assert deployment.exchange(port, balancer + wire) == b"a\n" + wire
    assert seen[0].startswith(b"PROXY TCP4 192.0.2.7 ")  # the client the balancer named
    assert deployment.exchange(port, balancer + _hello("b.test")).startswith(b"d\n")
    with deployment.connect(port) as sock:
        sock.sendall(balancer + b"\x16\x03\x01\x00\x00")  # an empty record: malformed
        try:
            assert recv_all(sock) == b""
        except ConnectionResetError:
            pass
    proxy.wait_for(r"app=A target=\S+ up=\d+ down=\d+ .* name=a\.test")
    text = scrape(deployment, metrics_port)
    assert value(text, "tcpproxy_connections_routed_total", app="A", by="name") == 1
    assert value(text, "tcpproxy_connections_routed_total", app="D", by="default") == 1
    assert value(text, "tcpproxy_connections_ended_total", app="-", reason="malformed") == 1
    status = json.loads(scrape(deployment, metrics_port, "/status"))
    assert status["apps"][0]["hostnames"] == ["a.test"] and "hostnames" not in status["apps"][1]
    assert status["routed_by_name"] == [
        {"ports": str(port), "names": {"a.test": "A"}, "default": "D"}
    ]


def test_an_upgrade_keeps_routing_by_name_and_finishes_a_hello_in_flight(
    config_path: Path, backends, tmp_path: Path
) -> None:
    """SIGUSR2: the new process routes by name; a client the old one was inspecting
    (half its hello sent) is routed by the old one when the rest comes."""
    from tests.test_upgrade import proxy_with_pid_file, upgrade

    port = free_port()
    _shared(config_path, backends, port)
    pid_file = tmp_path / "tcpproxy.pid"
    with proxy_with_pid_file(config_path, pid_file, "--log-level", "debug") as proxy:
        proxy.wait_for(r"tcpproxy started")
        assert _through(port, [_hello("a.test")])[0] == "a"
        wire = _hello("x.w.test")
        held = connect(port)
        held.sendall(wire[:100])
        upgrade(proxy, pid_file)
        held.sendall(wire[100:])
        held.shutdown(socket.SHUT_WR)
        assert recv_line(held) == b"w\n" and recv_all(held) == wire
        held.close()
        for asked, expected in [("a.test", "a"), ("y.w.test", "w"), ("other.test", "d")]:
            assert _through(port, [_hello(asked)])[0] == expected
