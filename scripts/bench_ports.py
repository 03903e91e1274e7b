"""Benchmark (not a test): how long bpfproxy takes to apply big port sets.

Runs in a network namespace it creates (so nothing on this machine is
steered): applies a 20,000-port config, then a reload that changes half of
the ports, and prints how long validation and each map update took.

    sudo .venv/bin/python scripts/bench_ports.py [--ports 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpfproxy.dispatcher import Dispatcher
from tcpproxy.config import parse_config
from tcpproxy.diff import diff_configs
from tests.netns import NetNS


def make_config(first_port: int, count: int) -> bytes:
    ports = list(range(first_port, first_port + count))
    return json.dumps(
        {"Apps": [{"Name": "bulk", "Ports": ports, "Targets": ["127.0.0.1:9000"]}]}
    ).encode()


def timed(fn, *args):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.ports
    first_data = make_config(10000, n)
    second_data = make_config(10000 + n // 2, n)  # half the ports replaced by new ones
    rows: dict[str, list[float]] = {}
    with NetNS(prefix="bench-ports") as ns:
        listener = ns.socket(socket.AF_INET6)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 8000))
        listener.listen()
        with listener, Dispatcher(listener) as dispatcher:
            for _ in range(args.rounds):
                dispatcher.set_ports(())
                first, parse1 = timed(parse_config, first_data)
                _, apply1 = timed(dispatcher.set_ports, first.ports)
                second, parse2 = timed(parse_config, second_data)
                diff = diff_configs(first, second)
                (added, removed), apply2 = timed(dispatcher.set_ports, second.ports)
                assert len(added) == len(removed) == n // 2 == len(diff.added_ports)
                for key, value in (
                    (f"validate {n}-port config", parse1),
                    (f"map update: {n} ports added", apply1),
                    ("validate reloaded config", parse2),
                    (f"map update: reload, +{len(added)} -{len(removed)}", apply2),
                ):
                    rows.setdefault(key, []).append(value)
    width = max(map(len, rows))
    print(f"{'step':<{width}}  median ms  (min-max over {args.rounds} rounds)")
    for key, values in rows.items():
        print(
            f"{key:<{width}}  {statistics.median(values):9.1f}"
            f"  ({min(values):.1f}-{max(values):.1f})"
        )


if __name__ == "__main__":
    main()
