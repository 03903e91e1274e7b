"""Benchmark (not a test): memory of a serving bpfproxy with 1,000 steered ports.

Starts the real binaries in a network namespace it creates (nothing on this
machine is steered), with one app of ``--ports`` ports and no connections,
waits until each serves and settles, and reads the serving process's
resident set (VmRSS), its uid and capabilities from /proc, and whether bcc's
or LLVM's libraries are mapped in it. tcpproxy (one listener per port) is
measured the same way for comparison. Exits 1 if bpfproxy's RSS is above
``--limit-mb`` or bcc/LLVM is mapped in its serving process.

    sudo .venv/bin/python scripts/bench_rss.py [--ports 1000] [--limit-mb 64]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns import NetNS  # noqa: E402

SETTLE = 2.0  # seconds after "started": the first reload check and metrics have run
START_TIMEOUT = 60.0  # seconds for a start, compile included
COMPILER_LIBS = re.compile(r"libbcc|libLLVM|libclang")


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def compiler_mapped(pid: int) -> bool:
    """Whether bcc's, LLVM's or clang's libraries are mapped in the process."""
    return bool(COMPILER_LIBS.search(Path(f"/proc/{pid}/maps").read_text()))


def measure(ns: NetNS, argv: list[str], ready: str) -> dict[str, object]:
    """Start a proxy, wait for `ready` on its output, settle, read /proc, stop it."""
    with tempfile.TemporaryFile() as log:
        return _measure(ns, argv, log, ready)


def _measure(ns: NetNS, argv: list[str], log: Any, ready: str) -> dict[str, object]:
    proc = ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            log.seek(0)
            output = log.read().decode(errors="replace")
            if ready in output:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{argv[2]} did not start:\n{output}")
            time.sleep(0.1)
        time.sleep(SETTLE)
        fields = status(proc.pid)  # `ip netns exec` execs the proxy: the same pid
        return {
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "uid": fields["Uid"].split()[1],
            "cap_eff": fields["CapEff"],
            "cap_prm": fields["CapPrm"],
            "compiler_mapped": compiler_mapped(proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--limit-mb", type=float, default=64.0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp, NetNS(prefix="bench-rss") as ns:
        Path(tmp).chmod(0o755)  # the proxies drop to nobody, who must read the config
        config = Path(tmp) / "config.json"
        ports = list(range(10000, 10000 + args.ports))
        config.write_text(
            json.dumps({"Apps": [{"Name": "bulk", "Ports": ports, "Targets": ["127.0.0.1:9"]}]})
        )
        config.chmod(0o644)
        python = [sys.executable, "-m"]
        results["bpfproxy"] = measure(
            ns, [*python, "bpfproxy", "-p", "8000", "-c", str(config)], "bpfproxy started",
        )  # fmt: skip
        results["tcpproxy"] = measure(
            ns, [*python, "tcpproxy", "-c", str(config)], "tcpproxy started"
        )
    print(f"serving process, {args.ports} ports, no connections:")
    for name, row in results.items():
        print(
            f"  {name:<9} RSS {row['rss_mb']:6.1f} MB  uid {row['uid']:>5}  "
            f"CapEff {row['cap_eff']}  CapPrm {row['cap_prm']}  "
            f"bcc/LLVM mapped: {'yes' if row['compiler_mapped'] else 'no'}"
        )
    bpf = results["bpfproxy"]
    failures = []
    if float(bpf["rss_mb"]) > args.limit_mb:  # type: ignore[arg-type]
        failures.append(f"bpfproxy RSS {bpf['rss_mb']:.1f} MB > {args.limit_mb:g} MB")
    if bpf["compiler_mapped"]:
        failures.append("bcc/LLVM is mapped in bpfproxy's serving process")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
