"""Real sk_lookup steering, each test inside its own network namespace.

Nothing here steers this machine's own ports: listeners, clients and the BPF
link all live in a throw-away namespace (tests/netns.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bpfproxy.loader as loader_module
from bpfproxy import bpfsys
from bpfproxy.dispatcher import Dispatcher
from bpfproxy.errors import SteeringError
from bpfproxy.loader import COUNTERS, DROP_REASONS, check_environment, compile_check
from tests.netns import NetNS, netns_fixture, requires_bpf

__all__ = ["netns_fixture"]  # re-exported so pytest registers the "netns" fixture here

pytestmark = [pytest.mark.bpf, requires_bpf, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bpf" / "sk_lookup.c"
LISTEN_PORT = 8000


# --------------------------------------------------------------------------- helpers


def dual_stack_listener(ns: NetNS, port: int = LISTEN_PORT) -> socket.socket:
    """A listener on [::]:port taking IPv4 and IPv6, inside the namespace."""
    listener = ns.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", port))
    listener.listen(1024)
    listener.settimeout(5)
    return listener


def ipv4_listener(ns: NetNS, port: int = LISTEN_PORT) -> socket.socket:
    listener = ns.socket(socket.AF_INET)
    listener.bind(("0.0.0.0", port))
    listener.listen(1024)
    listener.settimeout(5)
    return listener


def connect(ns: NetNS, host: str, port: int, timeout: float = 3.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    client = ns.socket(family)
    client.settimeout(timeout)
    try:
        client.connect((host, port))
    except BaseException:
        client.close()
        raise
    return client


def assert_steered(ns: NetNS, listener: socket.socket, host: str, port: int) -> None:
    """A connection to host:port is accepted by ``listener``, which sees ``port`` dialled."""
    with connect(ns, host, port) as client:
        accepted, peer = listener.accept()
        with accepted:
            assert accepted.getsockname()[1] == port
            assert peer[1] == client.getsockname()[1]
            client.sendall(b"ping")
            assert accepted.recv(4) == b"ping"


def assert_refused(ns: NetNS, host: str, port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        connect(ns, host, port).close()


def wait_until_refused(ns: NetNS, host: str, port: int, deadline: float) -> None:
    while True:
        try:
            connect(ns, host, port, timeout=1.0).close()
        except ConnectionRefusedError:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{host}:{port} still accepts connections")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After each test (and after its namespace is gone): no test namespace remains."""
    yield
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    ours = [line for line in listed.stdout.splitlines() if f"bpfproxy-test-{os.getpid()}-" in line]
    assert ours == [], f"namespaces left behind: {ours}"


# --------------------------------------------------------------------------- tests


def test_compile_check() -> None:
    compile_check()


def test_steers_configured_ports_to_the_listener(netns: NetNS) -> None:
    with dual_stack_listener(netns) as listener, Dispatcher(listener) as dispatcher:
        added, removed = dispatcher.set_ports({7001, 7002})
        assert (added, removed) == ({7001, 7002}, frozenset())
        assert dispatcher.ports == {7001, 7002}

        assert_steered(netns, listener, "127.0.0.1", 7001)
        assert_steered(netns, listener, "127.0.0.1", 7002)
        assert_steered(netns, listener, "127.0.0.1", LISTEN_PORT)  # its own port, as usual
        assert_refused(netns, "127.0.0.1", 7003)

        assert dispatcher.set_ports({7001}) == (frozenset(), {7002})
        assert_refused(netns, "127.0.0.1", 7002)
        assert_steered(netns, listener, "127.0.0.1", 7001)

        assert dispatcher.drop_counts() == dict.fromkeys(DROP_REASONS, 0)


def test_ipv6_loopback(netns: NetNS) -> None:
    with dual_stack_listener(netns) as listener, Dispatcher(listener) as dispatcher:
        dispatcher.set_ports({7001, 7002})
        assert_steered(netns, listener, "::1", 7001)
        assert_steered(netns, listener, "::1", 7002)
        assert_refused(netns, "::1", 7003)


def test_ipv4_only_listener_passes_ipv6_to_the_normal_lookup(netns: NetNS) -> None:
    with ipv4_listener(netns) as listener, Dispatcher(listener) as dispatcher:
        dispatcher.set_ports({7001})
        assert_steered(netns, listener, "127.0.0.1", 7001)
        # bpf_sk_assign() says -EAFNOSUPPORT: passed on, nothing bound there, so refused.
        assert_refused(netns, "::1", 7001)
        counts = dispatcher.counters()
        assert counts["family_mismatch"] >= 1
        assert dispatcher.drop_counts() == dict.fromkeys(DROP_REASONS, 0)
        assert set(counts) == set(COUNTERS)


def test_steering_wins_over_a_bound_socket_until_close(netns: NetNS) -> None:
    with dual_stack_listener(netns) as listener, ipv4_listener(netns, 7001) as bystander:
        dispatcher = Dispatcher(listener)
        try:
            dispatcher.set_ports({7001, 7002})
            assert dispatcher.attached
            assert_steered(netns, listener, "127.0.0.1", 7001)  # not the bystander
        finally:
            dispatcher.close()
        dispatcher.close()  # idempotent
        assert not dispatcher.attached
        assert dispatcher.ports == frozenset()
        with pytest.raises(ValueError):
            dispatcher.set_ports({7001})

        assert_refused(netns, "127.0.0.1", 7002)
        assert_refused(netns, "::1", 7001)
        assert_steered(netns, bystander, "127.0.0.1", 7001)  # normal lookup again


def test_closed_listener_refuses_and_counts(netns: NetNS) -> None:
    listener = dual_stack_listener(netns)
    with Dispatcher(listener) as dispatcher:
        dispatcher.set_ports({7001})
        listener.close()  # the kernel takes it out of the sockmap
        assert_refused(netns, "127.0.0.1", 7001)
        assert dispatcher.drop_counts()["no_listener"] >= 1


def test_not_attached_does_not_steer(netns: NetNS) -> None:
    with dual_stack_listener(netns) as listener, Dispatcher(listener, attach=False) as dispatcher:
        assert not dispatcher.attached
        dispatcher.set_ports({7001})
        assert_refused(netns, "127.0.0.1", 7001)


def test_rejects_a_socket_that_is_not_listening(netns: NetNS) -> None:
    with netns.socket(socket.AF_INET6) as sock:
        sock.bind(("::", LISTEN_PORT))
        with pytest.raises(ValueError):
            Dispatcher(sock)


def test_set_ports_validates_and_diffs(netns: NetNS) -> None:
    with dual_stack_listener(netns) as listener, Dispatcher(listener) as dispatcher:
        assert dispatcher.set_ports([7001, 7002, 7002]) == ({7001, 7002}, frozenset())
        assert dispatcher.set_ports(iter([7002, 7001])) == (frozenset(), frozenset())
        for bad in (0, 65536, -1, "7003", True, 7003.0):
            with pytest.raises(ValueError):
                dispatcher.set_ports([7001, bad])
        assert dispatcher.ports == {7001, 7002}
        assert dispatcher.set_ports([7002, 7003]) == ({7003}, {7001})
        assert dispatcher.set_ports([]) == (frozenset(), {7002, 7003})
        assert_refused(netns, "127.0.0.1", 7003)


def test_a_thousand_ports(netns: NetNS) -> None:
    ports = range(20000, 21000)
    with dual_stack_listener(netns) as listener, Dispatcher(listener) as dispatcher:
        dispatcher.set_ports(ports)
        assert dispatcher.ports == set(ports)
        sample = [ports[0], ports[-1], *random.Random(1).sample(ports, 30)]
        for port in sample:
            host = "::1" if port % 2 else "127.0.0.1"
            assert_steered(netns, listener, host, port)
        assert_refused(netns, "127.0.0.1", ports[-1] + 1)
        assert_refused(netns, "127.0.0.1", ports[0] - 1)


def test_bulk_updates(netns: NetNS) -> None:
    """20,000 ports, then a diff replacing 10,000 of them; timings printed (run with -s)."""
    with dual_stack_listener(netns) as listener, Dispatcher(listener) as dispatcher:
        start = time.perf_counter()
        added, _ = dispatcher.set_ports(range(10000, 30000))
        first = time.perf_counter() - start
        start = time.perf_counter()
        added2, removed2 = dispatcher.set_ports(range(20000, 40000))
        second = time.perf_counter() - start
        print(f"\nset_ports: 20,000 new in {first * 1e3:.1f} ms; 10,000 replaced in "
              f"{second * 1e3:.1f} ms")  # fmt: skip
        assert (len(added), len(added2), len(removed2)) == (20000, 10000, 10000)
        assert_refused(netns, "127.0.0.1", 10000)
        assert_steered(netns, listener, "127.0.0.1", 39999)


# --------------------------------------------------------------------------- bind address

# The veth pair between the test's namespace (A, where the listener is) and a
# second one (B, a host elsewhere on the network).
A_V4, B_V4 = "10.99.0.1", "10.99.0.2"
A_V6, B_V6 = "fd99::1", "fd99::2"


@pytest.fixture
def peer(netns: NetNS) -> Iterator[NetNS]:
    """Namespace B, linked to ``netns`` (A) by a veth pair: A has A_V4/A_V6, B has B_V4/B_V6."""
    with NetNS() as other:
        netns.veth(other, (f"{A_V4}/24", f"{A_V6}/64"), (f"{B_V4}/24", f"{B_V6}/64"))
        yield other


def bound_listener(ns: NetNS, host: str) -> socket.socket:
    """A listener on host:LISTEN_PORT inside ``ns``; "::" is dual-stack."""
    if host == "::":
        return dual_stack_listener(ns)
    listener = ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, LISTEN_PORT))
    listener.listen(1024)
    listener.settimeout(5)
    return listener


# (bind address, [(client namespace, destination)] steered, [...] refused)
BIND_CASES = [
    ("127.0.0.1", [("A", "127.0.0.1")], [("B", A_V4), ("A", A_V4), ("A", "::1"), ("B", A_V6)]),
    (A_V4, [("B", A_V4), ("A", A_V4)], [("A", "127.0.0.1"), ("B", A_V6), ("A", "::1")]),
    ("::1", [("A", "::1")], [("B", A_V6), ("A", A_V6), ("A", "127.0.0.1"), ("B", A_V4)]),
    (A_V6, [("B", A_V6), ("A", A_V6)], [("A", "::1"), ("B", A_V4), ("A", "127.0.0.1")]),
    ("::ffff:127.0.0.1", [("A", "127.0.0.1")], [("A", "::1"), ("B", A_V4)]),
    ("::", [("B", A_V4), ("B", A_V6), ("A", "127.0.0.1"), ("A", "::1")], []),
    ("0.0.0.0", [("B", A_V4), ("A", "127.0.0.1")], []),
]


@pytest.mark.slow
@pytest.mark.parametrize(("bind", "steered", "refused"), BIND_CASES, ids=[c[0] for c in BIND_CASES])
def test_steers_only_connections_to_the_listeners_address(
    netns: NetNS, peer: NetNS, bind: str, steered: list, refused: list
) -> None:
    where = {"A": netns, "B": peer}
    with bound_listener(netns, bind) as listener, Dispatcher(listener) as dispatcher:
        dispatcher.set_ports({7001})
        for client, host in steered:
            assert_steered(where[client], listener, host, 7001)
        for client, host in refused:
            assert_refused(where[client], host, 7001)
        counts = dispatcher.counters()
        # Each refused SYN was answered by one RST (nobody else listens): one lookup each.
        assert counts["not_bind_address"] == len(refused)
        assert dispatcher.drop_counts() == dict.fromkeys(DROP_REASONS, 0)


def test_wildcard_ipv4_listener_still_passes_ipv6_as_a_family_mismatch(
    netns: NetNS, peer: NetNS
) -> None:
    with bound_listener(netns, "0.0.0.0") as listener, Dispatcher(listener) as dispatcher:
        dispatcher.set_ports({7001})
        assert_refused(peer, A_V6, 7001)
        counts = dispatcher.counters()
        assert (counts["family_mismatch"], counts["not_bind_address"]) == (1, 0)


def test_set_listener_must_keep_the_bound_address(netns: NetNS) -> None:
    with bound_listener(netns, "127.0.0.1") as first, Dispatcher(first) as dispatcher:
        with bound_listener(netns, "::1") as other, pytest.raises(ValueError, match=r"::1"):
            dispatcher.set_listener(other)
        dispatcher.set_ports({7001})
        assert_steered(netns, first, "127.0.0.1", 7001)


CHILD = textwrap.dedent(
    f"""
    import socket, time
    from bpfproxy.dispatcher import Dispatcher

    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", {LISTEN_PORT}))
    listener.listen(16)
    dispatcher = Dispatcher(listener)
    dispatcher.set_ports([7001])
    print("READY", flush=True)
    time.sleep(120)
    """
)


def read_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return b""
    return process.stdout.readline()


def test_sigkilled_owner_releases_steering(netns: NetNS) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = netns.popen(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    line = read_line(child, timeout=30)
    if line.strip() != b"READY":
        child.kill()
        _, err = child.communicate(timeout=10)
        pytest.fail(f"child did not get ready: {line!r} {err.decode(errors='replace')}")

    # Steered into the child's listener (the handshake completes in its backlog).
    connect(netns, "127.0.0.1", 7001).close()

    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with contextlib.suppress(Exception):
        child.stdout.close()  # type: ignore[union-attr]
        child.stderr.close()  # type: ignore[union-attr]

    wait_until_refused(netns, "127.0.0.1", 7001, deadline=time.monotonic() + 5)
    # Refused could also be a surviving program dropping (no listener); a plain
    # socket bound to the port receiving the connection shows the link is gone.
    with ipv4_listener(netns, 7001) as plain:
        assert_steered(netns, plain, "127.0.0.1", 7001)
    assert netns.pids() == []


# --------------------------------------------------------------------------- failures


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        ("map_update_elem", errno.EOPNOTSUPP, "sockmap"),
        ("link_create", errno.EINVAL, "cannot attach sk_lookup programs"),
        ("link_create", errno.EPERM, "sudo"),
    ],
)
def test_failed_setup_is_undone(
    netns: NetNS, monkeypatch: pytest.MonkeyPatch, step: str, error: int, message: str
) -> None:
    with dual_stack_listener(netns) as listener:
        Dispatcher(listener).close()  # let bcc open whatever it keeps for the process
        before = open_fds()

        def fail(*args: object) -> None:
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(bpfsys, step, fail)
        with pytest.raises(SteeringError, match=message):
            Dispatcher(listener)
        assert open_fds() == before


def test_compile_error_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "sk_lookup.c"
    broken.write_text(SOURCE.read_text().replace("return SK_PASS;", "return SK_PASS"))
    monkeypatch.setattr(loader_module, "_source_path", lambda: broken)
    with pytest.raises(SteeringError) as caught:
        compile_check()
    message = str(caught.value)
    first_error = next(
        number for number, line in enumerate(SOURCE.read_text().splitlines(), 1)
        if "return SK_PASS;" in line
    )  # fmt: skip
    # The diagnostics name the real file and line, and start with the first error.
    assert message.splitlines()[1].startswith(f"{broken}:{first_error}:"), message
    assert "expected ';'" in message.splitlines()[1]
    assert "/virtual/" not in message and "<text>" not in message


def test_verifier_rejection_includes_the_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    leaky = tmp_path / "sk_lookup.c"
    leaky.write_text(SOURCE.read_text().replace("bpf_sk_release(sk);", ""))
    monkeypatch.setattr(loader_module, "_source_path", lambda: leaky)
    with pytest.raises(SteeringError) as caught:
        compile_check()
    # The verifier's reason comes first, then the log that leads to it.
    first_line, *log = str(caught.value).splitlines()
    assert "verifier rejected" in first_line and "Unreleased reference" in first_line
    assert any(line.startswith("processed ") for line in log)


def test_environment_problems_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    check_environment()  # this machine is fine

    with monkeypatch.context() as patch:
        patch.setattr(loader_module, "_kernel_version", lambda release: (5, 4))
        with pytest.raises(SteeringError, match=r"needs 5\.9"):
            check_environment()
    with monkeypatch.context() as patch:
        patch.setattr(loader_module, "_effective_caps", lambda: 1 << 12)  # NET_ADMIN only
        with pytest.raises(SteeringError, match="run it with sudo"):
            check_environment()
        # In a container: the docker run options, and sudo only for outside one.
        patch.setattr(loader_module, "_container_evidence", lambda: "/.dockerenv")
        with pytest.raises(SteeringError, match=r"container \(/\.dockerenv\).*--cap-add BPF "
                           r"--cap-add NET_ADMIN \(--cap-add SYS_ADMIN --cap-add NET_ADMIN "
                           r"on Docker before 23\)"):  # fmt: skip
            check_environment()
    with monkeypatch.context() as patch:  # no headers for this kernel, in a container
        patch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "6.18.0-none", "", "")))
        patch.setattr(loader_module, "_container_evidence", lambda: "/.dockerenv")
        with pytest.raises(SteeringError, match=r"headers for 6\.18\.0-none are missing.*"
                           r"run `sudo make setup` on the host, then mount"):  # fmt: skip
            check_environment()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bcc", None)  # import bcc -> ImportError
        with pytest.raises(SteeringError, match=r"python3-bpfcc.*system-site-packages"):
            check_environment()


# --------------------------------------------------------------------------- upgrade hand-over


def test_handed_over_descriptors_steer_and_a_failed_upgrade_is_undone(netns: NetNS) -> None:
    """A Dispatcher adopted from duplicates of the old one's descriptors (what an
    upgrade sends) diffs the same map, steering to the same listener; if that new
    process then fails, the old frontend brings the map and the hold flag back."""
    from bpfproxy.handover import adopt, state_fds
    from bpfproxy.steered import SteeredListener
    from tcpproxy.config import parse_config

    def config(*ports: int) -> object:
        apps = [{"Name": "A", "Ports": list(ports), "Targets": ["127.0.0.1:9"]}]
        return parse_config(json.dumps({"Apps": apps}))

    with dual_stack_listener(netns) as listener, Dispatcher(listener) as old:
        frontend = SteeredListener(listener, old, LISTEN_PORT)
        frontend.steer(config(7001, 7002))  # type: ignore[arg-type]
        old.set_hold(True)
        sent = {name: os.dup(fd) for name, fd in state_fds(old, None).items()}
        pins, new = adopt(sent, listener, "/nonexistent", "unused")
        assert pins is None
        with new:
            assert new.ports == {7001, 7002}  # read from the map, not told
            assert new.set_ports({7003}) == ({7003}, {7001, 7002})
            new.set_hold(False)
            assert_steered(netns, listener, "127.0.0.1", 7003)
        assert_steered(netns, listener, "127.0.0.1", 7003)  # the old one's link still holds it
        frontend.upgraded(False)
        assert old.ports == {7001, 7002}
        assert_steered(netns, listener, "127.0.0.1", 7001)
        assert_steered(netns, listener, "127.0.0.1", 7002)
        assert_refused(netns, "127.0.0.1", 7003)
        old.resync()
        assert old.ports == {7001, 7002} and old._hold  # what the map holds now
