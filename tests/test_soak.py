"""Reload torture and a bounded soak, for both binaries.

The soak prints its figures (run pytest with -s to see them); select it
with `-m soak`, skip it with `-m "not soak"`.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.deploy import Deployment, deployment
from tests.helpers import TIMEOUT, ProxyProcess, app, recv_all, recv_line

__all__ = ["deployment"]


class Traffic:
    """Client threads in a loop; every failure is recorded with what it was doing."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def run(self, name: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    fn(*args)
                except (OSError, AssertionError) as exc:
                    with self._lock:
                        self.failures.append(f"{name}: {exc!r}")
                else:
                    with self._lock:
                        self.counts[name] += 1

        t = threading.Thread(target=loop, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(TIMEOUT * 3)


class SessionFailed(AssertionError):
    """A client session failed; says where, so it can be found in the proxy's log."""


def _short(d: Deployment, port: int) -> None:
    """Connect, read the backend's name, send 64 bytes, half-close, read them back.

    On failure, says which step failed, after how long, from which client
    port, and what had arrived: the proxy's debug log (`SOAK_LOG_LEVEL=debug`)
    has a line per connection naming that port.
    """
    payload = os.urandom(64)
    started, wall = time.monotonic(), time.time()
    step, local, got = "connect", "-", bytearray()
    try:
        with d.connect(port) as s:
            local = str(s.getsockname()[1])
            step = "recv name"
            while not got.endswith(b"\n"):
                chunk = s.recv(1)
                if not chunk:
                    break
                got += chunk
            assert got, "no name line"
            got = bytearray()
            step = "send"
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            step = "recv echo"
            while chunk := s.recv(65536):
                got += chunk
            assert got == payload, f"echo differs after {len(got)} of {len(payload)} bytes"
            step = "close"
    except (OSError, AssertionError) as exc:
        raise SessionFailed(
            f"{step} failed after {time.monotonic() - started:.3f}s (started {_clock(wall)}), "
            f"client port {local} to port {port}, {len(got)} bytes in "
            f"({bytes(got[:40])!r}): {exc!r}"
        ) from exc


def _clock(wall: float) -> str:
    """A wall-clock time as the proxy's log shows it (to the millisecond)."""
    return f"{time.strftime('%H:%M:%S', time.localtime(wall))}.{int(wall % 1 * 1000):03d}"


def _softnet_drops() -> int:
    """Packets the kernel dropped at its per-CPU input queues (all network namespaces):
    a loopback packet lost there is lost for good if it was a RST, and a client then
    waits on a half-open target connection, whatever the proxy does."""
    with open("/proc/net/softnet_stat") as stat:
        return sum(int(line.split()[1], 16) for line in stat)


def _log_of(proxy: ProxyProcess, failures: list[str], context: list[str]) -> str:
    """The proxy's log lines about the client ports the failures name, then `context`."""
    ports = set(re.findall(r"client port (\d+) ", "\n".join(failures)))
    lines = [
        line for line in proxy.lines
        if any(re.search(rf"client=\S+:{p}\b", line) for p in ports)
    ]  # fmt: skip
    lines = lines or ["(no log line names them: run with SOAK_LOG_LEVEL=debug)"]
    return "\n".join([*lines, *context])


def _long(d: Deployment, port: int) -> None:
    with d.connect(port) as s:
        assert recv_line(s)
        for i in range(10):
            s.sendall(b"%d\n" % i)
            assert recv_line(s) == b"%d\n" % i
            time.sleep(0.2)


def _large(d: Deployment, port: int) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    with d.connect(port, timeout=30) as s:
        assert recv_line(s)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_all(s)))
        reader.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert got == [payload]


class Restartable:
    """A named echo backend on a fixed port that can stop listening and come back."""

    def __init__(self, d: Deployment, name: str) -> None:
        self.d, self.name = d, name
        self.backend = d.backend(name)
        self.port = self.backend.port
        self.address = self.backend.address
        self.down: list[tuple[float, float]] = []  # restarts: (stopped, back), wall clock

    def restart(self, down_for: float) -> None:
        # Graceful, as a rolling deploy: stop accepting, let open connections finish.
        stopped = time.time()
        self.backend.stop_accepting()
        time.sleep(down_for)
        self.backend = self.d.backend(self.name, port=self.port)
        self.down.append((stopped, time.time()))

    def __str__(self) -> str:
        spans = ", ".join(f"{_clock(a)}-{_clock(b)}" for a, b in self.down) or "never"
        return f"{self.name} {self.address} down {spans}"


def _configs(ports: list[int], extra: int, targets: list[str]) -> list[list[dict]]:
    """Configs to cycle through: traffic ports always present, the rest varies."""
    return [
        [app("A", ports[:1], targets[:2]), app("B", ports[1:], targets[1:])],
        [app("A", ports[:1], targets[:2], Strategy="random"), app("B", ports[1:], targets[1:])],
        [app("A", [ports[0], extra], targets[:2]), app("B", ports[1:], targets[2:] + targets[:1])],
        [
            app("A", ports[:1], targets, Strategy="least-connections"),
            app("B", ports[1:], targets[1:], ConnectTimeout=1),
        ],
    ]


@pytest.mark.slow
@pytest.mark.soak
def test_soak_mixed_traffic_reloads_and_restarts(deployment: Deployment) -> None:
    d = deployment
    duration = float(os.environ.get("SOAK_SECONDS", "60")) / 2  # both binaries in ~60 s
    backends = [Restartable(d, f"t{i}") for i in range(3)]
    targets = [b.address for b in backends]
    ports = d.ports(3)
    extra = ports.pop()
    configs = _configs(ports, extra, targets)
    # debug: a log line per connection, to match a failed session with (see _short)
    proxy = d.start(configs[0], "--log-level", os.environ.get("SOAK_LOG_LEVEL", "info"))
    for port in ports:
        _short(d, port)
    time.sleep(0.5)
    fds_start, rss_start = d.fd_count(), d.rss_kib()
    drops_start = _softnet_drops()

    traffic = Traffic(d)
    for port in ports:
        for i in range(3):
            traffic.run(f"short-{port}-{i}", _short, d, port)
        traffic.run(f"long-{port}", _long, d, port)
        traffic.run(f"large-{port}", _large, d, port)
    started = time.monotonic()
    reloads = restarts = 0
    rng = random.Random(1)
    try:
        while time.monotonic() - started < duration:
            d.reconfigure(configs[(reloads + 1) % len(configs)])
            reloads += 1
            if reloads % 3 == 0:
                threading.Thread(
                    target=backends[rng.randrange(3)].restart, args=(0.5,), daemon=True
                ).start()
                restarts += 1
            time.sleep(1.0)
    finally:
        traffic.finish()
    # Back to the starting ports, to compare descriptors. If the loop's last write was
    # configs[0] already, writing it again changes no byte and the reloader says
    # nothing (an event that changed nothing): go through another config first.
    if reloads % len(configs) == 0:
        mark = proxy.mark()
        d.reconfigure(configs[1])
        proxy.wait_for(r"applied", start=mark)
    mark = proxy.mark()
    d.reconfigure(configs[0])
    proxy.wait_for(r"applied|no changes", start=mark)
    applied = proxy.output.count("applied:")
    wait_until_fds = time.monotonic() + TIMEOUT
    while d.fd_count() > fds_start and time.monotonic() < wait_until_fds:
        time.sleep(0.1)  # the last connections are closing
    fds_end, rss_end = d.fd_count(), d.rss_kib()
    drops = _softnet_drops() - drops_start
    total = sum(traffic.counts.values())
    print(
        f"\n{d.binary} soak {duration:.0f}s: {total} client sessions "
        f"({sum(v for k, v in traffic.counts.items() if k.startswith('short'))} short, "
        f"{sum(v for k, v in traffic.counts.items() if k.startswith('long'))} long, "
        f"{sum(v for k, v in traffic.counts.items() if k.startswith('large'))} x 4 MiB), "
        f"{len(traffic.failures)} failed; {reloads} config writes, {applied} applied; "
        f"{restarts} target restarts; fds {fds_start} -> {fds_end}; "
        f"RSS {rss_start // 1024} -> {rss_end // 1024} MiB; {drops} packets dropped by the "
        f"kernel's input queues"
    )
    targets = [str(b) for b in backends]
    assert traffic.failures == [], _log_of(proxy, traffic.failures, [*targets, f"drops {drops}"])
    assert applied >= reloads // 2
    assert fds_end <= fds_start
    assert rss_end - rss_start < 32 * 1024  # KiB: no growth with traffic or reloads
    assert proxy.proc.poll() is None


def _garbage(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return b""
    if kind == 1:
        return good[: rng.randrange(1, len(good))]  # truncated mid-write
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 3:
        return json.dumps({"Apps": [{"Name": "A", "Ports": [0], "Targets": []}]}).encode()
    return good.replace(b'"Ports"', b'"Portz"')


@pytest.mark.slow
def test_reload_torture_keeps_serving_the_last_good_config(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    a, b = d.backend("a"), d.backend("b")
    (port,) = d.ports(1)
    good_a = json.dumps({"Apps": [app("A", [port], [a.address])]}).encode()
    good_b = json.dumps({"Apps": [app("A", [port], [b.address])]}).encode()
    proxy = d.start([app("A", [port], [a.address])], "--log-level", "info")
    traffic = Traffic(d)
    traffic.run("client", lambda: d.which(port))
    rng = random.Random(7)
    try:
        for i in range(60):
            data = _garbage(rng, good_a)
            if i % 2:  # in place, as an editor without atomic save
                with open(d.config_path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    f.write(data[len(data) // 2 :])
            else:  # atomically replaced
                tmp = tmp_path / "next.json"
                tmp.write_bytes(data)
                os.replace(tmp, d.config_path)
            time.sleep(0.05)
        assert d.which(port) == "a"  # the last good config still runs
        mark = proxy.mark()
        d.config_path.write_bytes(good_b)
        proxy.wait_for(r"applied", start=mark)
        assert d.which(port) == "b"
    finally:
        traffic.finish()
    assert traffic.failures == []
    assert "rejected" in proxy.output
    assert proxy.proc.poll() is None
