"""make bench's pure half (scripts/bench_report.py): the tools' output parsed, the table made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench_report import (
    HAND_WRITTEN,
    INTERPRETED,
    METRICS,
    Results,
    Variant,
    build_of,
    builds_line,
    core_percent_per_gbps,
    cpu_ticks,
    cpu_us_per_connection,
    default_variants,
    format_cell,
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

SOCKPERF = """\
sockperf: ---> <MAX> observation =  120.331
sockperf: ---> percentile 99.999 =   95.120
sockperf: ---> percentile 99.000 =   32.118
sockperf: ---> percentile 90.000 =   25.004
sockperf: ---> percentile 50.000 =   21.093
sockperf: ---> <MIN> observation =   15.211
"""

WRK = """\
Running 3s test @ http://127.0.0.1:20280/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.01ms    1.10ms  30.00ms   90.00%
  47802 requests in 3.00s, 10.94MB read
Requests/sec:  15934.11
Transfer/sec:      3.65MB
"""


def test_sockperf_percentiles() -> None:
    assert parse_sockperf(SOCKPERF) == (21.093, 32.118)


def test_sockperf_without_percentiles_is_an_error() -> None:
    with pytest.raises(ValueError, match="50"):
        parse_sockperf("sockperf: no samples")


def test_wrk_rate_and_count() -> None:
    assert parse_wrk(WRK) == (15934.11, 47802)


def test_iperf3_all_streams_together() -> None:
    out = json.dumps({"end": {"sum_received": {"bits_per_second": 15.5e9, "bytes": 5_812_500_000}}})
    gbps, gigabits = parse_iperf3(out)
    assert gbps == pytest.approx(15.5)
    assert gigabits == pytest.approx(46.5)


def test_cpu_ticks_counts_after_a_command_name_with_spaces_and_parentheses() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 900 0 3 0 250 70 0 0 20 0 3 0 99\n"
    assert cpu_ticks(stat) == (250, 70)  # user, kernel


def test_cpu_ticks_of_a_real_process_split_user_and_kernel() -> None:
    user, kernel = cpu_ticks(Path("/proc/self/stat").read_text())
    assert user >= 0 and kernel >= 0


def test_rss_from_status() -> None:
    assert rss_kib("Name:\tpython\nVmPeak:\t  9000 kB\nVmRSS:\t   4608 kB\n") == 4608
    assert rss_kib("Name:\tzombie\nState:\tZ (zombie)\n") == 0


def test_derived_figures() -> None:
    assert cpu_us_per_connection(1.5, 15_000) == pytest.approx(100.0)
    assert cpu_us_per_connection(1.0, 0) is None
    # 0.6 cores busy while relaying 15 Gbit/s for 3 s: 1.8 CPU s for 45 Gbit
    assert core_percent_per_gbps(1.8, 45.0) == pytest.approx(4.0)
    assert core_percent_per_gbps(1.0, 0.0) is None


def test_variant_parsed() -> None:
    assert parse_variant("tcpproxy-w2=tcpproxy:--workers 2 --no-splice") == Variant(
        "tcpproxy-w2", "tcpproxy", ("--workers", "2", "--no-splice")
    )
    assert parse_variant("bpf-plain=bpfproxy:") == Variant("bpf-plain", "bpfproxy", ())
    # environment variables first, as in a shell: the interpreted build as a row of its own
    assert parse_variant("interp=tcpproxy:TCPPROXY_INTERPRETED=1 --workers 2") == Variant(
        "interp", "tcpproxy", ("--workers", "2"), (("TCPPROXY_INTERPRETED", "1"),)
    )


@pytest.mark.parametrize(
    "spec", ["tcpproxy:--workers 2", "x=haproxy:-f y", "tcpproxy=tcpproxy:", "a b=tcpproxy:"]
)
def test_bad_variants_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="variant"):
        parse_variant(spec)


def test_interpreted_build_is_a_row_by_default() -> None:
    assert default_variants(interpreted=True) == [INTERPRETED]
    assert INTERPRETED.name == "tcpproxy (interpreted)"
    assert (INTERPRETED.binary, INTERPRETED.args) == ("tcpproxy", ())
    assert INTERPRETED.env == (("TCPPROXY_INTERPRETED", "1"),)
    assert default_variants(interpreted=False) == []  # --no-interpreted


def test_build_from_version_line() -> None:
    assert build_of("tcpproxy, version 0.1.0, compiled (mypyc 2.4.1)\n") == "compiled (mypyc 2.4.1)"
    line = "tcpproxy, version 0.1.0, interpreted (TCPPROXY_INTERPRETED=1)"
    assert build_of(line) == "interpreted (TCPPROXY_INTERPRETED=1)"
    with pytest.raises(ValueError, match="NAME, version V, BUILD"):
        build_of("Traceback (most recent call last):")


def test_builds_line_in_the_tables_order() -> None:
    builds = {"tcpproxy (interpreted)": "interpreted", "tcpproxy": "compiled (mypyc 2.4.1)"}
    modes = ["direct", "haproxy", "tcpproxy", "tcpproxy (interpreted)"]
    assert builds_line(builds, modes) == (
        "tcpproxy: compiled (mypyc 2.4.1); tcpproxy (interpreted): interpreted"
    )


def test_help_offers_leaving_the_interpreted_row_out() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--no-interpreted" in out.stdout


def test_cpu_lists() -> None:
    assert parse_cpu_list("0") == [0]
    assert parse_cpu_list("0,2-4") == [0, 2, 3, 4]


def test_cell_with_ratio_to_haproxy() -> None:
    cps = next(m for m in METRICS if m.key == "cps")
    assert format_cell(cps, 7787.0, 15934.0) == "7,787 (0.49x)"
    assert format_cell(cps, 15934.0, None) == "15,934"
    assert format_cell(cps, None, 15934.0) == "—"


def test_table_rows_medians_and_ratios() -> None:
    results = Results()
    for value in (15000.0, 16000.0, 17000.0):
        results.add("haproxy", "cps", value)
    for value in (7000.0, 8000.0, 9000.0):
        results.add("tcpproxy", "cps", value)
    results.add("tcpproxy", "p50", 40.0)
    lines = table(results, ["haproxy", "tcpproxy"]).splitlines()
    assert lines[0].startswith("| | p50 µs ↓ |")
    assert len(lines) == 4
    haproxy, tcpproxy = (line.split(" | ") for line in lines[2:])
    cps_column = 1 + [m.key for m in METRICS].index("cps")
    assert haproxy[cps_column] == "16,000"
    assert tcpproxy[cps_column] == "8,000 (0.50x)"
    assert tcpproxy[1] == "40.0"  # HAProxy has no p50 here: no ratio


def test_table_splits_cpu_per_connection_into_user_and_kernel() -> None:
    results = Results()
    for mode, user, kernel in (("haproxy", 20.0, 50.0), ("tcpproxy", 60.0, 50.0)):
        results.add(mode, "cpu_us_per_conn", user + kernel)
        results.add(mode, "user_us_per_conn", user)
        results.add(mode, "kernel_us_per_conn", kernel)
    lines = table(results, ["haproxy", "tcpproxy"]).splitlines()
    head = lines[0].split(" | ")
    keys = [m.key for m in METRICS]
    cpu, user, kernel = (
        1 + keys.index(k) for k in ("cpu_us_per_conn", "user_us_per_conn", "kernel_us_per_conn")
    )
    assert (head[cpu], head[user], head[kernel]) == (
        "CPU µs/conn ↓",
        "user µs/conn ↓",
        "kernel µs/conn ↓",
    )
    haproxy, tcpproxy = (line.split(" | ") for line in lines[2:])
    assert (haproxy[cpu], haproxy[user], haproxy[kernel]) == ("70", "20", "50")
    assert (tcpproxy[cpu], tcpproxy[user], tcpproxy[kernel]) == (
        "110 (1.57x)",
        "60 (3.00x)",
        "50 (1.00x)",
    )


def test_hand_written_tail_kept() -> None:
    old = f"# Benchmarks\n\ngenerated\n\n{HAND_WRITTEN}\n\n## Workers\n\nmeasured\n"
    assert keep_hand_written(old) == f"{HAND_WRITTEN}\n\n## Workers\n\nmeasured\n"
    assert keep_hand_written("# Benchmarks\n\ngenerated only\n") == ""


def test_results_made_in_parts_survive_json() -> None:
    first = Results()
    first.add("haproxy", "p50", 21.0)
    first.add_part(["direct", "haproxy"], {"wrk": "wrk -t 2"}, 100.0)
    second = Results.from_json(first.to_json())
    second.add("haproxy", "p50", 23.0)
    second.add("haproxy", "cps", 16000.0)
    second.add_part(
        ["haproxy", "tcpproxy"], {"iperf3 1 stream": "iperf3 -c"}, 50.0, {"tcpproxy": "compiled"}
    )
    assert second.median("haproxy", "p50") == 22.0
    assert second.modes == ["direct", "haproxy", "tcpproxy"]
    assert set(second.commands) == {"wrk", "iperf3 1 stream"}
    assert (second.elapsed, second.parts) == (150.0, 2)
    assert Results.from_json(second.to_json()).builds == {"tcpproxy": "compiled"}
    # a results file from before builds were recorded still reads
    old = json.loads(first.to_json())
    del old["builds"]
    assert Results.from_json(json.dumps(old)).builds == {}


def test_wrk_errors_reported() -> None:
    assert wrk_errors(WRK) == ""
    out = WRK.replace(
        "Requests/sec", "  Socket errors: connect 0, read 3, write 0, timeout 2\nRequests/sec"
    )
    assert wrk_errors(out) == "Socket errors: connect 0, read 3, write 0, timeout 2"


def test_invocation_shown_without_the_results_file() -> None:
    argv = ["--seconds", "3", "--results", "x.json", "--variant", "w2=tcpproxy:--workers 2"]
    assert invocation(argv) == "scripts/bench.py --seconds 3 --variant 'w2=tcpproxy:--workers 2'"
    assert invocation(["--results=x.json", "--rounds", "1"]) == "scripts/bench.py --rounds 1"
