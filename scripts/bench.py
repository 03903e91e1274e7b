"""`make bench`: us against HAProxy and against no proxy at all, in one run.

Everything runs inside a network namespace this script creates (so bpfproxy
can steer ports without touching the machine's own) and removes at the end.
Backends and load tools are Debian's: sockperf (latency), iperf3
(throughput), wrk against nginx with `Connection: close` (new connections
per second), and nginx keep-alive connections for memory per idle
connection. Each figure is measured for direct, HAProxy, tcpproxy and
bpfproxy, in alternating rounds; medians are reported.

    sudo .venv/bin/python scripts/bench.py [--rounds 3] [--seconds 4] [--idle 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns import NetNS  # noqa: E402

# Backend ports, and each proxy's front ports (base + backend-specific offset).
SOCKPERF, IPERF, HTTP = 11111, 5201, 8080
FRONT_BASE = {"direct": 0, "haproxy": 20000, "tcpproxy": 30000, "bpfproxy": 40000}
SERVICES = {"latency": SOCKPERF, "throughput": IPERF, "http": HTTP}
BPF_LISTEN = 8000
MODES = ["direct", "haproxy", "tcpproxy", "bpfproxy"]


def port_of(mode: str, service: str) -> int:
    return SERVICES[service] + FRONT_BASE[mode]


@dataclass
class Results:
    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, mode: str, metric: str, value: float) -> None:
        self.rows.setdefault(mode, {}).setdefault(metric, []).append(value)

    def median(self, mode: str, metric: str) -> float | None:
        values = self.rows.get(mode, {}).get(metric)
        return statistics.median(values) if values else None


class Bench:
    def __init__(self, ns: NetNS, workdir: Path, seconds: float, workers: int | None) -> None:
        self.ns = ns
        self.workdir = workdir
        self.seconds = seconds
        self.workers = workers
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, str] = {}

    # -- processes ---------------------------------------------------------

    def spawn(self, name: str, argv: list[str], **kw: object) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs[name] = proc
        self.commands[name] = " ".join(argv)
        return proc

    def run(self, name: str, argv: list[str], timeout: float) -> str:
        self.commands[name] = " ".join(argv)
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns.name, *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.ns.socket()
            try:
                s.settimeout(1)
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        logs = "".join(
            f"\n--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}"
            for p in self.workdir.glob("*.log")
        )
        raise RuntimeError(f"nothing listens on port {port} after {timeout}s{logs}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- setup -------------------------------------------------------------

    def start_backends(self) -> None:
        www = self.workdir / "www"
        www.mkdir()
        (www / "index.html").write_text("ok\n")
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            f"""daemon off; worker_processes 1; pid {self.workdir}/nginx.pid;
worker_rlimit_nofile 20000; error_log {self.workdir}/nginx-error.log;
events {{ worker_connections 19000; }}
http {{ access_log off; keepalive_timeout 600s; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{HTTP} backlog=4096; root {www}; }} }}
"""
        )
        self.spawn("nginx", ["nginx", "-c", str(conf)])
        self.spawn("sockperf", ["sockperf", "sr", "--tcp", "-i", "127.0.0.1", "-p", str(SOCKPERF)])
        self.spawn("iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF)])
        for port in SERVICES.values():
            self.wait_port(port)

    def start_haproxy(self) -> None:
        threads = os.cpu_count() or 1
        lines = [
            "global",
            f"  nbthread {threads}",
            f"  maxconn {haproxy_maxconn()}",
            "defaults",
            "  mode tcp",
            "  option splice-auto",
            "  timeout connect 2s",
            "  timeout client 1h",
            "  timeout server 1h",
        ]
        for service, port in SERVICES.items():
            lines += [
                f"listen {service}",
                f"  bind 127.0.0.1:{port_of('haproxy', service)}",
                f"  server s1 127.0.0.1:{port}",
            ]
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        self.spawn("haproxy", ["haproxy", "-W", "-f", str(cfg)])
        for service in SERVICES:
            self.wait_port(port_of("haproxy", service))

    def write_config(self, mode: str) -> Path:
        apps = [
            {
                "Name": service,
                "Ports": [port_of(mode, service)],
                "Targets": [f"127.0.0.1:{port}"],
                "MaxConnections": 1_000_000,  # as HAProxy here: only the process limit
            }
            for service, port in SERVICES.items()
        ]
        path = self.workdir / f"{mode}.json"
        path.write_text(json.dumps({"Apps": apps}))
        return path

    def start_ours(self, mode: str) -> None:
        argv = [sys.executable, "-m", mode, "--config", str(self.write_config(mode)),
                "--log-level", "error", "--max-connections", str(haproxy_maxconn())]  # fmt: skip
        if mode == "bpfproxy":
            argv += ["-p", str(BPF_LISTEN)]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        self.spawn(mode, argv, cwd=str(ROOT))
        for service in SERVICES:
            self.wait_port(port_of(mode, service))

    # -- measurements ----------------------------------------------------------

    def latency(self, mode: str) -> tuple[float, float]:
        out = self.run(
            "sockperf ping-pong",
            ["sockperf", "pp", "--tcp", "-i", "127.0.0.1", "-p", str(port_of(mode, "latency")),
             "-m", "64", "-t", str(int(self.seconds))],
            timeout=self.seconds + 30,
        )  # fmt: skip
        p50 = float(re.search(r"percentile 50\.000 =\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p99 = float(re.search(r"percentile 99\.000 =\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
        return p50, p99

    def throughput(self, mode: str) -> float:
        out = self.run(
            "iperf3",
            ["iperf3", "-c", "127.0.0.1", "-p", str(port_of(mode, "throughput")),
             "-t", str(int(self.seconds)), "-J"],
            timeout=self.seconds + 30,
        )  # fmt: skip
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9

    def connections_per_second(self, mode: str) -> float:
        out = self.run(
            "wrk",
            ["wrk", "-t", "2", "-c", "32", "-d", f"{int(self.seconds)}s",
             "-H", "Connection: close", f"http://127.0.0.1:{port_of(mode, 'http')}/"],
            timeout=self.seconds + 30,
        )  # fmt: skip
        return float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def rss_kib(self, mode: str) -> int:
        """RSS of the proxy's processes (all workers), in KiB."""
        root = self.procs[mode].pid
        pids = [root, *_descendants(root)]
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except FileNotFoundError:
                pass
        return total

    def idle_memory(self, mode: str, count: int) -> float:
        """KiB of proxy RSS per idle proxied connection (keep-alive to nginx)."""
        port = port_of(mode, "http")
        before = self.rss_kib(mode)
        socks = []
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            for _ in range(count):
                s = self.ns.socket()
                s.connect(("127.0.0.1", port))
                socks.append(s)
            for s in socks:  # one request each, so every connection reached nginx
                s.sendall(request)
            for s in socks:
                s.settimeout(10)
                if not s.recv(4096).startswith(b"HTTP/1.1 200"):
                    raise RuntimeError("bad answer through the proxy")
            time.sleep(1.0)
            after = self.rss_kib(mode)
        finally:
            for s in socks:
                s.close()
        return (after - before) / count


def haproxy_maxconn() -> int:
    """HAProxy refuses to start unless maxconn fits the descriptor limit: two
    sockets per connection plus a pipe (two fds) per four connections."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1000) * 2 // 5


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    children = [int(p) for p in out.stdout.split()]
    return children + [d for c in children for d in _descendants(c)]


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    from tcpproxy import __version__

    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tcpproxy": __version__,
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "sockperf": first_line(["sockperf", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "wrk": first_line(["wrk", "--version"]),
    }


METRICS = [
    ("p50", "p50 latency (µs)", "{:.1f}"),
    ("p99", "p99 latency (µs)", "{:.1f}"),
    ("gbps", "throughput (Gbit/s)", "{:.2f}"),
    ("cps", "new conn/s", "{:,.0f}"),
    ("kib_per_conn", "KiB per idle conn", "{:.1f}"),
]


def table(results: Results) -> str:
    head = "| | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for mode in MODES:
        cells = []
        for key, _, fmt in METRICS:
            value = results.median(mode, key)
            cells.append("—" if value is None else fmt.format(value))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("p50", True), ("p99", True), ("gbps", False), ("cps", False)]
    labels = ["p50 latency", "p99 latency", "throughput", "new conn/s"]
    proxies = ["haproxy", "tcpproxy", "bpfproxy"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.25
    for i, mode in enumerate(proxies):
        ratios = []
        for key, lower_is_better in keys:
            direct, ours = results.median("direct", key), results.median(mode, key)
            if not direct or not ours:
                ratios.append(0.0)
            else:  # always "fraction of direct's performance": 1.0 is as good as no proxy
                ratios.append(direct / ours if lower_is_better else ours / direct)
        ax.bar([x + i * width for x in range(len(keys))], ratios, width, label=mode)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([x + width for x in range(len(keys))], labels)
    ax.set_ylabel("performance relative to direct (1.0 = no proxy)")
    ax.set_title("Each proxy as a fraction of a direct connection (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _portable(command: str, workdir: Path) -> str:
    """A command as anyone can read it: no paths of this machine, ports generic."""
    command = command.replace(sys.executable, "python").replace(str(workdir), "$WORK")
    for mode in MODES[1:]:
        for service in SERVICES:
            command = command.replace(f"127.0.0.1:{port_of(mode, service)}", "127.0.0.1:$PORT")
            command = re.sub(rf"-p {port_of(mode, service)}\b", "-p $PORT", command)
    return command


def write_report(results: Results, bench: Bench, args: argparse.Namespace, elapsed: float) -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    chart(results, docs / "benchmarks.png")
    v = versions()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    commands = "\n".join(
        f"{name}: {_portable(cmd, bench.workdir)}" for name, cmd in sorted(bench.commands.items())
    )
    ports = ", ".join(
        f"{mode} {' / '.join(str(port_of(mode, s)) for s in SERVICES)}" for mode in MODES
    )
    text = f"""# Benchmarks

Made by `make bench` (`scripts/bench.py`) on {time.strftime("%Y-%m-%d")}; it took
{elapsed:.0f} s. {args.rounds} rounds, each figure measured for {args.seconds:g} s
per proxy per round, proxies alternating within a round; the table shows medians.
Latency is sockperf's (half the round trip, 64-byte messages); throughput is one
iperf3 stream; new connections per second is wrk with `Connection: close`
against nginx (every request a new TCP connection through the proxy); memory is
the proxies' RSS growth while holding {args.idle:,} idle keep-alive connections
to nginx, per connection.

{table(results)}

![each proxy as a fraction of direct](benchmarks.png)

## Machine

- CPU: {cpu}, {os.cpu_count()} cores; memory {memory_gib} GiB
- {", ".join(f"{k} {val}" for k, val in v.items())}
- everything on loopback inside one network namespace; HAProxy with `nbthread`
  = cores, `mode tcp`, `option splice-auto`; tcpproxy/bpfproxy with
  {"--workers " + str(args.workers) if args.workers else "their default workers"}

## Commands

`$WORK` is a temporary directory; `$PORT` is the front port of the mode
measured (latency / throughput / http): {ports}.

```text
{commands}
```
"""
    (docs / "benchmarks.md").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark direct, HAProxy, tcpproxy, bpfproxy.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--idle", type=int, default=10000, help="idle connections for memory")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-report", action="store_true", help="print only; write no docs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespace, bpfproxy)", file=sys.stderr)
        return 2
    missing = [t for t in ("sockperf", "iperf3", "wrk", "nginx", "haproxy") if not shutil.which(t)]
    if missing:
        print(
            f"bench: missing tools: {' '.join(missing)} (make bench installs them)", file=sys.stderr
        )
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Without CAP_SYS_RESOURCE the hard limit caps how many connections
    # HAProxy (one process) can hold; hold the same number through every proxy.
    cap = haproxy_maxconn() - 100
    if args.idle > cap:
        print(f"bench: descriptor limit {hard}: holding {cap} idle connections, "
              f"not {args.idle}", file=sys.stderr)  # fmt: skip
        args.idle = cap
    modes = args.modes.split(",")
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, NetNS(prefix="bench") as ns:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # nginx workers run as www-data
        bench = Bench(ns, workdir, args.seconds, args.workers)
        try:
            bench.start_backends()
            if "haproxy" in modes:
                bench.start_haproxy()
            for mode in modes:
                if mode in ("tcpproxy", "bpfproxy"):
                    bench.start_ours(mode)
            for r in range(args.rounds):
                for mode in modes:
                    p50, p99 = bench.latency(mode)
                    results.add(mode, "p50", p50)
                    results.add(mode, "p99", p99)
                    results.add(mode, "gbps", bench.throughput(mode))
                    results.add(mode, "cps", bench.connections_per_second(mode))
                    print(f"round {r + 1} {mode}: p50 {p50:.1f} µs, p99 {p99:.1f} µs, "
                          f"{results.rows[mode]['gbps'][-1]:.2f} Gbit/s, "
                          f"{results.rows[mode]['cps'][-1]:,.0f} conn/s", flush=True)  # fmt: skip
            for mode in modes:
                if mode != "direct" and args.idle:
                    per = bench.idle_memory(mode, args.idle)
                    results.add(mode, "kib_per_conn", per)
                    print(f"{mode}: {per:.1f} KiB per idle connection", flush=True)
        finally:
            bench.stop_all()
        print()
        print(table(results))
        if not args.no_report:
            write_report(results, bench, args, time.monotonic() - started)
            print("\nwrote docs/benchmarks.md and docs/benchmarks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
