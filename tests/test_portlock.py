"""PortLocks: a supervisor's exclusive claim on its ports (abstract Unix sockets)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tcpproxy.errors import StartupError
from tcpproxy.workers.portlock import PortLocks
from tests.helpers import ROOT, TIMEOUT, free_ports


def test_a_port_is_held_by_one_supervisor_until_released() -> None:
    p1, p2 = free_ports(2)
    first, second = PortLocks(None), PortLocks("*")
    try:
        first.take([p1])
        with pytest.raises(StartupError, match=rf"port {p1} \(\*:{p1}\): .*another process"):
            second.take([p2, p1])
        assert second.ports == frozenset()  # all or none: p2 is not kept either
        first.keep_only([])
        second.take([p1, p2])
        assert second.ports == {p1, p2}
    finally:
        first.close()
        second.close()


def test_different_addresses_of_a_port_are_different_locks() -> None:
    (port,) = free_ports(1)
    one, other = PortLocks("127.0.0.1"), PortLocks("[::1]")
    try:
        one.take([port])
        other.take([port])
        with pytest.raises(StartupError, match=rf"\[::1\]:{port}"):
            PortLocks("::1").take([port])
    finally:
        one.close()
        other.close()


def test_a_killed_supervisors_ports_are_free_again() -> None:
    """No stale lock file: the kernel drops the name with the process."""
    (port,) = free_ports(1)
    code = (f"from tcpproxy.workers.portlock import PortLocks; held = PortLocks(None); "
            f"held.take([{port}]); "
            "print('held', flush=True); import time; time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(StartupError):
            PortLocks(None).take([port])
    finally:
        holder.kill()
        holder.wait(TIMEOUT)
        holder.stdout.close()  # type: ignore[union-attr]
    locks = PortLocks(None)
    locks.take([port])
    locks.close()
