"""The service manager's file descriptor store: listeners, and their queues, outlive a kill -9.

The proxies run under `tests.service_manager.ServiceManager`, which keeps the
descriptors they store and starts them again with those descriptors, as
systemd does with FileDescriptorStoreMax=. Against it, with and without a
store: connections queued while the proxy is stopped (SIGSTOP), and those
started while it is dead, are all served by the restarted proxy with the
store; without it they are reset or refused. bpfproxy runs in a network
namespace of the test's own, with a bpffs of its own for its pins.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tcpproxy.fdstore import FdStore, Wanted, check_listener, fdname_is_valid, listen_fds
from tcpproxy.listeners import open_listener
from tcpproxy.notify import Notifier
from tests.deploy import Deployment
from tests.helpers import (
    TIMEOUT,
    ProxyProcess,
    app,
    connect,
    free_ports,
    recv_all,
    tcpproxy_argv,
    wait_until,
    write_config,
)
from tests.netns import NetNS
from tests.service_manager import ServiceManager
from tests.test_bpfproxy import counter, instance_name, pinned_args
from tests.test_upgrade import children, gone

QUEUED = 5  # connections queued on the listener of a stopped (SIGSTOP) proxy
DURING = 3  # connections started while no proxy runs
LOOPS = 4  # clients in a connect/send/receive/close loop
ANSWER = "b1\nping"  # what a client gets through the proxy from backend b1


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ServiceManager]:
    m = ServiceManager(tmp_path)
    try:
        yield m
    finally:
        m.close()


# --------------------------------------------------------------------------- pieces


def test_names_the_service_manager_takes() -> None:
    assert fdname_is_valid("tcpproxy-port-7001")
    assert not fdname_is_valid("")
    assert not fdname_is_valid("a:b")  # $LISTEN_FDNAMES' separator
    assert not fdname_is_valid("tab\there")
    assert not fdname_is_valid("é")
    assert fdname_is_valid("x" * 255) and not fdname_is_valid("x" * 256)


def test_listen_fds_are_ours_only_for_our_pid() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a", "OTHER": "x"}
    assert listen_fds(env, 2) == []
    assert env == {"OTHER": "x"}  # unset all the same: not for children either
    assert listen_fds({"LISTEN_PID": "2", "LISTEN_FDS": "x"}, 2) == []


def test_a_stored_listener_is_checked_against_what_is_wanted() -> None:
    (port,) = free_ports(1)
    with open_listener("127.0.0.1", port) as sock:
        assert check_listener(sock, "127.0.0.1", port, reuse_port=False) is None
        assert "not 8" in str(check_listener(sock, "127.0.0.1", 8, reuse_port=False))
        assert "not ::1" in str(check_listener(sock, "::1", port, reuse_port=False))
        assert "every address" in str(check_listener(sock, None, port, reuse_port=False))
        assert "SO_REUSEPORT" in str(check_listener(sock, "127.0.0.1", port, reuse_port=True))
    with open_listener(None, port) as sock:
        assert check_listener(sock, None, port, reuse_port=False) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert check_listener(sock, "127.0.0.1", 0, reuse_port=False) == "not listening"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert check_listener(sock, None, 0, reuse_port=False) == "not a TCP socket"


def test_the_store_keeps_what_serves_once_and_empties_at_a_stop(
    manager: ServiceManager,
) -> None:
    """sync stores each listener once and removes the ones no longer served; nothing
    before `serve`, nothing past the limit, nothing after `clear` or `hand_over`."""
    notifier = Notifier(manager.env)
    notifier.connect()
    a, b, c = (open_listener("127.0.0.1", 0) for _ in range(3))
    serving = {"a": a, "b": b}
    store = FdStore(notifier, 2)
    store.keep(lambda: {name: sock.fileno() for name, sock in serving.items()})
    try:
        store.sync()
        assert not manager.wait(lambda: bool(manager.store), timeout=0.3)  # not serving yet
        store.serve()
        assert manager.wait(lambda: [n for n, _ in manager.store] == ["a", "b"])
        store.sync()
        serving["c"] = c  # over the limit of 2: not stored
        store.sync()
        del serving["a"]
        store.sync()  # a removed, then c stored
        assert manager.wait(lambda: [n for n, _ in manager.store] == ["b", "c"])
        assert store.stored == ["b", "c"]
        store.clear()
        assert manager.wait(lambda: manager.store == [])
        store.sync()
        assert not manager.wait(lambda: bool(manager.store), timeout=0.3)
        assert manager.duplicates == 0

        handed = FdStore(notifier, 2, stored=["b"])  # an upgrade's new process
        handed.keep(lambda: {"b": b.fileno()})
        handed.serve()  # b is stored already (by the old one): not sent again
        handed.hand_over()  # and a later upgrade took over from it
        handed.clear()
        assert not manager.wait(lambda: bool(manager.store), timeout=0.3)
    finally:
        for sock in (a, b, c):
            sock.close()
        notifier.close()


def test_what_comes_back_is_taken_if_wanted_and_else_removed(manager: ServiceManager) -> None:
    """The wanted listener is taken; one on another port, one of a name not wanted
    (its port free again at once: shut down, whoever else holds it) and a descriptor
    that is no socket are closed, and removed from the store at once."""
    notifier = Notifier(manager.env)
    notifier.connect()
    port, other, unknown_port = free_ports(3)
    good = open_listener("127.0.0.1", port)
    wrong = open_listener("127.0.0.1", other)
    unknown = open_listener("127.0.0.1", unknown_port)
    holder = os.dup(unknown.fileno())  # another holder, as the manager's copy is
    junk, junk_writer = os.pipe()
    os.close(junk_writer)
    for name, fd in (("good", good.fileno()), ("wrong", wrong.fileno()),
                     ("unknown", unknown.fileno()), ("junk", junk)):  # fmt: skip
        notifier.send("FDSTORE=1", f"FDNAME={name}", fds=[fd])
    assert manager.wait(lambda: len(manager.store) == 4)
    received = [("good", good.detach()), ("wrong", wrong.detach()),
                ("unknown", unknown.detach()), ("junk", junk)]  # fmt: skip
    store = FdStore(notifier, 4, received=received)
    taken = store.take({"good": Wanted("127.0.0.1", port), "wrong": Wanted("127.0.0.1", port)})
    try:
        assert list(taken) == ["good"]
        assert check_listener(taken["good"], "127.0.0.1", port, reuse_port=False) is None
        assert manager.wait(lambda: manager.names() == ["good"])  # the rest removed at once
        assert store.stored == ["good"]
        with pytest.raises(OSError):
            os.fstat(junk)  # closed
        open_listener("127.0.0.1", unknown_port).close()  # free, though still held
    finally:
        for sock in taken.values():
            sock.close()
        os.close(holder)
        notifier.close()


# --------------------------------------------------------------------------- tcpproxy


def ping(port: int, make_socket: Callable[[int], socket.socket] | None = None) -> socket.socket:
    """A client that sent "ping" and its half-close (queued, if nobody accepts)."""
    sock = connect(port, make_socket=make_socket)
    sock.sendall(b"ping")
    sock.shutdown(socket.SHUT_WR)
    return sock


def answer(sock: socket.socket) -> str:
    """What the proxy answered, or why not."""
    try:
        with sock:
            return recv_all(sock).decode()
    except OSError as exc:
        return repr(exc)


def attempt(port: int, make_socket: Callable[[int], socket.socket] | None = None) -> str:
    try:
        return answer(ping(port, make_socket))
    except OSError as exc:
        return repr(exc)


def ready(manager: ServiceManager, proxy: ProxyProcess) -> None:
    pid = proxy.proc.pid
    assert manager.wait(lambda: manager.heard(pid, "READY") is not None), proxy.output


def kill(proxy: ProxyProcess) -> None:
    proxy.send(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)


class Loops:
    """Clients in connect/ping/answer loops, each outcome with when it started."""

    def __init__(
        self, port: int, make_socket: Callable[[int], socket.socket] | None = None
    ) -> None:
        self.outcomes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(port, make_socket), daemon=True)
            for _ in range(LOOPS)
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self, port: int, make_socket: Callable[[int], socket.socket] | None) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.outcomes.append((started, attempt(port, make_socket)))

    def served(self) -> int:
        return sum(1 for _, outcome in self.outcomes if outcome == ANSWER)

    def finish(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2 * TIMEOUT)


def assert_only_relayed_lost(loops: Loops, dead: float) -> None:
    """After a kill at `dead` and a restart: every connection started since was served,
    and at most one per loop (the one it was relaying) was lost, none refused."""
    lost = [outcome for _, outcome in loops.outcomes if outcome != ANSWER]
    after = {outcome for started, outcome in loops.outcomes if started >= dead}
    assert after == {ANSWER}, after
    assert len(lost) <= LOOPS, lost
    assert not [outcome for outcome in lost if "Refused" in outcome], lost


@pytest.mark.slow
@pytest.mark.parametrize("keep_fds", [True, False], ids=["store", "no-store"])
def test_tcpproxy_queue_outlives_a_kill(tmp_path: Path, backends, keep_fds: bool) -> None:
    """Connections queued while tcpproxy is stopped, and those started while it is
    dead, are served by the restarted one: the store kept the listener open. Without
    a store (the control) they are reset and refused. A clean stop empties the store."""
    b1 = backends("b1")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [b1.address])])
    manager = ServiceManager(tmp_path, keep_fds=keep_fds)
    argv = tcpproxy_argv(config, "--log-level", "debug")
    proxy = manager.start(argv)
    try:
        ready(manager, proxy)
        assert manager.names() == ([f"tcpproxy-port-{port}"] if keep_fds else [])
        proxy.send(signal.SIGSTOP)
        queued = [ping(port) for _ in range(QUEUED)]  # the kernel completes the handshakes
        kill(proxy)
        if keep_fds:
            during = [ping(port) for _ in range(DURING)]  # queued too: not refused
        else:
            with pytest.raises(ConnectionRefusedError):
                ping(port)
            during = []
        proxy = manager.start(argv)
        ready(manager, proxy)
        answers = [answer(sock) for sock in queued + during]
        if keep_fds:
            assert answers == [ANSWER] * (QUEUED + DURING), proxy.output
            assert f"handed back 1 descriptors: tcpproxy-port-{port}" in proxy.output
            assert manager.names() == [f"tcpproxy-port-{port}"]
        else:
            assert all("Reset" in a or a == "" for a in answers), answers
        assert manager.duplicates == 0  # the listener taken back was not stored again
        assert proxy.stop() == 0
        assert manager.store == []  # emptied at the clean stop: the port refuses
        with pytest.raises(ConnectionRefusedError):
            ping(port)
    finally:
        proxy.kill()
        manager.close()
    assert "Traceback" not in proxy.output


@pytest.mark.slow
def test_tcpproxy_kill_under_load_loses_only_what_it_relayed(
    tmp_path: Path, backends, manager: ServiceManager
) -> None:
    """4 client loops, kill -9, restart at once: no connection refused, every one
    started after the kill served; at most one per loop (what the dead process was
    relaying) lost."""
    b1 = backends("b1")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [b1.address])])
    argv = tcpproxy_argv(config)
    proxy = manager.start(argv)
    loops = None
    try:
        ready(manager, proxy)
        loops = Loops(port)
        assert wait_until(lambda: loops.served() >= 40)
        kill(proxy)
        dead = time.monotonic()
        proxy = manager.start(argv)
        ready(manager, proxy)
        before = loops.served()
        assert wait_until(lambda: loops.served() >= before + 40)
    finally:
        if loops is not None:
            loops.finish()
        proxy.kill()
    assert_only_relayed_lost(loops, dead)


@pytest.mark.slow
def test_tcpproxy_store_follows_reloads_upgrades_and_restarts(
    tmp_path: Path, backends, manager: ServiceManager
) -> None:
    """A reload that adds a port stores its listener, one that drops a port removes
    it; an upgrade's new process stores nothing twice and keeps the store in step; a
    restart after a kill whose config dropped a port closes and removes that one."""
    b1 = backends("b1")
    first, second, third = free_ports(3)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [first], [b1.address])])
    argv = tcpproxy_argv(config)
    proxy = manager.start(argv)
    new = None

    def names(*ports: int) -> Callable[[], bool]:
        return lambda: sorted(n for n, _ in manager.store) == [f"tcpproxy-port-{p}" for p in ports]

    try:
        ready(manager, proxy)
        write_config(config, [app("A", [first, second], [b1.address])])
        assert manager.wait(names(first, second)), proxy.output
        write_config(config, [app("A", [second], [b1.address])])
        assert manager.wait(names(second)), proxy.output
        assert attempt(second) == ANSWER

        proxy.send(signal.SIGUSR2)  # the new process serves on the same listener
        new = int(proxy.wait_for(r"upgrade: pid (\d+) serves")[1])
        assert manager.wait(lambda: manager.heard(new, "MAINPID") is not None)
        assert proxy.proc.wait(TIMEOUT) == 0
        write_config(config, [app("A", [second, third], [b1.address])])
        assert manager.wait(names(second, third)), proxy.output
        assert manager.duplicates == 0

        os.kill(new, signal.SIGKILL)
        assert wait_until(lambda: gone(new))
        write_config(config, [app("A", [third], [b1.address])])
        proxy = manager.start(argv)
        ready(manager, proxy)
        proxy.wait_for(rf"stored descriptor tcpproxy-port-{second}: not wanted here: closed")
        assert manager.wait(names(third))
        assert "Refused" in attempt(second)
        assert attempt(third) == ANSWER
        assert manager.duplicates == 0
    finally:
        if new is not None and not gone(new):
            os.kill(new, signal.SIGKILL)
        proxy.kill()
    assert "Traceback" not in proxy.output


@pytest.mark.slow
def test_tcpproxy_workers_keep_nothing_in_the_store(
    tmp_path: Path, backends, manager: ServiceManager
) -> None:
    """--workers: each worker binds its own listeners, the supervisor has none to
    store; what a single process stored before is closed and removed."""
    b1 = backends("b1")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [b1.address])])
    proxy = manager.start(tcpproxy_argv(config))
    try:
        ready(manager, proxy)
        assert manager.names() == [f"tcpproxy-port-{port}"]
        kill(proxy)
        proxy = manager.start(tcpproxy_argv(config, "--workers", "2"))
        ready(manager, proxy)
        assert manager.store == []
        assert attempt(port) == ANSWER
        assert proxy.stop() == 0
    finally:
        proxy.kill()


# --------------------------------------------------------------------------- bpfproxy


def bpf_service(
    lab: Deployment, manager: ServiceManager, *args: str
) -> tuple[list[str], ProxyProcess]:
    """bpfproxy under the manager in the lab's namespace: its argv, and it started."""
    argv = lab.popen_argv(lab.argv("--log-level", "debug", *args))
    proxy = manager.start(argv)
    ready(manager, proxy)
    return argv, proxy


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A bpffs of the test's own, which `ip netns exec` leaves alone; unmounting it
    releases whatever a failed test left pinned."""
    root = tmp_path / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True, timeout=TIMEOUT)
    try:
        yield root
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=False, timeout=TIMEOUT)


@pytest.fixture
def lab(tmp_path: Path, netns: NetNS) -> Iterator[Deployment]:
    d = Deployment("bpfproxy", tmp_path / "config.json", netns)
    try:
        yield d
    finally:
        d.close()


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_bpfproxy_queue_outlives_a_kill(
    lab: Deployment, bpffs: Path, manager: ServiceManager, workers: int
) -> None:
    """bpfproxy (and --workers 2, the supervisor and its workers killed): connections
    queued while it is stopped and those started while it is dead are served by the
    restarted one. The stored listener stayed open and in the pinned sockmap, so no
    SYN had to be held; the restart puts the same one in and compiles nothing."""
    b1 = lab.backend("b1")
    write_config(lab.config_path, [app("A", [7001], [b1.address])])
    instance = instance_name()
    args = (*pinned_args(bpffs, instance), "--workers", str(workers))
    argv, proxy = bpf_service(lab, manager, *args)
    names = ["bpfproxy-listener"] if workers == 1 else ["bpfproxy-group-0", "bpfproxy-group-1"]
    try:
        assert sorted(manager.names()) == names
        service = [proxy.proc.pid, *children(proxy.proc.pid)]
        assert len(service) == workers + (workers > 1)
        for pid in service:
            os.kill(pid, signal.SIGSTOP)
        queued = [ping(7001, lab.make_socket) for _ in range(QUEUED)]
        for pid in service:
            os.kill(pid, signal.SIGKILL)
        proxy.proc.wait(TIMEOUT)
        assert wait_until(lambda: all(gone(pid) for pid in service))
        held = counter(bpffs, instance, "held")
        during = [ping(7001, lab.make_socket) for _ in range(DURING)]  # queued, not held
        assert counter(bpffs, instance, "held") == held
        proxy = manager.start(argv)
        ready(manager, proxy)
        answers = [answer(sock) for sock in queued + during]
        assert answers == [ANSWER] * (QUEUED + DURING), proxy.output
        assert "reusing the pinned program" in proxy.output
        assert "compiled and loaded" not in proxy.output
        assert sorted(manager.names()) == names
        assert manager.duplicates == 0
        assert proxy.stop() == 0
        assert manager.store == []  # a clean stop: the store emptied, every port released
        assert "Refused" in attempt(7001, lab.make_socket)
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.output


@pytest.mark.slow
@pytest.mark.bpf
def test_bpfproxy_kill_under_load_loses_only_what_it_relayed(
    lab: Deployment, bpffs: Path, manager: ServiceManager
) -> None:
    """4 client loops, kill -9, restart at once: no connection refused or held for a
    retransmission, every one started after the kill served, at most one per loop
    lost (what the dead process was relaying)."""
    b1 = lab.backend("b1")
    write_config(lab.config_path, [app("A", [7001], [b1.address])])
    instance = instance_name()
    argv, proxy = bpf_service(lab, manager, *pinned_args(bpffs, instance))
    loops = None
    try:
        loops = Loops(7001, lab.make_socket)
        assert wait_until(lambda: loops.served() >= 40)
        kill(proxy)
        dead = time.monotonic()
        proxy = manager.start(argv)
        ready(manager, proxy)
        before = loops.served()
        assert wait_until(lambda: loops.served() >= before + 40)
    finally:
        if loops is not None:
            loops.finish()
        proxy.kill()
    assert_only_relayed_lost(loops, dead)
    assert counter(bpffs, instance, "held") == 0  # the listener never left the sockmap


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_bpfproxy_upgrade_hands_the_store_on(
    lab: Deployment, bpffs: Path, manager: ServiceManager, workers: int
) -> None:
    """After an upgrade (SIGUSR2) the store holds the same sockets, none twice, and
    is the new process's (or new supervisor's): a kill -9 of it and a restart still
    serve what queued; its clean stop empties the store."""
    b1 = lab.backend("b1")
    write_config(lab.config_path, [app("A", [7001], [b1.address])])
    instance = instance_name()
    args = (*pinned_args(bpffs, instance), "--workers", str(workers))
    argv, proxy = bpf_service(lab, manager, *args)
    names = sorted(manager.names())
    first = proxy
    new = None
    try:
        proxy.send(signal.SIGUSR2)
        new = int(proxy.wait_for(r"upgrade: pid (\d+) serves")[1])
        assert manager.wait(lambda: manager.heard(new, "MAINPID") is not None), proxy.output
        assert proxy.proc.wait(TIMEOUT) == 0
        assert sorted(manager.names()) == names and manager.duplicates == 0
        service = [new, *children(new)]
        for pid in service:
            os.kill(pid, signal.SIGSTOP)
        queued = [ping(7001, lab.make_socket) for _ in range(QUEUED)]
        for pid in service:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: all(gone(pid) for pid in service))
        proxy = manager.start(argv)
        ready(manager, proxy)
        assert [answer(sock) for sock in queued] == [ANSWER] * QUEUED, proxy.output
        assert sorted(manager.names()) == names and manager.duplicates == 0
        assert proxy.stop() == 0
        assert manager.store == []
    finally:
        if new is not None and not gone(new):
            for pid in [new, *children(new)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proxy.kill()
        first.kill()
    assert "Traceback" not in first.output + proxy.output
