"""Admission: what a connection must pass before it may hold a target connection.

Per-app and per-source limits, the first-byte timeout, trusted PROXY-protocol
peers, and the cost of clients that send part of a header and stop; and
tcpproxy/admission.py itself, without sockets: each refusal, the slots, and
the one release that gives back everything a connection holds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tcpproxy.admission import Admission, Ticket
from tcpproxy.cli_common import FDS_PER_CONNECTION, FDS_RESERVED
from tcpproxy.config import AppConfig, Config, Strategy, Target
from tcpproxy.metrics import NullMetrics
from tcpproxy.warnlimit import WarnLimiter
from tests.helpers import (
    TIMEOUT,
    ProxyProcess,
    app,
    connect,
    echo,
    free_ports,
    recv_all,
    recv_line,
    running_tcpproxy,
    tcpproxy_argv,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

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


@pytest.mark.slow
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


def ended(metrics_port: int, app_name: str, reason: str) -> float:
    """tcpproxy_connections_ended_total for one app and reason, from /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        text = response.read().decode()
    labels = [f'app="{app_name}"', 'target="-"', f'reason="{reason}"']
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tcpproxy_connections_ended_total{") and all(
            label in line for label in labels
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def connect_from(source: str, port: int) -> socket.socket:
    """A client connection from another loopback address (all of 127/8 is local)."""
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_per_source_limit_resets_the_excess_of_one_address(config_path, backends) -> None:
    target = backends("t")
    port, metrics_port = free_ports(2)
    write_config(config_path, [app("A", [port], [target.address], MaxConnectionsPerSource=2)])
    with running_tcpproxy(config_path, "--metrics", f"127.0.0.1:{metrics_port}") as proxy:
        held = [connect_from("127.0.0.1", port) for _ in range(2)]
        try:
            for sock in held:
                assert recv_line(sock) == b"t\n"
            with pytest.raises(ConnectionResetError), connect_from("127.0.0.1", port) as extra:
                extra.recv(10)  # (the reset may even come before connect() returns)
            proxy.wait_for(r"app 'A': MaxConnectionsPerSource \(2\) reached for 127\.0\.0\.1")
            assert wait_until(lambda: ended(metrics_port, "A", "source-limit") == 1)
            with connect_from("127.0.0.2", port) as other:  # another address: its own count
                assert recv_line(other) == b"t\n"
            held.pop().close()
            assert wait_until(lambda: answers_from("127.0.0.1", port) == b"t\n")
        finally:
            for sock in held:
                sock.close()
    assert target.accepted == 4  # the reset connection never reached it


def answers_from(source: str, port: int) -> bytes:
    try:
        with connect_from(source, port) as sock:
            return recv_line(sock)
    except OSError:
        return b""


@pytest.mark.slow
def test_silent_client_is_closed_before_any_target_is_connected(config_path, backends) -> None:
    target = backends("t", echo)
    port, metrics_port = free_ports(2)
    write_config(config_path, [app("A", [port], [target.address], FirstByteTimeout=1)])
    with running_tcpproxy(config_path, "--metrics", f"127.0.0.1:{metrics_port}") as proxy:
        with connect(port) as silent:
            time.sleep(0.2)
            assert target.accepted == 0  # nothing sent yet: no backend connection held
            assert recv_all(silent) == b""  # closed by the proxy after 1 s
        proxy.wait_for(r"nothing received within FirstByteTimeout \(1 s\)")
        proxy.wait_for(r"end=first-byte-timeout")
        assert wait_until(lambda: ended(metrics_port, "A", "first-byte-timeout") == 1)
        assert target.accepted == 0
        with connect(port) as talker:  # a client that speaks is served as before
            time.sleep(0.2)  # (but not before it speaks)
            assert target.accepted == 0
            talker.sendall(b"hello")
            talker.shutdown(socket.SHUT_WR)
            assert recv_all(talker) == b"hello"
        assert target.accepted == 1


def test_first_byte_timeout_counts_after_the_proxy_header(config_path, backends) -> None:
    target = backends("t", echo)
    (port,) = free_ports(1)
    options = {"AcceptProxyProtocol": True, "FirstByteTimeout": 0.5}
    write_config(config_path, [app("A", [port], [target.address], **options)])
    with running_tcpproxy(config_path) as proxy:
        with connect(port) as silent:  # a header, then nothing
            silent.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 4444 80\r\n")
            assert recv_all(silent) == b""
        proxy.wait_for(r"client=203\.0\.113\.7:4444 .*nothing received within FirstByteTimeout")
        with connect(port) as talker:  # header and payload in one segment
            talker.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 4444 80\r\nhello")
            talker.shutdown(socket.SHUT_WR)
            assert recv_all(talker) == b"hello"
        assert target.accepted == 1


def test_proxy_header_from_an_untrusted_peer_is_refused(config_path, backends) -> None:
    target = backends("t", echo)
    port, trusting, metrics_port = free_ports(3)
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 4444 80\r\n"
    write_config(config_path, [
        app("A", [port], [target.address], AcceptProxyProtocol=True,
            TrustedProxies=["10.0.0.0/8", "127.0.0.2"]),
        app("B", [trusting], [target.address], AcceptProxyProtocol=True),  # default: loopback
    ])  # fmt: skip
    with running_tcpproxy(config_path, "--metrics", f"127.0.0.1:{metrics_port}") as proxy:
        for _ in range(20):
            # The reset may come first, even before connect() has read its outcome.
            with (
                pytest.raises((ConnectionResetError, BrokenPipeError)),
                connect_from("127.0.0.1", port) as sock,
            ):
                sock.sendall(header + b"hello")
                sock.recv(10)  # reset: its claim is not believed
        proxy.wait_for(r"app 'A': PROXY header from 127\.0\.0\.1 refused: not in TrustedProxies")
        assert proxy.output.count("not in TrustedProxies") == 1  # rate-limited
        assert wait_until(lambda: ended(metrics_port, "A", "untrusted-proxy") == 20)
        assert target.accepted == 0
        with connect_from("127.0.0.2", port) as sock:  # listed: believed
            sock.sendall(header + b"hello")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"hello"
        with connect_from("127.0.0.1", trusting) as sock:  # loopback, by default
            sock.sendall(header + b"hello")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"hello"


@pytest.mark.parametrize(
    ("prefix", "args", "app_limit", "silent"),
    [
        ((), ("--max-connections", "10"), 5, 12),  # half of 10: two apps
        # 400 descriptors allow (400 - FDS_RESERVED) // 6 connections (45 with the
        # metrics server's reserve): each app half of them
        (("prlimit", "--nofile=400:400"), (), (400 - FDS_RESERVED) // FDS_PER_CONNECTION // 2, 50),
    ],
    ids=["max-connections", "descriptor-limit"],
)
def test_an_apps_default_limit_is_a_share_of_the_global_one(
    config_path, backends, prefix: tuple[str, ...], args: tuple[str, ...], app_limit: int,
    silent: int,
) -> None:  # fmt: skip
    """Isolation: more silent clients on app a than the whole proxy takes do not
    leave app b without a slot; a's excess is reset, b is served."""
    a, b = backends("a"), backends("b")
    port_a, port_b = free_ports(2)
    write_config(config_path, [app("a", [port_a], [a.address]), app("b", [port_b], [b.address])])
    argv = [*prefix, *tcpproxy_argv(config_path, "--log-level", "debug", *args)]
    proxy = ProxyProcess(argv)
    try:
        proxy.wait_for(r"tcpproxy started")
        with contextlib.ExitStack() as held:
            for _ in range(silent):  # open sockets that never send
                with contextlib.suppress(ConnectionResetError):  # a's excess: may come first
                    held.enter_context(connect(port_a))
            with connect(port_b) as sock:  # times out if a's clients hold every slot
                assert recv_line(sock) == b"b\n"
            proxy.wait_for(
                rf"app 'a': MaxConnections \({app_limit}, a share of max-connections\) reached"
            )
        assert a.accepted <= app_limit
    finally:
        proxy.kill()


def test_max_connections_at_the_global_limit_is_warned_at_start_and_reload(
    config_path, backends
) -> None:
    target = backends("t")
    port_a, port_b = free_ports(2)
    apps = [app("a", [port_a], [target.address]), app("b", [port_b], [target.address])]
    apps[0]["MaxConnections"] = 10
    write_config(config_path, apps)
    warning = r"WARNING .*MaxConnections 10 gives app 'a' no isolation.*--max-connections \(10\)"
    with running_tcpproxy(config_path, "--max-connections", "10") as proxy:
        proxy.wait_for(warning)
        mark = proxy.mark()
        apps[1]["MaxConnections"] = 5  # a change elsewhere: a still isolates nothing
        write_config(config_path, apps)
        proxy.wait_for(r"reload \(file changed\).*applied", start=mark)
        proxy.wait_for(warning, start=mark)
        assert "gives app 'b'" not in proxy.output


# --- tcpproxy/admission.py without sockets ------------------------------------------

T0, T1 = Target("10.0.0.1", 80), Target("10.0.0.2", 80)
PEER = ("192.0.2.7", 40000)


class Refusals(NullMetrics):
    """Metrics that keep what was accepted and refused, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    def accepted(self, app: str) -> None:
        self.seen.append(("accepted", app))

    def rejected(self, app: str, reason: str) -> None:
        self.seen.append(("rejected", app, reason))


def admission_for(*apps: AppConfig, **options: Any) -> tuple[Admission, Refusals]:
    metrics = Refusals()
    options.setdefault("max_connections", 10)
    admission = Admission(metrics=metrics, **options)
    admission.apply(Config(apps=apps))
    return admission, metrics


def admitted(admission: Admission, port: int = 1, peer: tuple = PEER) -> Ticket:
    ticket = admission.admit(port, peer)
    assert isinstance(ticket, Ticket), ticket
    return ticket


def held(admission: Admission) -> tuple:
    """Everything connections hold: every count, and the slots taken."""
    return (
        admission.active_total, dict(admission.active_by_app), dict(admission.active_by_source),
        dict(admission.active), admission.max_connections - admission.free_slots,
    )  # fmt: skip


NOTHING_HELD = (0, {}, {}, {}, 0)


def test_a_ticket_holds_a_slot_and_every_count_and_its_release_gives_all_back() -> None:
    app = AppConfig("A", (1,), (T0, T1), max_connections_per_source=5)
    admission, metrics = admission_for(app, id_prefix="w1-")
    ticket = admitted(admission)
    assert (ticket.app.config, ticket.cid, ticket.source) == (app, "w1-1", ("A", "192.0.2.7"))
    ticket.claim(T0)
    assert held(admission) == (1, {"A": 1}, {("A", "192.0.2.7"): 1}, {T0: 1}, 1)
    ticket.release()
    assert held(admission) == NOTHING_HELD
    ticket.release()  # a second call changes nothing
    ticket.claim(T1)  # nor does a claim once released
    assert held(admission) == NOTHING_HELD
    assert metrics.seen == [("accepted", "A")]
    assert admitted(admission).cid == "w1-2"


def test_a_claim_counts_from_the_choice_and_moves_on_failover() -> None:
    """Least-connections sees a burst still connecting (balance rule 3)."""
    app = AppConfig("A", (1,), (T0, T1), strategy=Strategy.LEAST_CONNECTIONS)
    admission, _ = admission_for(app)
    tickets = [admitted(admission) for _ in range(4)]
    for ticket in tickets:  # each choice sees the ones before it
        ticket.claim(ticket.app.choose()[0])
    assert admission.active == Counter({T0: 2, T1: 2})
    tickets[0].claim(T1)  # its first choice failed: it now counts against the next
    assert admission.active == Counter({T0: 1, T1: 3})
    tickets[0].claim(Target("10.0.0.2", 80))  # the same target (equal, not identical)
    assert admission.active == Counter({T0: 1, T1: 3})
    for ticket in tickets:
        ticket.release()
    assert held(admission) == NOTHING_HELD  # bounded: no zero entries left behind


@pytest.mark.parametrize(
    ("app", "earlier", "peer", "reason"),
    [
        (AppConfig("A", (2,), (T0,)), 0, PEER, "no-route"),  # port 1 is no app's
        (
            AppConfig("A", (1,), (T0,), accept_proxy_protocol=True,
                      trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)),
            0, PEER, "untrusted-proxy",
        ),
        (AppConfig("A", (1,), (T0,), max_connections=2), 2, PEER, "over-limit"),
        (AppConfig("A", (1,), (T0,), max_connections_per_source=2), 2, PEER, "source-limit"),
    ],
)  # fmt: skip
def test_each_refusal_says_why_and_holds_nothing(
    app: AppConfig, earlier: int, peer: tuple, reason: str
) -> None:
    admission, metrics = admission_for(app)
    tickets = [admitted(admission) for _ in range(earlier)]
    before = held(admission)
    assert admission.admit(1, peer) == reason
    assert held(admission) == before
    assert metrics.seen[-1] == ("rejected", "-" if reason == "no-route" else "A", reason)
    for ticket in tickets:
        ticket.release()
    assert held(admission) == NOTHING_HELD


def test_trusted_proxies_and_sources_count_v4_mapped_clients_as_ipv4() -> None:
    app = AppConfig("A", (1,), (T0,), accept_proxy_protocol=True, max_connections_per_source=1)
    admission, _ = admission_for(app)
    assert admitted(admission, peer=("::ffff:127.0.0.1", 1)).source == ("A", "127.0.0.1")
    assert admission.admit(1, ("127.0.0.1", 2)) == "source-limit"  # the same client
    assert admitted(admission, peer=("127.0.0.2", 3)).source == ("A", "127.0.0.2")


def test_limits_are_shared_among_workers_and_an_apps_default_is_a_share() -> None:
    explicit = AppConfig("A", (1,), (T0,), max_connections=4)
    default = AppConfig("B", (2,), (T0,))
    admission, _ = admission_for(explicit, default, max_connections=10, share=2)
    assert [admission.admit(1, PEER) for _ in range(3)][2] == "over-limit"  # 4 / 2 workers
    # B: the whole proxy's 20 (10 x 2 workers) / 2 apps = 10, this worker's part 5
    assert [admission.admit(2, PEER) for _ in range(6)][5] == "over-limit"


def test_at_max_connections_there_is_no_slot_and_it_is_said_once(caplog) -> None:
    admission, _ = admission_for(AppConfig("A", (1,), (T0,)), max_connections=2)
    with caplog.at_level(logging.WARNING, logger="tcpproxy"):
        first, _second = admitted(admission), admitted(admission)
        assert not admission.has_slot()
        first.release()
        assert admission.has_slot()
        admitted(admission)
    assert [r.getMessage() for r in caplog.records] == [
        "max-connections (2) reached; new connections wait in the listen queue"
    ]  # the second time within LIMIT_LOG_INTERVAL: held back


def test_a_connection_routed_after_its_app_was_removed_is_still_admitted() -> None:
    """A port told apart by name routes late (InspectTimeout): a reload may remove the
    app between accept and routing; the connection is served by the router it was
    accepted with, as one routed at accept would have been."""
    a = AppConfig("A", (1,), (T0,), hostnames=("a.test",))
    admission, _ = admission_for(a)
    ticket = admission.arrive(1, PEER)
    assert isinstance(ticket, Ticket) and ticket.router.needs_bytes
    admission.apply(Config(apps=()))
    app = ticket.router.choose("a.test")
    assert app is not None and admission.admit_to(ticket, app) == ""
    ticket.release()
    assert held(admission) == (0, {}, {}, {}, 0)


def test_a_reload_keeps_what_admitted_connections_hold() -> None:
    """Apps unchanged keep their runtime; a connection of an app the reload removed
    still gives back what it holds."""
    a, b = AppConfig("A", (1,), (T0, T1)), AppConfig("B", (2,), (T1,))
    admission, _ = admission_for(a, b)
    runtime = admission.route(1)
    ticket = admitted(admission, port=2)
    ticket.claim(T1)
    admission.apply(Config(apps=(a,)))
    assert admission.route(1) is runtime and admission.route(2) is None
    assert held(admission) == (1, {"B": 1}, {}, {T1: 1}, 1)
    ticket.release()
    assert held(admission) == NOTHING_HELD


def test_a_router_chooses_exact_then_one_label_wildcard_then_the_default() -> None:
    shop = AppConfig("shop", (1,), (T0,), hostnames=("shop.test", "*.shop.test"))
    tenants = AppConfig("tenants", (1, 2), (T1,), hostnames=("*.test",))
    fallback = AppConfig("fallback", (1,), (T0,))
    alone = AppConfig("alone", (3,), (T0,))
    admission, _ = admission_for(shop, tenants, fallback, alone)
    router = admission.route(1)
    assert router is not None and router.needs_bytes
    pick = {name: getattr(router.choose(name), "config", None) for name in (
        "shop.test", "a.shop.test", "x.test", "a.b.c.test", "test", None)}  # fmt: skip
    assert pick == {
        "shop.test": shop, "a.shop.test": shop, "x.test": tenants,
        "a.b.c.test": fallback, "test": fallback, None: fallback,
    }  # fmt: skip
    assert router.names == ["shop.test", "*.shop.test", "*.test"]
    only_named = admission.route(2)  # one app, with names: inspected, no default
    assert only_named is not None and only_named.needs_bytes
    assert only_named.choose("y.test").config is tenants and only_named.choose("t") is None
    own = admission.route(3)  # one app without names: routed at once, from no byte
    assert own is not None and not own.needs_bytes and own.choose().config is alone
