"""bpfproxy as a user runs it: the real binary and real BPF, each test in its own netns.

Nothing here steers this machine's own ports: the proxy, its backends and
its clients all live in a network namespace the test creates and removes.
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    TIMEOUT,
    Backend,
    ProxyProcess,
    app,
    connect,
    exchange,
    recv_all,
    recv_line,
    which_backend,
    write_config,
)
from tests.netns import NetNS

pytestmark = pytest.mark.bpf

LISTEN_PORT = 8000


class Lab:
    """A namespace with backends, clients and bpfproxy inside it."""

    def __init__(self, ns: NetNS, config_path: Path) -> None:
        self.ns = ns
        self.config_path = config_path
        self.backends: list[Backend] = []
        self.proxy: ProxyProcess | None = None

    def make_socket(self, family: int) -> socket.socket:
        return self.ns.socket(family, socket.SOCK_STREAM)

    def backend(self, name: str, **kw: object) -> Backend:
        b = Backend(name, make_socket=self.make_socket, **kw)  # type: ignore[arg-type]
        self.backends.append(b)
        return b

    def start(self, *args: str) -> ProxyProcess:
        argv = [sys.executable, "-m", "bpfproxy", "-p", str(LISTEN_PORT),
                "--config", str(self.config_path), "--log-level", "debug", *args]  # fmt: skip
        self.proxy = ProxyProcess(["ip", "netns", "exec", self.ns.name, *argv])
        self.proxy.wait_for(r"bpfproxy started")
        return self.proxy

    def which(self, port: int, host: str = "127.0.0.1") -> str:
        return which_backend(port, host, make_socket=self.make_socket)

    def connect(self, port: int, host: str = "127.0.0.1") -> socket.socket:
        return connect(port, host, make_socket=self.make_socket)

    def refused(self, port: int, host: str = "127.0.0.1") -> bool:
        try:
            self.connect(port, host).close()
        except ConnectionRefusedError:
            return True
        return False

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.kill()
        for b in self.backends:
            b.close()


@pytest.fixture
def lab(netns: NetNS, config_path: Path) -> Iterator[Lab]:
    lab = Lab(netns, config_path)
    try:
        yield lab
    finally:
        lab.close()


def test_each_port_reaches_its_app_and_others_are_refused(lab: Lab) -> None:
    a, b = lab.backend("a"), lab.backend("b")
    write_config(lab.config_path, [app("A", [7001, 7002], [a.address]),
                                   app("B", [7101], [b.address])])  # fmt: skip
    lab.start()
    assert lab.which(7001) == "a"
    assert lab.which(7002) == "a"
    assert lab.which(7101) == "b"
    assert lab.refused(7003)  # not configured: the normal lookup finds nothing
    assert exchange(7101, b"hi", make_socket=lab.make_socket) == b"b\nhi"


def test_ipv6_loopback(lab: Lab) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001], [a.address])])
    lab.start()
    assert lab.which(7001, host="::1") == "a"
    assert lab.refused(7003, host="::1")


def test_a_thousand_port_app(lab: Lab) -> None:
    a = lab.backend("a")
    ports = list(range(20000, 21000))
    write_config(lab.config_path, [app("A", ports, [a.address])])
    proxy = lab.start()
    proxy.wait_for(r"1000 ports steered")
    for port in [*ports[::97], ports[0], ports[-1]]:
        assert lab.which(port) == "a"
    assert lab.refused(ports[-1] + 1)
    assert lab.refused(ports[0] - 1)


def test_reload_adds_and_removes_ports_keeping_established(lab: Lab) -> None:
    a, b = lab.backend("a"), lab.backend("b")
    write_config(lab.config_path, [app("A", [7001, 7002], [a.address])])
    proxy = lab.start()
    established = lab.connect(7002)
    assert recv_line(established) == b"a\n"
    mark = proxy.mark()
    write_config(lab.config_path, [app("A", [7001], [a.address]), app("B", [7201], [b.address])])
    proxy.wait_for(r"applied", start=mark)
    assert lab.which(7201) == "b"
    assert lab.which(7001) == "a"
    assert lab.refused(7002)
    established.sendall(b"still here")
    established.shutdown(socket.SHUT_WR)
    assert recv_all(established) == b"still here"
    established.close()


def test_invalid_reload_keeps_the_port_map(lab: Lab) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001], [a.address])])
    proxy = lab.start()
    mark = proxy.mark()
    lab.config_path.write_text('{"Apps": [{"Name": "A", "Ports": [7001, 7001], "Targets": []}]}')
    proxy.wait_for(r"rejected", start=mark)
    assert lab.which(7001) == "a"


def test_reload_claiming_the_listen_port_is_rejected(lab: Lab) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001], [a.address])])
    proxy = lab.start()
    mark = proxy.mark()
    write_config(lab.config_path, [app("A", [7001, LISTEN_PORT], [a.address])])
    proxy.wait_for(rf"rejected.*port {LISTEN_PORT}.*listening port", start=mark)
    assert lab.which(7001) == "a"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ports_are_released_when_bpfproxy_exits(lab: Lab, signum: int) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001, 7002], [a.address])])
    proxy = lab.start()
    assert lab.which(7001) == "a"
    proxy.send(signum)
    code = proxy.proc.wait(TIMEOUT)
    assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
    assert lab.refused(7001)
    assert lab.refused(7002)
    assert lab.refused(LISTEN_PORT)


def test_listen_port_is_served_normally_and_not_routed(lab: Lab) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001], [a.address])])
    lab.start()
    with lab.connect(LISTEN_PORT) as sock:  # reaches the listener, belongs to no app
        assert recv_all(sock) == b""


def test_listen_port_used_by_an_app_is_a_startup_error(lab: Lab) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001, LISTEN_PORT], [a.address])])
    argv = [sys.executable, "-m", "bpfproxy", "-p", str(LISTEN_PORT), "-c", str(lab.config_path)]
    proc = lab.ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2
    assert b"port 8000 of app 'A' (Ports[1])" in out and b"Traceback" not in out


def test_check_loads_the_program() -> None:
    out = subprocess.run([sys.executable, "-m", "bpfproxy", "--check"], capture_output=True,
                         timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert b"ok" in out.stdout


@functools.cache
def _unprivileged_runner() -> list[str] | None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def test_non_root_gets_a_clear_error(tmp_path: Path) -> None:
    runner = _unprivileged_runner()
    if runner is None:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = subprocess.run(
        [*runner, sys.executable, "-m", "bpfproxy", "-p", "8000"],
        capture_output=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "bpfproxy: error:" in err and "sudo" in err
    assert "Traceback" not in err
