"""One way to run either binary with its backends and clients, for tests of both.

`tcpproxy` runs on this machine's loopback; `bpfproxy` runs in a network
namespace made for the test, with its backends and clients inside, so it
never steers this machine's own ports.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.helpers import (
    Backend,
    ProxyProcess,
    connect,
    exchange,
    free_ports,
    which_backend,
    write_config,
)
from tests.netns import NetNS

BPF_LISTEN_PORT = 8000
BINARIES = [
    pytest.param("tcpproxy", id="tcpproxy"),
    pytest.param("bpfproxy", id="bpfproxy", marks=pytest.mark.bpf),
]


class Deployment:
    """A binary, its config file, its backends, and clients that reach it."""

    def __init__(self, binary: str, config_path: Path, ns: NetNS | None) -> None:
        self.binary = binary
        self.config_path = config_path
        self.ns = ns
        self.backends: list[Backend] = []
        self.proxy: ProxyProcess | None = None

    def make_socket(self, family: int = socket.AF_INET) -> socket.socket:
        if self.ns is None:
            return socket.socket(family, socket.SOCK_STREAM)
        return self.ns.socket(family, socket.SOCK_STREAM)

    def ports(self, n: int) -> list[int]:
        return free_ports(n)  # free here; a new namespace has every port free

    def backend(self, name: str, handler: Callable | None = None, **kw: object) -> Backend:
        b = Backend(name, handler, make_socket=self.make_socket, **kw)  # type: ignore[arg-type]
        self.backends.append(b)
        return b

    def argv(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", self.binary, "--config", str(self.config_path), *args]
        if self.binary == "bpfproxy":
            argv[3:3] = ["-p", str(BPF_LISTEN_PORT)]
        return argv

    def popen_argv(self, argv: Sequence[str], prefix: Sequence[str] = ()) -> list[str]:
        full = [*prefix, *argv]
        return full if self.ns is None else ["ip", "netns", "exec", self.ns.name, *full]

    def start(
        self, apps: Sequence[dict], *args: str, prefix: Sequence[str] = (), **extra: object
    ) -> ProxyProcess:
        write_config(self.config_path, apps, **extra)
        argv = self.argv("--log-level", "debug", *args)
        self.proxy = ProxyProcess(self.popen_argv(argv, prefix))
        self.proxy.wait_for(rf"INFO {self.binary} started")  # the supervisor, with workers
        return self.proxy

    def reconfigure(self, apps: Sequence[dict], **extra: object) -> None:
        write_config(self.config_path, apps, **extra)

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
        return connect(port, host, timeout, make_socket=self.make_socket)

    def which(self, port: int, host: str = "127.0.0.1") -> str:
        return which_backend(port, host, make_socket=self.make_socket)

    def exchange(self, port: int, payload: bytes = b"hello") -> bytes:
        return exchange(port, payload, make_socket=self.make_socket)

    @property
    def pid(self) -> int:
        assert self.proxy is not None
        return self.proxy.proc.pid  # `ip netns exec` execs the proxy: same pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.kill()
        for b in self.backends:
            b.close()


@pytest.fixture(params=BINARIES)
def deployment(request: pytest.FixtureRequest, config_path: Path) -> Iterator[Deployment]:
    """Each test using this runs once per binary."""
    binary = request.param
    if binary == "bpfproxy":
        with NetNS() as ns:
            d = Deployment(binary, config_path, ns)
            try:
                yield d
            finally:
                d.close()
    else:
        d = Deployment(binary, config_path, None)
        try:
            yield d
        finally:
            d.close()
