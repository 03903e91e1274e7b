"""The service manager's file descriptor store (tcpproxy.fdstore), against a fake manager."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpproxy.fdstore import FdStore, Wanted, check_listener, fdname_is_valid, listen_fds
from tcpproxy.listeners import open_listener
from tcpproxy.notify import Notifier
from tests.helpers import (
    free_ports,
)
from tests.service_manager import ServiceManager

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
    notifier = Notifier(manager.env)
    notifier.connect()
    port, other = free_ports(2)
    good = open_listener("127.0.0.1", port)
    wrong = open_listener("127.0.0.1", other)
    spare = os.dup(good.fileno())
    for name, sock in (("good", good), ("wrong", wrong), ("unknown", good)):
        notifier.send("FDSTORE=1", f"FDNAME={name}", fds=[sock.fileno()])
    assert manager.wait(lambda: len(manager.store) == 2)  # "unknown" is good's open file
    received = [("good", good.detach()), ("wrong", wrong.detach()), ("unknown", spare)]
    store = FdStore(notifier, 4, received=received)
    taken = store.take({"good": Wanted("127.0.0.1", port), "wrong": Wanted("127.0.0.1", port)})
    try:
        assert list(taken) == ["good"]
        assert check_listener(taken["good"], "127.0.0.1", port, reuse_port=False) is None
        assert manager.wait(lambda: manager.names() == ["good"])  # the rest removed at once
        assert store.stored == ["good"]
        with pytest.raises(OSError):
            os.fstat(spare)  # closed
    finally:
        for sock in taken.values():
            sock.close()
        notifier.close()
