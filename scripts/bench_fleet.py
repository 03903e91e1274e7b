"""Benchmark (not a test): bpfproxy nodes following 1,000 apps x 20 ports in etcd.

Everything runs in network namespaces this script creates: one holds a real
etcd, each node namespace holds one bpfproxy reaching etcd over a veth pair.
Nothing on this machine is steered and nothing leaves it.

Measured:
- cold start: from starting a node (etcd holds every app) until it serves a
  sample of ports spread over every app (a connect completes there);
- propagation: a one-app change (one port of the app replaced by a new one,
  written as one put, as ``tcpproxyctl push`` writes a changed app) until
  every node serves the new port; p50 and p99 over ``--pushes`` changes;
- RSS of each node's serving process after the changes;
- etcd's requests per change (its gRPC counters, which its JSON gateway goes
  through), less the same window's idle traffic (lease keep-alives).

    sudo .venv/bin/python scripts/bench_fleet.py [--nodes 5] [--apps 1000] [--pushes 50]

Exits 1 if p99 propagation is 1 s or more, or a cold start takes 3 s or more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcpproxy.fleet.client import EtcdClient  # noqa: E402
from tcpproxy.fleet.url import parse_etcd_url  # noqa: E402
from tests.netns import NetNS  # noqa: E402

PREFIX = "/bench-fleet"
CLIENT_PORT = 2379
FIRST_PORT = 10000  # app i serves FIRST_PORT + 20 i ... + 19
SPARE_PORT = 40000  # pushes move one port of an app here
LISTEN_PORT = 8000
START_TIMEOUT = 60.0  # seconds for a node's start, compile included
PROPAGATION_TIMEOUT = 10.0
POLL = 0.002  # seconds between connect probes


def app_object(index: int, ports_per_app: int) -> dict[str, Any]:
    first = FIRST_PORT + index * ports_per_app
    return {"Ports": list(range(first, first + ports_per_app)), "Targets": ["127.0.0.1:9"]}


def node_address(index: int) -> tuple[str, str]:
    """The etcd side's and the node side's address on node `index`'s veth pair."""
    return f"10.98.{index + 1}.1", f"10.98.{index + 1}.2"


def connects(ns: NetNS, host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP handshake to host:port completes from inside `ns`."""
    sock = ns.socket()
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def grpc_counts(text: str) -> dict[str, float]:
    """etcd's gRPC calls started, by method, from its /metrics page."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'grpc_server_started_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)', line)
        if match:
            counts[match[1]] = counts.get(match[1], 0.0) + float(match[2])
    return counts


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


class Fleet:
    """The namespaces, etcd and the nodes; all gone on exit."""

    def __init__(self, stack: contextlib.ExitStack, nodes: int, tmp: Path) -> None:
        self.store = stack.enter_context(NetNS(prefix="bench-fleet-etcd"))
        self.nodes = [stack.enter_context(NetNS(prefix="bench-fleet-node")) for _ in range(nodes)]
        for index, ns in enumerate(self.nodes):
            here, there = node_address(index)
            self.store.veth(ns, addresses=(f"{here}/24",), other_addresses=(f"{there}/24",))
        self.tmp = tmp
        self.procs: list[subprocess.Popen[Any]] = []
        self.logs: list[Path] = []

    def start_etcd(self) -> None:
        urls = ",".join(
            f"http://{host}:{CLIENT_PORT}"
            for host in ["127.0.0.1"] + [node_address(i)[0] for i in range(len(self.nodes))]
        )
        log = (self.tmp / "etcd.log").open("wb")
        self.store.popen(
            [
                "etcd", "--name", "bench", "--data-dir", str(self.tmp / "etcd"),
                "--listen-client-urls", urls,
                "--advertise-client-urls", f"http://127.0.0.1:{CLIENT_PORT}",
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "bench=http://127.0.0.1:2380",
                "--log-level", "warn", "--max-txn-ops", "5000",
                "--max-request-bytes", str(16 * 1024 * 1024),
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.store.call(self._healthy):
            if time.monotonic() > deadline:
                raise SystemExit("etcd did not start:\n" + (self.tmp / "etcd.log").read_text())
            time.sleep(0.1)

    @staticmethod
    def _healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{CLIENT_PORT}/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        def read() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{CLIENT_PORT}/metrics", timeout=5) as r:
                return r.read().decode()

        return grpc_counts(self.store.call(read))

    def ctl(self, *argv: str) -> float:
        """Run tcpproxyctl in the etcd namespace; its wall time in seconds."""
        url = f"etcd://127.0.0.1:{CLIENT_PORT}{PREFIX}"
        command = [sys.executable, "-m", "tcpproxy.fleet.ctl", "--etcd", url, *argv]
        started = time.perf_counter()
        proc = self.store.popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"tcpproxyctl {' '.join(argv)} failed:\n{output.decode()}")
        return time.perf_counter() - started

    def start_node(self, index: int, sample: list[int]) -> float:
        """Start node `index`; seconds until every port of `sample` serves."""
        ns = self.nodes[index]
        here, _ = node_address(index)
        log = self.tmp / f"node{index}.log"
        self.logs.append(log)
        argv = [
            sys.executable, "-m", "bpfproxy", "-p", str(LISTEN_PORT),
            "--config", f"etcd://{here}:{CLIENT_PORT}{PREFIX}", "--node-id", f"node{index}",
        ]  # fmt: skip
        started = time.perf_counter()
        proc = ns.popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        pending = list(sample)
        deadline = time.monotonic() + START_TIMEOUT
        while pending:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"node{index} did not serve:\n{log.read_text()}")
            if connects(ns, "127.0.0.1", pending[0], timeout=0.2):
                pending.pop(0)
            else:
                time.sleep(POLL)
        return time.perf_counter() - started

    def rss_mb(self) -> list[float]:
        sizes = []
        for proc in self.procs:  # `ip netns exec` execs the proxy: the same pid
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return sizes


async def wait_serving(ns: NetNS, port: int, deadline: float) -> float:
    """Poll until `port` serves in `ns`; the monotonic time it first did."""
    while time.monotonic() < deadline:
        if await trio.to_thread.run_sync(connects, ns, "127.0.0.1", port, 0.2):
            return time.monotonic()
        await trio.sleep(POLL)
    raise SystemExit(f"port {port} not served within {PROPAGATION_TIMEOUT} s in {ns.name}")


async def served_at(times: list[float], i: int, ns: NetNS, port: int, started: float) -> None:
    """times[i]: seconds from `started` until `port` serves in `ns`."""
    times[i] = await wait_serving(ns, port, started + PROPAGATION_TIMEOUT) - started


async def push_rounds(
    fleet: Fleet, apps: int, ports_per_app: int, pushes: int
) -> list[list[float]]:
    """Each round: move one port of one app to a spare port; per node, seconds until it serves."""
    target = parse_etcd_url(f"etcd://127.0.0.1:{CLIENT_PORT}{PREFIX}")
    rounds = []
    async with EtcdClient(target) as client:
        for round_ in range(pushes):
            index = (round_ * 997) % apps  # spread over the apps
            app = app_object(index, ports_per_app)
            app["Ports"][0] = SPARE_PORT + round_
            value = json.dumps(app, sort_keys=True).encode()
            times: list[float] = [0.0] * len(fleet.nodes)
            started = time.monotonic()
            await client.put(f"{PREFIX}/apps/app{index:04d}", value)

            async with trio.open_nursery() as nursery:
                for i, ns in enumerate(fleet.nodes):
                    nursery.start_soon(served_at, times, i, ns, SPARE_PORT + round_, started)
            rounds.append(times)
            await trio.sleep(0.05)
    return rounds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def fleet_setup(nodes: int) -> Iterator[Fleet]:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp, contextlib.ExitStack() as stack:
        yield Fleet(stack, nodes, Path(tmp))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--ports-per-app", type=int, default=20)
    parser.add_argument("--pushes", type=int, default=50)
    args = parser.parse_args()
    with fleet_setup(args.nodes) as fleet:
        fleet.start_etcd()
        config = {
            "Apps": [
                {"Name": f"app{i:04d}", **app_object(i, args.ports_per_app)}
                for i in range(args.apps)
            ]
        }
        path = fleet.tmp / "fleet.json"
        path.write_text(json.dumps(config))
        path.chmod(0o644)
        push_all = fleet.ctl("push", str(path))
        sample = [FIRST_PORT + i * args.ports_per_app + (i % args.ports_per_app)
                  for i in range(0, args.apps, max(1, args.apps // 50))]  # fmt: skip
        sample.append(FIRST_PORT + args.apps * args.ports_per_app - 1)
        cold = [fleet.start_node(i, sample) for i in range(len(fleet.nodes))]
        time.sleep(2.0)  # settle: node records published, first keep-alives sent
        idle_before = fleet.metrics()
        idle_started = time.monotonic()
        rounds = fleet.store.call(  # the client's sockets: in etcd's namespace
            trio.run, push_rounds, fleet, args.apps, args.ports_per_app, args.pushes
        )
        window = time.monotonic() - idle_started
        busy = delta(fleet.metrics(), idle_before)
        quiet_before = fleet.metrics()
        time.sleep(window)
        idle = delta(fleet.metrics(), quiet_before)
        rss = fleet.rss_mb()
    every = [max(times) for times in rounds]
    each = [t for times in rounds for t in times]
    per_change = {m: (busy.get(m, 0.0) - idle.get(m, 0.0)) / args.pushes for m in busy}
    ports = args.apps * args.ports_per_app
    print(f"fleet: {args.nodes} bpfproxy nodes, {args.apps} apps x {args.ports_per_app} ports "
          f"({ports} ports), etcd 1 member")  # fmt: skip
    print(f"  tcpproxyctl push of the whole config: {push_all:.2f} s")
    print("  cold start (etcd -> serving): " + ", ".join(f"{t:.2f}" for t in cold)
          + f" s (max {max(cold):.2f})")  # fmt: skip
    print(f"  propagation to every node over {args.pushes} changes: "
          f"p50 {percentile(every, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(every, 0.99) * 1000:.0f} ms, "
          f"max {max(every) * 1000:.0f} ms; any one node: p50 "
          f"{statistics.median(each) * 1000:.0f} ms")  # fmt: skip
    print("  RSS per node: " + ", ".join(f"{mb:.1f}" for mb in rss) + " MB")
    print("  etcd requests per change (gRPC calls started, less idle): "
          + ", ".join(f"{m} {n:.1f}" for m, n in sorted(per_change.items()) if round(n, 1))
          + f"; total {sum(per_change.values()):.1f}")  # fmt: skip
    failures = []
    if percentile(every, 0.99) >= 1.0:
        failures.append(f"p99 propagation {percentile(every, 0.99):.2f} s >= 1 s")
    if max(cold) >= 3.0:
        failures.append(f"cold start {max(cold):.2f} s >= 3 s")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
