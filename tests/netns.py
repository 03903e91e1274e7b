"""Throw-away network namespaces for tests that must not touch the machine's own network.

``NetNS`` creates a uniquely named namespace (visible in ``ip netns list``)
with ``lo`` up (127.0.0.1 and ::1), makes sockets inside it, runs commands
inside it, and removes it on exit, killing what it started first.

Also here: the ``netns`` fixture (registered under that name; import
``netns_fixture`` into a conftest or test module to use it) and the skip
logic for tests marked ``bpf``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest

__all__ = [
    "NetNS",
    "bpf_unavailable_reason",
    "netns_fixture",
    "requires_bpf",
    "skip_unless_bpf_available",
]

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NETNS_RUN_DIR = "/run/netns"
_VETH_UP_TIMEOUT = 5.0  # seconds for a new veth pair's carrier to come up
_IFA_F_NODAD = 0x02  # linux/if_addr.h: an IPv6 address usable at once, no DAD wait
_counter = itertools.count()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (os.setns arrives in Python 3.12)."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNS:
    """A network namespace for one test: ``with NetNS() as ns: ...``.

    - ``ns.socket(family, type)`` makes a socket that lives inside the namespace;
    - ``ns.call(fn, *args)`` runs any function with the calling context inside it;
    - ``ns.popen(argv, **kw)`` runs a command inside it (``ip netns exec``);
    - ``ns.veth(other, ...)`` links it to another namespace with a veth pair.

    On exit every process it started, and any other process still inside the
    namespace, is killed, and the namespace is removed, whatever happened.
    """

    def __init__(self, prefix: str = "bpfproxy-test") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"
        self.path = os.path.join(_NETNS_RUN_DIR, self.name)
        self._processes: list[subprocess.Popen[Any]] = []
        self._created = False

    # ----------------------------------------------------------------- lifetime

    def __enter__(self) -> NetNS:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create(self) -> None:
        import pyroute2
        import pyroute2.netns

        pyroute2.netns.create(self.name)
        self._created = True
        with pyroute2.NetNS(self.name) as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            addresses = {msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr(index=lo)}
            # A new namespace gets ::1 on lo when it comes up, unless IPv6 is
            # disabled by default; add it in case, where IPv6 exists at all.
            if "::1" not in addresses and os.path.exists("/proc/sys/net/ipv6"):
                with contextlib.suppress(Exception):
                    self.call(_enable_ipv6_on_lo)
                    ipr.addr("add", index=lo, address="::1", prefixlen=128)

    def close(self) -> None:
        """Kill the processes, then remove the namespace. Idempotent."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self._processes.clear()
        if not self._created:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        import pyroute2.netns

        with contextlib.suppress(FileNotFoundError):
            pyroute2.netns.remove(self.name)
        self._created = False

    # ----------------------------------------------------------------- inside

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` inside the namespace and return its result.

        setns(2) switches only the calling thread, so this runs ``fn`` on a
        short-lived helper thread that switches in and then ends: the caller's
        thread never changes namespace, so there is no switching back that
        could fail. Sockets (and other namespaced objects) made by ``fn`` keep
        belonging to the namespace wherever they are used afterwards.
        """
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=inside, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A new socket inside the namespace."""
        return self.call(socket.socket, family, type, proto)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is killed when the namespace closes."""
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)
        self._processes.append(process)
        return process

    def veth(
        self,
        other: NetNS,
        addresses: Sequence[str] = ("10.99.0.1/24", "fd99::1/64"),
        other_addresses: Sequence[str] = ("10.99.0.2/24", "fd99::2/64"),
    ) -> None:
        """Link this namespace to ``other`` with a veth pair, up, with these addresses.

        Each end lives and dies with its namespace; IPv6 addresses skip
        duplicate address detection so they are usable at once.
        """
        import pyroute2

        here, there = f"veth{next(_counter)}a", f"veth{next(_counter)}b"
        with pyroute2.NetNS(self.name) as ipr:
            ipr.link(
                "add", ifname=here, kind="veth", peer={"ifname": there, "net_ns_fd": other.name}
            )
        for ns, ifname, cidrs in ((self, here, addresses), (other, there, other_addresses)):
            with pyroute2.NetNS(ns.name) as ipr:
                (index,) = ipr.link_lookup(ifname=ifname)
                for cidr in cidrs:
                    address, prefixlen = cidr.split("/")
                    flags = {"flags": _IFA_F_NODAD} if ":" in address else {}
                    ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen), **flags)
                ipr.link("set", index=index, state="up")
        # The carrier comes up a moment later; a SYN sent before would wait
        # a full retransmission timeout (1 s).
        deadline = time.monotonic() + _VETH_UP_TIMEOUT
        with pyroute2.NetNS(self.name) as ipr:
            while ipr.get_links(ifname=here)[0].get_attr("IFLA_OPERSTATE") != "UP":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"veth {here} in {self.name} did not come up")
                time.sleep(0.01)

    def pids(self) -> list[int]:
        """Processes inside the namespace (``ip netns pids``)."""
        result = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(word) for word in result.stdout.split() if word.isdigit()]


def _enable_ipv6_on_lo() -> None:
    # /proc/sys/net is per namespace, picked by the opening thread's namespace.
    with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "w") as knob:
        knob.write("0")


# --------------------------------------------------------------------------- pytest glue


@pytest.fixture(name="netns")
def netns_fixture() -> Iterator[NetNS]:
    """A fresh network namespace, removed after the test."""
    with NetNS() as ns:
        yield ns


@functools.cache
def bpf_unavailable_reason() -> str | None:
    """Why tests marked ``bpf`` cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (BPF programs and network namespaces): run pytest with sudo"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "needs pyroute2 (pip install '.[test]')"
    from bpfproxy.errors import SteeringError
    from bpfproxy.loader import check_environment

    try:
        check_environment()
    except SteeringError as exc:
        return str(exc)
    return None


#: Mark for test modules or functions: ``pytestmark = [pytest.mark.bpf, requires_bpf]``.
requires_bpf = pytest.mark.skipif(
    bpf_unavailable_reason() is not None, reason=bpf_unavailable_reason() or ""
)


def skip_unless_bpf_available(item: pytest.Item) -> None:
    """For conftest's ``pytest_runtest_setup``: skip items marked ``bpf`` that cannot run."""
    reason = bpf_unavailable_reason()
    if reason is not None and item.get_closest_marker("bpf") is not None:
        pytest.skip(reason)
