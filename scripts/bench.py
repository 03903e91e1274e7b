"""`make bench`: us against HAProxy and against no proxy at all, in one run.

Everything runs inside a network namespace this script creates (so bpfproxy
can steer ports without touching the machine's own) and removes at the end.
Backends and load tools are Debian's: sockperf (latency), iperf3
(throughput, 1 and 4 streams), wrk against nginx with `Connection: close`
(new connections per second), and nginx keep-alive connections for memory
per idle connection. The proxies' CPU time is read from /proc around the
wrk and the 1-stream iperf3 runs, user and kernel time apart. Each figure
is measured for direct, HAProxy, tcpproxy, bpfproxy, tcpproxy interpreted
(`TCPPROXY_INTERPRETED=1`, unless `--no-interpreted`) and any `--variant`,
in alternating rounds; medians are reported. The parsing and the table are
in bench_report.py.

    sudo .venv/bin/python scripts/bench.py [--rounds 3] [--seconds 4] [--idle 10000]
        [--workers N] [--no-interpreted] [--variant NAME=BINARY:ARGS ...]
        [--proxy-cpus LIST --load-cpus LIST] [--modes ...] [--measure ...]
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_sni  # noqa: E402 - a sibling module too
from bench_report import (  # noqa: E402 - a sibling module, importable once the script runs
    HAND_WRITTEN,
    HAPROXY,
    METRICS,
    OURS,
    Results,
    Variant,
    build_of,
    builds_line,
    core_percent_per_gbps,
    cpu_ticks,
    cpu_us_per_connection,
    default_variants,
    direction_note,
    invocation,
    keep_hand_written,
    parse_cpu_list,
    parse_iperf3,
    parse_sockperf,
    parse_variant,
    parse_wrk,
    rss_kib,
    table,
    wrk_errors,
)

from tcpproxy.build_info import interpreted_requested  # noqa: E402
from tests.hellos import client_hello, records  # noqa: E402
from tests.netns import NetNS  # noqa: E402

# Backend ports; a proxy's front ports are FRONT_BASE + FRONT_STEP * its index + the service's.
SOCKPERF, IPERF, HTTP = 11111, 5201, 8080
SERVICES = {"latency": SOCKPERF, "throughput": IPERF, "http": HTTP}
FRONT_BASE, FRONT_STEP = 20000, 100
BPF_LISTEN = 8000  # bpfproxy's -p; + the mode's index, so variants do not collide
MODES = ["direct", HAPROXY, "tcpproxy", "bpfproxy"]
MEASURES = ["latency", "throughput", "connections", "idle", "sni"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOOL_GRACE = 30  # seconds a load tool may take beyond its run before it counts as hung
VERSION_TIMEOUT = 30  # seconds `BINARY --version` may take (imports the package; a busy box)


@dataclass(frozen=True)
class ConnectionCost:
    """The proxy's CPU over a wrk run: µs per connection, user and kernel, and cores busy."""

    user_us: float
    kernel_us: float
    cores: float


@dataclass(frozen=True)
class Mode:
    """One row of the table: how to reach the backends through it, and how to start it."""

    name: str
    index: int
    binary: str | None  # None: direct, no proxy
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # a variant's environment variables

    def port(self, service: str) -> int:
        if self.binary is None:
            return SERVICES[service]
        return FRONT_BASE + FRONT_STEP * self.index + list(SERVICES).index(service)

    @property
    def slug(self) -> str:
        """The name as a file name: `tcpproxy (interpreted)` -> `tcpproxy-interpreted`."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")


def all_modes(variants: list[Variant]) -> dict[str, Mode]:
    modes = [Mode(name, i, None if name == "direct" else name) for i, name in enumerate(MODES)]
    modes += [Mode(v.name, len(MODES) + i, v.binary, v.args, v.env) for i, v in enumerate(variants)]
    return {m.name: m for m in modes}


class Bench:
    def __init__(self, ns: NetNS, workdir: Path, args: argparse.Namespace) -> None:
        self.ns = ns
        self.workdir = workdir
        self.args = args
        self.seconds = int(args.seconds)
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, str] = {}

    # -- processes ---------------------------------------------------------

    def pinned(self, argv: list[str], cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus, *argv] if cpus else argv

    def spawn(self, name: str, argv: list[str], **kw: object) -> subprocess.Popen:
        log = open(self.workdir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs[name] = proc
        self.commands[name] = " ".join(argv)
        return proc

    def run(self, name: str, argv: list[str]) -> str:
        argv = self.pinned(argv, self.args.load_cpus)
        self.commands[name] = " ".join(argv)
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns.name, *argv],
            capture_output=True, text=True, timeout=self.seconds + TOOL_GRACE, check=False,
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

    def pids(self, mode: Mode) -> list[int]:
        """The proxy's processes: the one started and its descendants (workers, HAProxy's)."""
        root = self.procs[mode.name].pid
        return [root, *_descendants(root)]

    def cpu_seconds(self, mode: Mode) -> tuple[float, float]:
        """User and kernel CPU time so far of every process (and thread) of the proxy."""
        user = kernel = 0
        for pid in self.pids(mode):
            try:
                utime, stime = cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
            except (FileNotFoundError, ProcessLookupError):
                continue  # a process that ended between the listing and the read
            user, kernel = user + utime, kernel + stime
        return user / CLK_TCK, kernel / CLK_TCK

    def rss_kib(self, mode: Mode) -> int:
        """RSS of the proxy's processes together, in KiB."""
        total = 0
        for pid in self.pids(mode):
            try:
                total += rss_kib(Path(f"/proc/{pid}/status").read_text())
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

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
        load = self.args.load_cpus
        self.spawn("nginx", self.pinned(["nginx", "-c", str(conf)], load))
        self.spawn("sockperf server", self.pinned(
            ["sockperf", "sr", "--tcp", "-i", "127.0.0.1", "-p", str(SOCKPERF)], load))  # fmt: skip
        self.spawn("iperf3 server", self.pinned(
            ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF)], load))  # fmt: skip
        for port in SERVICES.values():
            self.wait_port(port)

    def start_haproxy(self, mode: Mode) -> None:
        cpus = self.args.proxy_cpus
        threads = len(parse_cpu_list(cpus)) if cpus else os.cpu_count() or 1
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
                f"  bind 127.0.0.1:{mode.port(service)}",
                f"  server s1 127.0.0.1:{port}",
            ]
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        self.spawn(mode.name, self.pinned(["haproxy", "-W", "-f", str(cfg)], cpus))
        for service in SERVICES:
            self.wait_port(mode.port(service))

    def write_config(self, mode: Mode) -> Path:
        apps = [
            {
                "Name": service,
                "Ports": [mode.port(service)],
                "Targets": [f"127.0.0.1:{port}"],
                "MaxConnections": 1_000_000,  # as HAProxy here: only the process limit
            }
            for service, port in SERVICES.items()
        ]
        path = self.workdir / f"{mode.slug}.json"
        path.write_text(json.dumps({"Apps": apps}))
        return path

    def start_ours(self, mode: Mode) -> None:
        assert mode.binary is not None
        argv = [sys.executable, "-m", mode.binary, "--config", str(self.write_config(mode)),
                "--log-level", "error", "--max-connections", str(haproxy_maxconn())]  # fmt: skip
        if mode.binary == "bpfproxy":
            argv += ["-p", str(BPF_LISTEN + mode.index)]
        if self.args.workers is not None:
            argv += ["--workers", str(self.args.workers)]
        argv += mode.args  # last, so a variant's arguments win
        env = {**os.environ, **dict(mode.env)}
        self.spawn(mode.name, self.pinned(argv, self.args.proxy_cpus), cwd=str(ROOT), env=env)
        if mode.env:
            variables = " ".join(f"{key}={value}" for key, value in mode.env)
            self.commands[mode.name] = f"{variables} {self.commands[mode.name]}"
        for service in SERVICES:
            self.wait_port(mode.port(service))

    # -- measurements ----------------------------------------------------------

    def latency(self, mode: Mode) -> tuple[float, float]:
        out = self.run(
            "sockperf ping-pong",
            ["sockperf", "pp", "--tcp", "-i", "127.0.0.1", "-p", str(mode.port("latency")),
             "-m", "64", "-t", str(self.seconds)],
        )  # fmt: skip
        return parse_sockperf(out)

    def throughput(self, mode: Mode, streams: int) -> tuple[float, float | None]:
        """Gbit/s, and the proxy's percent of a core per Gbit/s during the run."""
        name = "iperf3 1 stream" if streams == 1 else f"iperf3 {streams} streams"
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(mode.port("throughput")),
                "-t", str(self.seconds), "-J"]  # fmt: skip
        if streams > 1:
            argv += ["-P", str(streams)]
        before = sum(self.cpu_seconds(mode)) if mode.binary else 0.0
        out = self.run(name, argv)
        gbps, gigabits = parse_iperf3(out)
        if not mode.binary:
            return gbps, None
        return gbps, core_percent_per_gbps(sum(self.cpu_seconds(mode)) - before, gigabits)

    def connections(self, mode: Mode) -> tuple[float, ConnectionCost | None]:
        """New connections per second; what they cost the proxy (None: direct)."""
        before, started = (self.cpu_seconds(mode) if mode.binary else (0.0, 0.0)), time.monotonic()
        out = self.run(
            "wrk",
            ["wrk", "-t", "2", "-c", "32", "-d", f"{self.seconds}s",
             "-H", "Connection: close", f"http://127.0.0.1:{mode.port('http')}/"],
        )  # fmt: skip
        rate, count = parse_wrk(out)
        if wrk_errors(out):
            print(f"wrk through {mode.name}: {wrk_errors(out)}", flush=True)
        if not mode.binary or not count:
            return rate, None
        (user, kernel), (user_before, kernel_before) = self.cpu_seconds(mode), before
        user, kernel = user - user_before, kernel - kernel_before
        return rate, ConnectionCost(
            user_us=cpu_us_per_connection(user, count) or 0.0,
            kernel_us=cpu_us_per_connection(kernel, count) or 0.0,
            cores=(user + kernel) / (time.monotonic() - started),
        )

    def idle_memory(self, mode: Mode, count: int) -> float:
        """KiB of proxy RSS per idle proxied connection (keep-alive to nginx)."""
        port = mode.port("http")
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


class SniBench:
    """The TLS-by-SNI row (scripts/bench_sni.py): its backends, a proxy of each mode
    serving the shared port, the load; measured after the other figures, same run.

    Each mode's proxy for it is a process of its own (named "MODE sni"), so the
    other figures' proxies and configs stay as they are.
    """

    def __init__(self, bench: Bench, modes: list[Mode]) -> None:
        self.bench = bench
        self.modes = modes
        self.binary = str(bench.workdir / "bench_hello")
        self.hellos: dict[str, str] = {}

    def proxy(self, mode: Mode) -> Mode:
        """`mode` as its shared-port process: what Bench.cpu_seconds reads."""
        return Mode(f"{mode.name} sni", mode.index, mode.binary, mode.args, mode.env)

    def port(self, mode: Mode, which: int) -> int:
        return FRONT_BASE + FRONT_STEP * mode.index + which

    def start(self) -> None:
        bench, workdir = self.bench, self.bench.workdir
        source = ROOT / "scripts" / "bench_hello.c"
        subprocess.run(["gcc", "-O2", "-o", self.binary, str(source)], check=True, timeout=120)
        for name in bench_sni.names():
            path = workdir / f"hello-{name}.bin"
            path.write_bytes(records(client_hello(name.encode())))  # one record, ~1.7 KB
            self.hellos[name] = str(path)
        load, cpus = bench.args.load_cpus, bench.args.proxy_cpus
        bench.spawn("bench_hello server", bench.pinned(bench_sni.server_argv(self.binary), load))
        for backend in bench_sni.BACKENDS:
            bench.wait_port(bench_sni.backend_port(backend))
        for mode in self.modes:
            if mode.binary is None:
                continue
            shared, plain = self.port(mode, bench_sni.SHARED), self.port(mode, bench_sni.PLAIN)
            name = self.proxy(mode).name
            if mode.binary == HAPROXY:
                threads = len(parse_cpu_list(cpus)) if cpus else os.cpu_count() or 1
                cfg = workdir / "haproxy-sni.cfg"
                cfg.write_text(bench_sni.haproxy_config(shared, plain, threads, haproxy_maxconn()))
                bench.spawn(name, bench.pinned(["haproxy", "-W", "-f", str(cfg)], cpus))
            else:
                config = workdir / f"{mode.slug}-sni.json"
                config.write_text(json.dumps(bench_sni.ours_config(shared, plain)))
                argv = [sys.executable, "-m", mode.binary, "--config", str(config), "--log-level",
                        "error", "--max-connections", str(haproxy_maxconn())]  # fmt: skip
                if mode.binary == "bpfproxy":
                    argv += ["-p", str(BPF_LISTEN + FRONT_STEP // 2 + mode.index)]
                if bench.args.workers is not None:
                    argv += ["--workers", str(bench.args.workers)]
                argv += mode.args
                env = {**os.environ, **dict(mode.env)}
                bench.spawn(name, bench.pinned(argv, cpus), cwd=str(ROOT), env=env)
            bench.wait_port(shared)
            bench.wait_port(plain)

    def load(self, mode: Mode, *, plain: bool) -> tuple[float, ConnectionCost | None]:
        """New conn/s with a hello each through `mode` (its shared port, or `plain`: the
        port not inspected), and their cost to the proxy."""
        bench, proxy = self.bench, self.proxy(mode)
        port = None
        if mode.binary:
            port = self.port(mode, bench_sni.PLAIN if plain else bench_sni.SHARED)
        argv = bench_sni.client_argv(self.binary, bench.seconds, self.hellos, port, plain=plain)
        before = bench.cpu_seconds(proxy) if mode.binary else (0.0, 0.0)
        started = time.monotonic()
        out = bench.run("bench_hello client" + (" (not inspected)" if plain else ""), argv)
        rate, count, errors = bench_sni.parse_client(out)
        if errors:
            print(f"bench_hello through {mode.name}: {errors} errors", flush=True)
        if not mode.binary or not count:
            return rate, None
        (user, kernel), (user_before, kernel_before) = bench.cpu_seconds(proxy), before
        user, kernel = user - user_before, kernel - kernel_before
        return rate, ConnectionCost(
            user_us=cpu_us_per_connection(user, count) or 0.0,
            kernel_us=cpu_us_per_connection(kernel, count) or 0.0,
            cores=(user + kernel) / (time.monotonic() - started),
        )

    def measure_round(self, results: Results, mode: Mode) -> str:
        said = []
        for plain, keys in ((False, bench_sni.SNI_KEYS), (True, bench_sni.PLAIN_KEYS)):
            if plain and not mode.binary:
                continue  # direct has no port to inspect or not
            rate, cost = self.load(mode, plain=plain)
            results.add(mode.name, keys[0], rate)
            line = f"{rate:,.0f} conn/s"
            if cost is not None:
                total = cost.user_us + cost.kernel_us
                for key, value in zip(keys[1:], (total, cost.user_us, cost.kernel_us), strict=True):
                    results.add(mode.name, key, value)
                line += f", {total:.0f} CPU µs/conn ({cost.user_us:.0f} + {cost.kernel_us:.0f})"
            said.append(("not inspected: " if plain else "TLS by SNI: ") + line)
        return "; ".join(said)


def sni_section(results: Results, modes: list[str]) -> str:
    """The report's section for the TLS-by-SNI row, or '' when it was not measured."""
    if not any(results.median(mode, "sni_cps") for mode in modes):
        return ""
    return f"""
## TLS routed by SNI on a shared port (issue 19)

{bench_sni.table(results, modes)}

In brackets: the ratio to HAProxy's figure. The shared port has three apps
with `Hostnames` (`a.test`, `b.test`, `c.test`) and a default; HAProxy has
the same in `mode tcp` with `tcp-request inspect-delay {bench_sni.INSPECT_DELAY}s`,
`tcp-request content accept if {{ req.ssl_hello_type 1 }}` and a
`use_backend ... if {{ req.ssl_sni -i NAME }}` per name. The load
(`scripts/bench_hello.c`, C, one thread, epoll, {bench_sni.CONCURRENCY} connections at once) sends
each connection a browser-shaped ClientHello (GREASE, a post-quantum key
share, ECH GREASE: about 1.7 KB, one record) for `a.test`, `b.test`,
`c.test` or `{bench_sni.OTHER}` (no app's: the default) in turn; the backend
reads the hello, answers its own name and closes, and a connection counts
only if it reached the backend its name picks. No TLS handshake follows: the
crypto of a real one (nginx and a TLS client on the same two cores) would
cost several times the proxy's work per connection and bury it, while a
routing proxy never sees it. The columns "port not inspected" send the same
hellos to a port one app owns without `Hostnames`, in the same process: the
difference is what reading the hello and choosing by it costs. CPU is read
as in the main table, over each load run.
"""


def haproxy_maxconn() -> int:
    """HAProxy refuses to start unless maxconn fits the descriptor limit: two
    sockets per connection plus a pipe (two fds) per four connections."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1000) * 2 // 5


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    children = [int(p) for p in out.stdout.split()]
    return children + [d for c in children for d in _descendants(c)]


def build(mode: Mode) -> str:
    """The build a row of ours runs, as its binary says with the row's environment.

    Raises:
        ValueError: the binary failed or said something else.
    """
    assert mode.binary is not None
    out = subprocess.run(
        [sys.executable, "-m", mode.binary, "--version"], capture_output=True, text=True,
        cwd=str(ROOT), env={**os.environ, **dict(mode.env)}, timeout=VERSION_TIMEOUT, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise ValueError(f"{mode.binary} --version failed ({out.returncode}): {out.stderr[-500:]}")
    return build_of(out.stdout)


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
        "tcpproxy": __version__,  # the build each row ran: write_report's "builds"
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "sockperf": first_line(["sockperf", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "wrk": first_line(["wrk", "--version"]),
    }


def chart(results: Results, modes: list[str], path: Path) -> None:
    """Two panels, higher always better: speed as a fraction of direct, cost against HAProxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("direct", ["p50", "p99", "gbps1", "gbps4", "cps"],
         "fraction of direct's performance\n(1.0 = as fast as no proxy)"),
        (HAPROXY, ["cpu_us_per_conn", "user_us_per_conn", "kernel_us_per_conn",
                   "core_pct_per_gbps", "kib_per_conn", "rss_mib"],
         "HAProxy's cost / ours\n(above 1.0 = cheaper than HAProxy)"),
    ]  # fmt: skip
    by_key = {m.key: m for m in METRICS}
    proxies = [m for m in modes if m != "direct"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [5, 6]})
    width = 0.8 / max(1, len(proxies))
    for ax, (reference, keys, ylabel) in zip(axes, panels, strict=True):
        for i, mode in enumerate(proxies):
            ratios = []
            for key in keys:
                ref, ours = results.median(reference, key), results.median(mode, key)
                if not ref or not ours:
                    ratios.append(0.0)
                else:  # lower-is-better figures inverted, so higher is always better
                    ratios.append(ref / ours if by_key[key].lower_is_better else ours / ref)
            ax.bar([x + i * width for x in range(len(keys))], ratios, width, label=mode)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(
            [x + width * (len(proxies) - 1) / 2 for x in range(len(keys))],
            [by_key[k].label for k in keys], rotation=20, ha="right", fontsize=8,
        )  # fmt: skip
        ax.set_ylabel(ylabel)
    axes[0].set_title("Speed against a direct connection")
    axes[1].set_title("Cost against HAProxy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _portable(command: str, workdir: Path, modes: dict[str, Mode]) -> str:
    """A command as anyone can read it: no paths of this machine, ports generic."""
    command = command.replace(sys.executable, "python").replace(str(workdir), "$WORK")
    for mode in modes.values():
        if mode.binary is None:
            continue
        for service in SERVICES:
            command = command.replace(f"127.0.0.1:{mode.port(service)}", "127.0.0.1:$PORT")
            command = re.sub(rf"-p {mode.port(service)}\b", "-p $PORT", command)
    return command


def write_report(results: Results, args: argparse.Namespace, modes: dict[str, Mode]) -> None:
    run = results.modes
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    chart(results, run, docs / "benchmarks.png")
    v = versions()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    commands = "\n".join(f"{name}: {cmd}" for name, cmd in sorted(results.commands.items()))
    parts = f" in {results.parts} parts (`--results`)" if results.parts > 1 else ""
    ports = ", ".join(f"{m} {' / '.join(str(modes[m].port(s)) for s in SERVICES)}" for m in run)
    builds = builds_line(results.builds, run) or "?"
    workers = f"`--workers {args.workers}`" if args.workers else "their default workers (1)"
    pinning = (
        f"proxies pinned to CPUs {args.proxy_cpus}, load tools and backends to "
        f"{args.load_cpus} (taskset)"
        if args.proxy_cpus or args.load_cpus
        else "nothing pinned: proxies, load tools and backends share every core"
    )
    old = docs / "benchmarks.md"
    tail = keep_hand_written(old.read_text()) if old.exists() else ""
    text = f"""# Benchmarks

Made by `make bench` (`scripts/bench.py`) on {time.strftime("%Y-%m-%d")}; it took
{results.elapsed:.0f} s{parts}. Rounds: {args.rounds}, each figure measured for {args.seconds:g} s
per proxy per round, proxies alternating within a round; the table shows medians.

{table(results, run)}

{direction_note()}

![speed against direct, cost against HAProxy](benchmarks.png)

## Method

- **Latency**: sockperf ping-pong, 64-byte messages; sockperf's figure is half
  the round trip.
- **Throughput**: iperf3, one TCP stream, then four (`-P 4`); Gbit/s received.
- **New conn/s**: wrk, 2 threads, 32 connections, `Connection: close`, against
  nginx: every request is a new TCP connection through the proxy.
- **CPU µs/conn**: the proxy's CPU time (user + system, from `/proc/PID/stat`
  of every process of the proxy: supervisor and workers, HAProxy's master and
  worker; each process's figure covers all its threads) over the wrk run,
  divided by the requests wrk completed. Kernel work done in softirq context
  while the proxy's process runs is charged to it; work on other CPUs'
  softirqs (none on loopback without RPS) is not.
- **user µs/conn**, **kernel µs/conn**: the same, split: utime (the proxy's
  own code and its libraries) and stime (its syscalls and the softirq work
  charged to it), from the same runs. Each column is a median of its own, so
  the two need not add up to CPU µs/conn exactly.
- **% of a core per Gbit/s**: the proxy's CPU time during the 1-stream iperf3
  run divided by the run's time (cores busy), divided by the Gbit/s measured,
  times 100; equivalently CPU seconds per gigabit moved, times 100. 10 % means
  a core relays 10 Gbit/s.
- **KiB/idle conn**: the proxy's RSS growth while holding {args.idle:,} idle
  keep-alive connections to nginx (one request answered on each), per connection.
- **RSS MiB at rest**: the proxy's RSS, all processes together, after the
  rounds with no connection open (before the idle connections).
- CPU time: the kernel reports utime + stime scaled to the scheduler's exact
  runtime, in units of 1/{CLK_TCK} s, so a 3 s run at one core busy reads to
  about ±0.5 %. Both proxies are charged alike for loopback's softirq work.

## Machine

- CPU: {cpu}, {os.cpu_count()} cores; memory {memory_gib} GiB
- {", ".join(f"{k} {val}" for k, val in v.items())}
- builds (as `--version` says, with each row's environment): {builds}
- everything on loopback inside one network namespace; HAProxy with `nbthread`
  = cores it may use, `mode tcp`, `option splice-auto`; tcpproxy/bpfproxy with
  {workers}; {pinning}

## Commands

`$WORK` is a temporary directory; `$PORT` is the front port of the mode
measured (latency / throughput / http): {ports}.

```text
{commands}
```
"""
    text += sni_section(results, run)
    if tail:
        text += "\n" + tail
    else:
        text += f"\n{HAND_WRITTEN}\n"
    old.write_text(text)


def measure_round(bench: Bench, results: Results, mode: Mode, measures: list[str]) -> str:
    """Every figure of one round for one mode; a line saying what was measured."""
    said = []
    name = mode.name
    if "latency" in measures:
        p50, p99 = bench.latency(mode)
        results.add(name, "p50", p50)
        results.add(name, "p99", p99)
        said.append(f"p50 {p50:.1f} µs, p99 {p99:.1f} µs")
    if "throughput" in measures:
        gbps1, core_pct = bench.throughput(mode, 1)
        gbps4, _ = bench.throughput(mode, 4)
        results.add(name, "gbps1", gbps1)
        results.add(name, "gbps4", gbps4)
        said.append(f"{gbps1:.2f} / {gbps4:.2f} Gbit/s (1 / 4 streams)")
        if core_pct is not None:
            results.add(name, "core_pct_per_gbps", core_pct)
            said.append(f"{core_pct:.1f} % of a core per Gbit/s")
    if "connections" in measures:
        rate, cost = bench.connections(mode)
        results.add(name, "cps", rate)
        said.append(f"{rate:,.0f} conn/s")
        if cost is not None:
            cpu_us = cost.user_us + cost.kernel_us
            results.add(name, "cpu_us_per_conn", cpu_us)
            results.add(name, "user_us_per_conn", cost.user_us)
            results.add(name, "kernel_us_per_conn", cost.kernel_us)
            results.add(name, "cores_busy", cost.cores)
            said.append(
                f"{cpu_us:.0f} CPU µs/conn ({cost.user_us:.0f} user, {cost.kernel_us:.0f} "
                f"kernel; {cost.cores:.2f} cores busy)"
            )
    return ", ".join(said)


def _variant(spec: str) -> Variant:
    try:
        return parse_variant(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark direct, HAProxy, tcpproxy, bpfproxy.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--idle", type=int, default=10000, help="idle connections for memory")
    parser.add_argument(
        "--workers", type=int, default=None, help="passed to tcpproxy/bpfproxy [default: theirs]"
    )
    parser.add_argument(
        "--no-interpreted",
        dest="interpreted",
        action="store_false",
        help="leave out the row 'tcpproxy (interpreted)' (TCPPROXY_INTERPRETED=1), "
        "measured by default beside the compiled build: a quicker run",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=_variant,
        metavar="NAME=BINARY:ARGS",
        help="one more row: BINARY (tcpproxy or bpfproxy) with extra ARGS, e.g. "
        "'tcpproxy-w2=tcpproxy:--workers 2', or environment variables first: "
        "'bpfproxy-interpreted=bpfproxy:TCPPROXY_INTERPRETED=1'; repeatable",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated rows to measure [default: {','.join(MODES)}, "
        "'tcpproxy (interpreted)' and every variant]",
    )
    parser.add_argument(
        "--measure",
        default=",".join(MEASURES),
        help=f"comma-separated subset of {','.join(MEASURES)}",
    )
    parser.add_argument(
        "--proxy-cpus",
        default=None,
        metavar="LIST",
        help="pin the proxies (taskset -c LIST); HAProxy: a thread per CPU",
    )
    parser.add_argument(
        "--load-cpus",
        default=None,
        metavar="LIST",
        help="pin backends and load tools (taskset -c LIST)",
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="add this run's figures to FILE's (JSON, made if missing) and report on all: "
        "one report from a run made in parts, e.g. by --measure",
    )
    parser.add_argument(
        "--no-sni",
        action="store_true",
        help="leave out the TLS-by-SNI row (its own proxies, after the other figures)",
    )
    parser.add_argument(
        "--sni-modes",
        default=None,
        help="comma-separated rows measured for the TLS-by-SNI row [default: every row run]; "
        "leave out a variant whose code has no Hostnames",
    )
    parser.add_argument("--no-report", action="store_true", help="print only; write no docs")
    args = parser.parse_args(argv)
    unknown = set(args.measure.split(",")) - set(MEASURES)
    if unknown:
        parser.error(f"--measure: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespace, bpfproxy)", file=sys.stderr)
        return 2
    tools = ["sockperf", "iperf3", "wrk", "nginx", "haproxy", "taskset"]
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print(
            f"bench: missing tools: {' '.join(missing)} (make bench installs them)", file=sys.stderr
        )
        return 2
    modes = all_modes(default_variants(args.interpreted) + args.variant)
    run = args.modes.split(",") if args.modes else list(modes)
    unknown = [m for m in run if m not in modes]
    if unknown:
        print(f"bench: unknown modes {', '.join(unknown)}", file=sys.stderr)
        return 2
    measures = args.measure.split(",")
    if args.no_sni and "sni" in measures:
        measures.remove("sni")
    sni_run = args.sni_modes.split(",") if args.sni_modes else run
    if "sni" not in measures:
        sni_run = []
    unknown = [m for m in sni_run if m not in modes]
    if unknown:
        print(f"bench: unknown --sni-modes {', '.join(unknown)}", file=sys.stderr)
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
    saved = Path(args.results) if args.results else None
    results = Results.from_json(saved.read_text()) if saved and saved.exists() else Results()
    started = time.monotonic()
    try:
        builds = {name: build(modes[name]) for name in run if modes[name].binary in OURS}
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"bench: which build each row runs: {e}", file=sys.stderr)
        return 2
    for name, made in builds.items():
        if not interpreted_requested(dict(modes[name].env)) and not made.startswith("compiled"):
            print(f"bench: {name} runs {made}, not the compiled build", file=sys.stderr)
        print(f"{name}: {made}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, NetNS(prefix="bench") as ns:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # nginx workers run as www-data
        bench = Bench(ns, workdir, args)
        try:
            bench.start_backends()
            for name in run:
                if modes[name].binary == HAPROXY:
                    bench.start_haproxy(modes[name])
                elif modes[name].binary:
                    bench.start_ours(modes[name])
            for r in range(args.rounds):
                for name in run:
                    line = measure_round(bench, results, modes[name], measures)
                    took = time.monotonic() - started
                    print(f"[{took:3.0f} s] round {r + 1} {name}: {line}", flush=True)
            if sni_run:
                sni = SniBench(bench, [modes[name] for name in sni_run])
                sni.start()
                for r in range(args.rounds):
                    for name in sni_run:
                        line = sni.measure_round(results, modes[name])
                        took = time.monotonic() - started
                        print(f"[{took:3.0f} s] round {r + 1} {name}: {line}", flush=True)
            for name in run:
                if not modes[name].binary:
                    continue
                rest = bench.rss_kib(modes[name]) / 1024
                results.add(name, "rss_mib", rest)
                line = f"{name}: RSS at rest {rest:.1f} MiB"
                if "idle" in measures and args.idle:
                    per = bench.idle_memory(modes[name], args.idle)
                    results.add(name, "kib_per_conn", per)
                    line += f", {per:.1f} KiB per idle connection"
                print(line, flush=True)
        finally:
            bench.stop_all()
        commands = {n: _portable(c, workdir, modes) for n, c in bench.commands.items()}
        part = f" (part {results.parts + 1})" if results.parts else ""
        commands[f"bench.py{part}"] = invocation(sys.argv[1:] if argv is None else argv)
    results.add_part(run, commands, time.monotonic() - started, builds)
    if saved:
        saved.write_text(results.to_json())
    print()
    print(table(results, results.modes))
    if not args.no_report:
        write_report(results, args, modes)
        print("\nwrote docs/benchmarks.md and docs/benchmarks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
