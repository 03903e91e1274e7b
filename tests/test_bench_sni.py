"""make bench's TLS-by-SNI row: its configs, the load's arguments and output, the table, and
the C load generator itself against a real backend."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpproxy.config import parse_config
from tests.hellos import client_hello, records
from tests.helpers import TIMEOUT, free_ports, wait_until

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))  # bench_sni imports its sibling as the script does

import bench_sni  # noqa: E402
from bench_report import Results  # noqa: E402

LOAD_SECONDS = 0.5  # how long the real load generator runs in a test


def test_ours_config_is_valid_and_shares_the_port_by_name() -> None:
    config = parse_config(json.dumps(bench_sni.ours_config(20010, 20011)))
    shared = [app for app in config.apps if 20010 in app.ports]
    assert len(shared) == 4  # three names and the default
    assert sorted(n for app in shared for n in app.hostnames) == sorted(bench_sni.ROUTES)
    (plain,) = [app for app in config.apps if 20011 in app.ports]
    assert not plain.hostnames


def test_haproxy_config_routes_by_sni_after_inspecting() -> None:
    cfg = bench_sni.haproxy_config(20110, 20111, threads=2, maxconn=1000)
    assert "bind 127.0.0.1:20110\n  tcp-request inspect-delay 5s\n" in cfg
    assert "tcp-request content accept if { req.ssl_hello_type 1 }" in cfg
    assert "use_backend b if { req.ssl_sni -i b.test }" in cfg
    assert "default_backend d" in cfg
    assert f"listen plain\n  bind 127.0.0.1:20111\n  server s1 127.0.0.1:{9100 + 3}\n" in cfg


def test_the_load_expects_each_name_at_its_app() -> None:
    hellos = {name: f"{name}.bin" for name in bench_sni.names()}
    argv = bench_sni.client_argv("gen", 4, hellos, 20110)
    assert argv[:4] == ["gen", "client", "4", "32"]
    assert argv[4:] == [
        "20110:a.test.bin:a",
        "20110:b.test.bin:b",
        "20110:c.test.bin:c",
        "20110:other.test.bin:d",
    ]
    direct = bench_sni.client_argv("gen", 4, hellos, None)
    assert direct[4:] == ["9100:a.test.bin:a", "9101:b.test.bin:b", "9102:c.test.bin:c",
                          "9103:other.test.bin:d"]  # fmt: skip
    plain = bench_sni.client_argv("gen", 4, hellos, 20111, plain=True)
    assert all(target.endswith(":d") for target in plain[4:])


def test_parse_client() -> None:
    assert bench_sni.parse_client("connections 8000 errors 3 seconds 2.000\n") == (4000.0, 8000, 3)
    with pytest.raises(ValueError, match="no result"):
        bench_sni.parse_client("bench_hello: connect: Connection refused\n")


def test_table_ratios_to_haproxy_and_what_inspecting_adds() -> None:
    results = Results()
    figures = {
        "haproxy": (8000, 60, 5, 55, 8000, 58, 4, 54),
        "tcpproxy": (9000, 70, 15, 55, 9500, 66, 11, 55),
        "direct": (20000, None, None, None, None, None, None, None),
    }
    for mode, values in figures.items():
        for key, value in zip(bench_sni.SNI_KEYS + bench_sni.PLAIN_KEYS, values, strict=True):
            if value is not None:
                results.add(mode, key, value)
    lines = bench_sni.table(results, ["direct", "haproxy", "tcpproxy", "bpfproxy"]).splitlines()
    assert len(lines) == 2 + 3  # bpfproxy not measured: no row
    assert lines[2] == "| direct | 20,000 (2.50x) | — | — | — | — |"
    assert lines[3] == "| haproxy | 8,000 | 60 (5 + 55) | 8,000 | 58 (4 + 54) | +2 |"
    assert lines[4] == (
        "| tcpproxy | 9,000 (1.12x) | 70 (15 + 55, 1.17x) "
        "| 9,500 (1.19x) | 66 (11 + 55, 1.14x) | +4 |"
    )


@pytest.fixture
def bench_hello(tmp_path: Path) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    binary = tmp_path / "bench_hello"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(SCRIPTS / "bench_hello.c")],
        check=True, timeout=60,
    )  # fmt: skip
    return binary


@pytest.fixture
def backend(bench_hello: Path) -> Iterator[tuple[int, int]]:
    """bench_hello's backend on two free ports, answering `a` and `b`."""
    ports = free_ports(2)
    proc = subprocess.Popen([str(bench_hello), "server", f"{ports[0]}:a", f"{ports[1]}:b"])
    try:
        assert wait_until(lambda: _listening(ports[1]))
        yield ports[0], ports[1]
    finally:
        proc.kill()
        proc.wait()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _load(bench_hello: Path, *targets: str) -> tuple[float, int, int]:
    argv = [str(bench_hello), "client", str(LOAD_SECONDS), "4", *targets]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return bench_sni.parse_client(done.stdout)


@pytest.mark.slow
def test_the_load_counts_only_answers_from_the_right_backend(
    bench_hello: Path, backend: tuple[int, int], tmp_path: Path
) -> None:
    hello = tmp_path / "hello.bin"
    wire = records(client_hello(b"a.test"))
    hello.write_bytes(wire)
    a, b = backend
    _, count, errors = _load(bench_hello, f"{a}:{hello}:a", f"{b}:{hello}:b")
    assert count > 0 and errors == 0
    _, count, errors = _load(bench_hello, f"{a}:{hello}:b")  # a answers, b expected
    assert count == 0 and errors > 0
    cut = tmp_path / "cut.bin"  # a hello short of its record: the backend never answers
    cut.write_bytes(wire[:-1])
    _, count, _ = _load(bench_hello, f"{a}:{cut}:a")
    assert count == 0
