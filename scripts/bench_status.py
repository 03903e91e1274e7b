"""What a status page poll costs the proxy: CPU per /status poll with 1,000 apps x 20 ports.

Run as root (it makes a network namespace of its own, so its 20,000 ports
collide with nothing): `sudo .venv/bin/python scripts/bench_status.py`.
It starts tcpproxy with --metrics (`--workers N`: a supervisor and N workers;
0, the default: one process), or bpfproxy (`--binary bpfproxy`: every port on
one listening socket, so 20,000 ports fit a descriptor limit that tcpproxy's
listener per port does not; its pins go to a bpffs of its own in a mount
namespace of its own, so none is left), waits, then measures the CPU time (user + kernel,
from /proc) of the process that serves /status over quiet windows (the 5 s
sampler alone; one before the polls and one after, as its cost drifts on a busy
machine) and over POLLS polls, one each POLL_PERIOD seconds, in each of
the MODES, and prints the cost per poll and as a share of a core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLLS = 20  # polls measured per mode
HISTORY_EVERY = 3  # as the page: one poll in 3 asks for the history
QUIET = 40.0  # seconds of no polls, twice: what the sampler costs alone (8 samples each)
POLL_PERIOD = 2.0  # the page's poll period (seconds); above the server's SHARED_FOR
METRICS_PORT = 9100
NOFILE_PER_APP = 21  # descriptors (tcpproxy): 20 listeners per app, and a little room
BPF_LISTEN_PORT = 8000  # bpfproxy's one listening socket (-p), outside the apps' ports
OPEN_APPS = 3  # apps a person opened on the page (the rest folded, as with > 50 apps)
# name: (the query of a poll, of a poll with history, gzip accepted)
MODES = {
    "the page (gzip, charts of 3 open apps)": (
        "/status?compact=1",
        "/status?compact=1&history_of=" + ",".join(f"app-{i:04d}" for i in range(OPEN_APPS)),
        True,
    ),
    "every app's charts, gzip": ("/status?compact=1", "/status?compact=1&history=1", True),
    "every app's charts, no gzip": ("/status?compact=1", "/status?compact=1&history=1", False),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch(path: str, zipped: bool = False) -> bytes:
    """The body as sent (gzipped if `zipped` and the server chose to)."""
    request = urllib.request.Request(f"http://127.0.0.1:{METRICS_PORT}{path}")
    if zipped:
        request.add_header("Accept-Encoding", "gzip")
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.read()


def inside(args: argparse.Namespace) -> int:
    """Runs in the namespace: start the proxy, measure, print."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    workers = ["--workers", str(args.workers)] if args.workers else []
    if args.binary == "bpfproxy":
        return measure(args, ["-p", str(BPF_LISTEN_PORT), "--user", "root", *workers])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = NOFILE_PER_APP * args.apps + 1024
    if hard != resource.RLIM_INFINITY and hard < need:
        try:  # root may raise it (up to fs.nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            hard = need
        except (ValueError, OSError):
            pass
    if hard != resource.RLIM_INFINITY and hard < NOFILE_PER_APP * args.apps:
        print(
            f"bench_status: {args.apps} apps need {NOFILE_PER_APP * args.apps} descriptors, "
            f"the hard limit is {hard}: try --apps {hard // NOFILE_PER_APP}",
            file=sys.stderr,
        )
        return 2
    return measure(args, workers)


@contextlib.contextmanager
def bpffs_for(binary: str, tmp: Path) -> Iterator[list[str]]:
    """bpfproxy's pins go to a bpffs of its own in `tmp` (in this mount namespace: they
    end with it whatever happens), unmounted after; tcpproxy needs none."""
    if binary != "bpfproxy":
        yield []
        return
    root = tmp / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    try:
        yield ["--bpffs", str(root)]
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=False)


def measure(args: argparse.Namespace, extra_argv: list[str]) -> int:
    """Start the proxy (`extra_argv`: its own arguments), measure, print."""
    apps = [
        {"Name": f"app-{i:04d}", "Ports": list(range(10000 + 20 * i, 10020 + 20 * i)),
         "Targets": [f"127.0.0.1:{5000 + i % 50}", f"127.0.0.2:{5000 + i % 50}"]}
        for i in range(args.apps)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, bpffs_for(args.binary, Path(tmp)) as more:
        extra_argv = [*extra_argv, *more]
        config = Path(tmp) / "c.json"
        config.write_text(json.dumps({"Apps": apps}))
        log = open(Path(tmp) / "log", "w")  # noqa: SIM115 (closed with the directory)
        argv = [sys.executable, "-m", args.binary, "-c", str(config), "--metrics",
                f"127.0.0.1:{METRICS_PORT}", *extra_argv]  # fmt: skip
        proxy = subprocess.Popen(argv, cwd=ROOT, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    fetch("/status")
                    break
                except OSError:
                    if time.monotonic() > deadline or proxy.poll() is not None:
                        log.flush()
                        tail = (Path(tmp) / "log").read_text()[-2000:]
                        print(f"the proxy did not start:\n{tail}", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
            time.sleep(6)  # one sample of the totals in
            pid = proxy.pid
            before = cpu_seconds(pid)
            time.sleep(QUIET)
            quiet = (cpu_seconds(pid) - before) / QUIET
            costs = []
            for name, (plain, charts, zipped) in MODES.items():
                sizes = []
                before, wall = cpu_seconds(pid), time.monotonic()
                for i in range(POLLS):
                    sizes.append(len(fetch(charts if i % HISTORY_EVERY == 0 else plain, zipped)))
                    time.sleep(max(0.0, wall + (i + 1) * POLL_PERIOD - time.monotonic()))
                costs.append((name, cpu_seconds(pid) - before, time.monotonic() - wall, sizes))
            before = cpu_seconds(pid)
            time.sleep(QUIET)
            quiet_after = (cpu_seconds(pid) - before) / QUIET
            mode = f"--workers {args.workers}" if args.workers else "one process"
            print(f"{args.binary}: {args.apps} apps x 20 ports, 2 targets each, {mode}")
            print(f"sampler alone (every 5 s): {100 * quiet:.2f} % of a core before the polls, "
                  f"{100 * quiet_after:.2f} % after")  # fmt: skip
            quiet = (quiet + quiet_after) / 2
            for name, spent, window, sizes in costs:
                per_poll = (spent - quiet * window) / POLLS
                share = 100 * per_poll / POLL_PERIOD
                print(f"{name}: one poll {1000 * per_poll:.1f} ms of CPU, "
                      f"{sum(sizes) / len(sizes) / 1024:.0f} KiB on average; at one poll "
                      f"each {POLL_PERIOD:g} s: {share:.2f} % of a core")  # fmt: skip
        finally:
            proxy.terminate()
            proxy.wait(60)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--binary", choices=("tcpproxy", "bpfproxy"), default="tcpproxy")
    parser.add_argument("--workers", type=int, default=0, help="0: one process")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args)
    if os.geteuid() != 0:
        print("bench_status: run as root (it makes a network namespace)", file=sys.stderr)
        return 2
    argv = [sys.executable, __file__, "--inside", "--apps", str(args.apps),
            "--workers", str(args.workers), "--binary", args.binary]  # fmt: skip
    # a mount namespace too (private): bpfproxy's bpffs, and its pins, end with it
    unshare = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    return subprocess.run([*unshare, *argv], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
