"""Production behaviour under faults, for both binaries (`deployment` runs each).

Targets that drop SYNs, reset, or never answer; clients that reset or never
read; every target down; descriptor exhaustion; connection limits.
"""

from __future__ import annotations

import re
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.deploy import Deployment, deployment
from tests.helpers import TIMEOUT, app, echo, recv_all, recv_line, wait_until

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

__all__ = ["deployment"]

RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class Blackhole:
    """A listener whose accept queue is full: SYNs to it are dropped, connects hang."""

    def __init__(self, d: Deployment) -> None:
        self.sock = d.make_socket(socket.AF_INET)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            s = d.make_socket(socket.AF_INET)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.1)

    def close(self) -> None:
        for s in [*self.fillers, self.sock]:
            s.close()


@pytest.mark.slow
def test_syn_dropping_target_costs_one_connect_timeout(deployment: Deployment) -> None:
    d = deployment
    live = d.backend("live")
    hole = Blackhole(d)
    try:
        (port,) = d.ports(1)
        targets = [f"127.0.0.1:{hole.port}", live.address]
        proxy = d.start([app("A", [port], targets, ConnectTimeout=1)])
        for _ in range(12):
            assert d.which(port) == "live"
        assert wait_until(lambda: proxy.output.count("end=done") >= 12)
        waited = re.findall(r"failed-first=[^ (]+\([^)]*\)", proxy.output)
        # only the first paid, and the log says why
        assert waited == [f"failed-first=127.0.0.1:{hole.port}(no answer within 1s)"]
        assert "is down: no answer within 1s" in proxy.output
    finally:
        hole.close()


@pytest.mark.slow
def test_target_reset_mid_stream_ends_the_client_promptly(deployment: Deployment) -> None:
    d = deployment

    def reset_after_some(conn: socket.socket) -> None:
        conn.sendall(b"partial answer")
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        conn.close()

    target = d.backend("t", reset_after_some)
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [target.address])])
    with d.connect(port, timeout=5) as sock:
        assert sock.recv(100) == b"partial answer"
        sock.sendall(b"go")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    proxy.wait_for(r"end=target-error")


@pytest.mark.slow
def test_silent_target_is_ended_by_the_idle_timeout(deployment: Deployment) -> None:
    d = deployment
    silent = threading.Event()
    target = d.backend("t", lambda conn: silent.wait(TIMEOUT))
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [target.address], IdleTimeout=0.5)])
    with d.connect(port) as sock:
        sock.sendall(b"hello?")
        assert recv_all(sock) == b""  # closed by the proxy, not by the target
    proxy.wait_for(r"end=idle-timeout")
    silent.set()


@pytest.mark.slow
def test_client_that_never_sends_counts_as_idle(deployment: Deployment) -> None:
    d = deployment
    quiet = d.backend("t", lambda conn: conn.recv(10))
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [quiet.address], IdleTimeout=0.5)])
    with d.connect(port) as sock:
        assert recv_all(sock) == b""
    proxy.wait_for(r"end=idle-timeout")


@pytest.mark.slow
def test_300_client_resets_leak_no_descriptors(deployment: Deployment) -> None:
    d = deployment

    def stream(conn: socket.socket) -> None:
        block = b"x" * 65536
        while True:
            conn.sendall(block)

    target = d.backend("t", stream)
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [target.address])], "--log-level", "info")
    with d.connect(port) as warm:
        warm.recv(1000)
    time.sleep(0.2)
    before = d.fd_count()
    for _ in range(300):
        sock = d.connect(port)
        sock.recv(10000)  # mid-transfer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        sock.close()
    assert wait_until(lambda: d.fd_count() <= before), (before, d.fd_count())
    assert proxy.proc.poll() is None


@pytest.mark.slow
def test_client_that_never_reads_keeps_memory_bounded(deployment: Deployment) -> None:
    d = deployment
    received = []

    def sink_and_flood(conn: socket.socket) -> None:
        def flood() -> None:
            try:
                while True:
                    conn.sendall(b"y" * 65536)  # the client never reads this
            except OSError:
                pass

        threading.Thread(target=flood, daemon=True).start()
        total = 0
        while chunk := conn.recv(1 << 20):
            total += len(chunk)
        received.append(total)

    target = d.backend("t", sink_and_flood)
    (port,) = d.ports(1)
    d.start([app("A", [port], [target.address])], "--log-level", "info")
    rss_before = d.rss_kib()
    size = 256 * 1024 * 1024
    block = b"z" * (1 << 20)
    with d.connect(port, timeout=60) as sock:
        for _ in range(size // len(block)):
            sock.sendall(block)
        peak = d.rss_kib()
        sock.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: received == [size], timeout=30)
    growth_mib = (peak - rss_before) / 1024
    print(f"proxy RSS before {rss_before} KiB, after 256 MB: {peak} KiB")
    assert growth_mib < 16, growth_mib


def test_every_target_down_then_one_back(deployment: Deployment) -> None:
    d = deployment
    port, dead1, dead2 = d.ports(3)
    proxy = d.start([app("A", [port], [f"127.0.0.1:{dead1}", f"127.0.0.1:{dead2}"])])
    for _ in range(3):
        with d.connect(port) as sock:
            assert recv_all(sock) == b""  # closed at once: nothing to connect to
    proxy.wait_for(r"no target could be connected")
    d.backend("back", port=dead2)
    assert wait_until(lambda: _answers(d, port) == "back", timeout=15)
    proxy.wait_for(r"is up again")


def _answers(d: Deployment, port: int) -> str:
    try:
        return d.which(port)
    except OSError:
        return ""


def _answers_first(d: Deployment, port: int) -> str:
    """`_answers` for an app with a FirstByteTimeout: the client speaks first."""
    try:
        with d.connect(port) as sock:
            sock.sendall(b"hi\n")
            return recv_line(sock).decode().strip()
    except OSError:
        return ""


def test_app_connection_limit_resets_the_excess(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    port, other = d.ports(2)
    proxy = d.start([app("A", [port], [a.address], MaxConnections=2),
                     app("B", [other], [a.address])])  # fmt: skip
    held = [d.connect(port) for _ in range(2)]
    for s in held:
        assert recv_line(s) == b"a\n"
    with pytest.raises(ConnectionResetError), d.connect(port) as extra:
        extra.recv(10)  # (the reset may even come before connect() returns)
    assert d.which(other) == "a"  # other apps are not limited by A's limit
    proxy.wait_for(r"app 'A': MaxConnections \(2\) reached")
    held.pop().close()
    assert wait_until(lambda: _answers(d, port) == "a")
    for s in held:
        s.close()


@pytest.mark.slow
def test_process_connection_limit_queues_the_excess(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--max-connections", "2")
    held = [d.connect(port) for _ in range(2)]
    for s in held:
        assert recv_line(s) == b"a\n"
    waiting = d.connect(port)  # completes the handshake in the listen queue
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(10)  # not accepted yet
    proxy.wait_for(r"max-connections \(2\) reached")
    held.pop().close()
    waiting.settimeout(TIMEOUT)
    assert recv_line(waiting) == b"a\n"  # served once a slot freed
    for s in [*held, waiting]:
        s.close()


@pytest.mark.slow
def test_running_out_of_descriptors_pauses_accepting(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    limit = 48 if d.binary == "tcpproxy" else 80  # bcc's maps and program take some
    # Silent clients hold one descriptor each (no target before their first byte), so
    # it is accept() that runs out, whatever the parity of the descriptors in use.
    proxy = d.start([app("A", [port], [a.address], FirstByteTimeout=60)],
                    "--max-connections", "1000",
                    prefix=["prlimit", f"--nofile={limit}:{limit}"])  # fmt: skip
    held: list[socket.socket] = []
    try:
        while "Too many open files" not in proxy.output and len(held) < limit:
            s = d.connect(port)
            held.append(s)
            time.sleep(0.01)
        assert wait_until(lambda: "accept failed: Too many open files" in proxy.output)
        assert proxy.proc.poll() is None  # still running
        for s in held:
            s.close()
        held.clear()
        assert wait_until(lambda: _answers_first(d, port) == "a", timeout=15)
        proxy.wait_for(r"accepting again")
    finally:
        for s in held:
            s.close()


CONCURRENT_CLIENTS = 2000  # connections open at once in the concurrency test
# Descriptors the test process holds per client: the client socket and, since the
# backends run in this process, the backend's end of the proxied connection.
FDS_PER_CLIENT = 2
FD_MARGIN = 1000  # descriptors for everything else (pytest, backends' listeners, pipes)
CONCURRENT_DEADLINE = 30.0  # seconds for every client to connect, send and get its answer


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE for the test, restore it after.

    Debian's usual soft limit is 1024 (systemd's LimitNOFILE=1024:524288); the
    proxy raises its own, but the clients and backends live in this process.
    """
    need = FDS_PER_CLIENT * CONCURRENT_CLIENTS + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} descriptors; the hard limit (ulimit -Hn) is {hard}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_2000_concurrent_connections_with_a_third_of_targets_failing(
    many_descriptors: None, deployment: Deployment
) -> None:
    d = deployment
    live = [d.backend(f"live{i}", _quick_echo) for i in range(2)]
    (port, dead) = d.ports(2)
    targets = [live[0].address, f"127.0.0.1:{dead}", live[1].address]
    n = CONCURRENT_CLIENTS
    d.start([app("A", [port], targets, MaxConnections=n)], "--log-level", "info")
    deadline = time.monotonic() + CONCURRENT_DEADLINE

    def left() -> float:  # every socket operation gets what is left of the deadline
        return max(deadline - time.monotonic(), 0.001)

    socks: list[socket.socket] = []
    errors: list[str] = []
    try:
        for i in range(n):
            try:
                socks.append(d.connect(port, timeout=left()))
            except OSError as exc:
                errors.append(f"client {i} connect: {exc!r}")
        for i, s in enumerate(socks):
            try:
                s.settimeout(left())
                s.sendall(b"%d\n" % i)
            except OSError as exc:
                errors.append(f"client {i} send: {exc!r}")
        for i, s in enumerate(socks):
            try:
                s.settimeout(left())
                if (answer := recv_line(s)) != b"%d\n" % i:
                    errors.append(f"client {i} got {answer!r}")
            except OSError as exc:
                errors.append(f"client {i} recv: {exc!r}")
    finally:
        for s in socks:
            s.close()
    if errors:  # a short message: the count and the first few, not 2000 lines
        pytest.fail(
            f"{len(errors)} of {n} clients failed within {CONCURRENT_DEADLINE:.0f} s; first: "
            + "; ".join(errors[:3]),
            pytrace=False,
        )


def _quick_echo(conn: socket.socket) -> None:
    echo(conn)


@pytest.mark.slow
def test_active_health_checks_log_state_changes(deployment: Deployment) -> None:
    d = deployment
    (port, target_port) = d.ports(2)
    first = d.backend("t", port=target_port)
    check = {"Interval": 0.2, "Timeout": 0.5, "Rise": 2, "Fall": 2}
    proxy = d.start([app("A", [port], [first.address], HealthCheck=check)])
    first.close()
    proxy.wait_for(rf"target 127.0.0.1:{target_port} is down: connection refused.*health check")
    d.backend("t2", port=target_port)
    proxy.wait_for(rf"target 127.0.0.1:{target_port} is up again: 2 probe\(s\) succeeded")
    assert d.which(port) == "t2"


@pytest.mark.slow
def test_target_resetting_before_any_byte_is_retried_on_another(deployment: Deployment) -> None:
    d = deployment

    def reset_at_once(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        conn.close()

    flaky, good = d.backend("flaky", reset_at_once), d.backend("good")
    spare = d.backend("spare")  # must never be reached while "good" answers
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [flaky.address, good.address, spare.address])])
    # Server-speaks-first (as SMTP, SSH, MySQL): the client has sent nothing when
    # the reset comes, so nothing is lost by trying the next target.
    for _ in range(3):  # round-robin puts the flaky one first once in three
        with d.connect(port) as sock:
            assert recv_line(sock) in (b"good\n", b"spare\n")
            sock.sendall(b"bye")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock).endswith(b"bye")  # a clean end, not a reset
    assert wait_until(lambda: proxy.output.count("end=") == 3), proxy.output
    assert proxy.output.count("end=done") == 3
    assert spare.accepted == 1  # only its own turn: no extra connection after the redispatch
    assert re.search(rf"failed-first={re.escape(flaky.address)}\(connection reset", proxy.output)


@pytest.mark.slow
def test_idle_ports_do_not_hold_connection_slots(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    ports = d.ports(3)
    d.start([app("A", ports, [a.address])], "--max-connections", "2")
    for port in ports:  # one at a time: never more than one slot in use
        assert d.which(port) == "a"
