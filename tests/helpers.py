"""Test helpers: named backends, the proxy as a real process, and clients.

Backends answer with their own name, so a test asserts *which* target a
connection reached, not just that it connected.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0  # seconds any single socket operation or wait in a test may take


def wait_until(
    predicate: Callable[[], bool], timeout: float = TIMEOUT, interval: float = 0.05
) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (tests bind it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def refused_port() -> int:
    """A loopback port that refuses connections."""
    return free_port()


class Backend:
    """A TCP server on 127.0.0.1 run in threads.

    Default behaviour ("named echo"): send `name + "\\n"` at once, echo every
    byte back, forward the client's half-close, close. `handler(conn)` replaces
    that behaviour.
    """

    def __init__(
        self,
        name: str,
        handler: Callable[[socket.socket], None] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        make_socket: Callable[[int], socket.socket] | None = None,
    ) -> None:
        self.name = name
        self._handler = handler or self._named_echo
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = (make_socket or socket.socket)(family)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(1024)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:  # as the kernel does to a closed listener's queue: reset
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    conn.close()
                    return
                self.accepted += 1
                self._conns.add(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._handler(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _named_echo(self, conn: socket.socket) -> None:
        conn.sendall(self.name.encode() + b"\n")
        echo(conn)

    def stop_accepting(self) -> None:
        """Close the listener only: open connections run to their end."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(TIMEOUT)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(TIMEOUT)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def connect(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = TIMEOUT,
    make_socket: Callable[[int], socket.socket] | None = None,
) -> socket.socket:
    """A client connection; `make_socket(family)` makes it elsewhere (a network namespace)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = (make_socket or socket.socket)(family)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def which_backend(
    port: int, host: str = "127.0.0.1", make_socket: Callable[[int], socket.socket] | None = None
) -> str:
    """Connect through the proxy and return the name the backend announced."""
    with connect(port, host, make_socket=make_socket) as sock:
        return recv_line(sock).decode().strip()


def exchange(
    port: int,
    payload: bytes = b"hello",
    host: str = "127.0.0.1",
    make_socket: Callable[[int], socket.socket] | None = None,
) -> bytes:
    """Send `payload`, half-close, and read everything back (like `nc -N`)."""
    with connect(port, host, make_socket=make_socket) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def write_config(path: Path, apps: Sequence[dict], **extra: object) -> None:
    """Write atomically (temp file + rename), as config managers do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"Apps": list(apps), **extra}))
    os.replace(tmp, path)


def app(name: str, ports: Sequence[int], targets: Sequence[str], **options: object) -> dict:
    return {"Name": name, "Ports": list(ports), "Targets": list(targets), **options}


class ProxyProcess:
    """The real binary, as a user runs it; stderr is collected for assertions."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            pass_fds=pass_fds,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT, start: int = 0) -> re.Match[str]:
        """Wait until a line (from index `start`) matches `pattern`; fail with the output."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if m := rx.search(line):
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout}s; output:\n{self.output}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def mark(self) -> int:
        """Index of the next line, to wait for lines after this point."""
        with self._cond:
            return len(self.lines)

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)


def tcpproxy_argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tcpproxy", "--config", str(config), *args]


@contextlib.contextmanager
def running_tcpproxy(config: Path, *args: str) -> Iterator[ProxyProcess]:
    """Start tcpproxy on `config` and wait until it serves; kill it afterwards."""
    proxy = ProxyProcess(tcpproxy_argv(config, "--log-level", "debug", *args))
    try:
        proxy.wait_for(r"tcpproxy started")
        yield proxy
    finally:
        proxy.kill()
