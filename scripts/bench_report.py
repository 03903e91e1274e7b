"""`make bench`'s pure half: parse the tools' output, hold the figures, format the table.

No processes, sockets or files here (scripts/bench.py does the I/O), so the
parsing and the table can be tested on fixed text.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
from dataclasses import dataclass, field

HAPROXY = "haproxy"  # the row every ratio in the table is relative to
OURS = ("tcpproxy", "bpfproxy")  # the binaries a variant may run
HAND_WRITTEN = "<!-- Written by hand below this line; make bench keeps it. -->"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    lower_is_better: bool


METRICS = [
    Metric("p50", "p50 µs", "{:.1f}", True),
    Metric("p99", "p99 µs", "{:.1f}", True),
    Metric("gbps1", "Gbit/s 1 stream", "{:.2f}", False),
    Metric("gbps4", "Gbit/s 4 streams", "{:.2f}", False),
    Metric("cps", "new conn/s", "{:,.0f}", False),
    Metric("cpu_us_per_conn", "CPU µs/conn", "{:.0f}", True),
    Metric("user_us_per_conn", "user µs/conn", "{:.0f}", True),  # utime: our code, libc
    Metric("kernel_us_per_conn", "kernel µs/conn", "{:.0f}", True),  # stime: syscalls, softirq
    Metric("core_pct_per_gbps", "% of a core per Gbit/s", "{:.1f}", True),
    Metric("kib_per_conn", "KiB/idle conn", "{:.1f}", True),
    Metric("rss_mib", "RSS MiB at rest", "{:.1f}", True),
]


@dataclass
class Results:
    """Every measured value, by mode and metric key (the table shows medians), and
    what made them: a run may be made in parts (`--results FILE`), each adding its own.
    """

    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)  # the table's rows, in order
    commands: dict[str, str] = field(default_factory=dict)  # by name, as reported
    builds: dict[str, str] = field(default_factory=dict)  # our rows: the build each ran
    elapsed: float = 0.0  # seconds, all parts together
    parts: int = 0

    def add(self, mode: str, metric: str, value: float) -> None:
        self.rows.setdefault(mode, {}).setdefault(metric, []).append(value)

    def add_part(
        self,
        modes: list[str],
        commands: dict[str, str],
        elapsed: float,
        builds: dict[str, str] | None = None,
    ) -> None:
        self.modes += [m for m in modes if m not in self.modes]
        self.commands.update(commands)
        self.builds.update(builds or {})
        self.elapsed += elapsed
        self.parts += 1

    def to_json(self) -> str:
        return json.dumps(vars(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Results:
        return cls(**json.loads(text))

    def median(self, mode: str, metric: str) -> float | None:
        values = self.rows.get(mode, {}).get(metric)
        return statistics.median(values) if values else None

    def last(self, mode: str, metric: str) -> float | None:
        values = self.rows.get(mode, {}).get(metric)
        return values[-1] if values else None


@dataclass(frozen=True)
class Variant:
    """A second run of one of our binaries with extra arguments (and environment
    variables), measured as its own row."""

    name: str
    binary: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def parse_variant(spec: str) -> Variant:
    """`NAME=BINARY:ARGS`, e.g. `tcpproxy-w2=tcpproxy:--workers 2`; ARGS may start with
    environment variables, as in a shell: `tcpproxy-interpreted=tcpproxy:TCPPROXY_INTERPRETED=1`
    (the interpreted build, tcpproxy/build_info.py).

    Raises:
        ValueError: not of that form, an unknown binary, or a name taken by a mode.
    """
    name, sep, rest = spec.partition("=")
    binary, _, args = rest.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"variant {spec!r}: expected NAME=BINARY:ARGS")
    if binary not in OURS:
        raise ValueError(f"variant {spec!r}: binary must be one of {', '.join(OURS)}")
    if name in ("direct", HAPROXY, *OURS):
        raise ValueError(f"variant {spec!r}: {name!r} is a mode's name already")
    words = shlex.split(args)
    env = []
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env.append((key, value))
    return Variant(name, binary, tuple(words), tuple(env))


# The row measured by default beside the compiled ones (issue 18: both builds, one run);
# its name cannot clash with a --variant's, which has no space.
INTERPRETED = Variant("tcpproxy (interpreted)", "tcpproxy", (), (("TCPPROXY_INTERPRETED", "1"),))


def default_variants(interpreted: bool) -> list[Variant]:
    """The rows measured beyond the modes unless asked otherwise (`--no-interpreted`)."""
    return [INTERPRETED] if interpreted else []


def build_of(version: str) -> str:
    """The build from `BINARY --version`'s line, `tcpproxy, version 0.1.0, compiled
    (mypyc 2.4.1)`: `compiled (mypyc 2.4.1)` (tcpproxy/build_info.py's describe()).

    Raises:
        ValueError: not a line of that form.
    """
    parts = version.strip().split(", ", 2)
    if len(parts) != 3 or not parts[1].startswith("version "):
        raise ValueError(f"--version: expected 'NAME, version V, BUILD', got {version.strip()!r}")
    return parts[2]


def builds_line(builds: dict[str, str], modes: list[str]) -> str:
    """Which build each of our rows ran, in the table's order, for the report."""
    return "; ".join(f"{mode}: {builds[mode]}" for mode in modes if mode in builds)


# -- the tools' output ---------------------------------------------------------


def parse_sockperf(out: str) -> tuple[float, float]:
    """p50 and p99 latency (µs) from `sockperf ping-pong` output."""

    def percentile(p: str) -> float:
        match = re.search(rf"percentile {p} =\s*([\d.]+)", out)
        if not match:
            raise ValueError(f"sockperf: no {p} percentile in its output")
        return float(match.group(1))

    return percentile(r"50\.000"), percentile(r"99\.000")


def parse_iperf3(out: str) -> tuple[float, float]:
    """Gbit/s received (all streams together) and gigabits moved, from `iperf3 -J`."""
    received = json.loads(out)["end"]["sum_received"]
    return received["bits_per_second"] / 1e9, received["bytes"] * 8 / 1e9


def parse_wrk(out: str) -> tuple[float, int]:
    """Requests per second and requests completed, from wrk's summary.

    With `Connection: close` every request is one new TCP connection.
    """
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    count = re.search(r"(\d+) requests in ", out)
    if not rate or not count:
        raise ValueError("wrk: no request count in its output")
    return float(rate.group(1)), int(count.group(1))


def wrk_errors(out: str) -> str:
    """wrk's error lines (socket errors, non-2xx answers) joined, or ''."""
    return "; ".join(
        line.strip() for line in out.splitlines() if re.match(r"\s*(Socket errors|Non-2xx)", line)
    )


def cpu_ticks(stat: str) -> tuple[int, int]:
    """utime and stime (user and kernel time, in clock ticks) of a process, every
    thread live or ended, from /proc/PID/stat.

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted after its closing parenthesis: there field 3 (state) is first.
    """
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[14 - 3]), int(fields[15 - 3])


def rss_kib(status: str) -> int:
    """VmRSS (KiB) from /proc/PID/status; 0 for a process with no memory (a zombie)."""
    match = re.search(r"^VmRSS:\s*(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


# -- derived figures -----------------------------------------------------------


def cpu_us_per_connection(cpu_seconds: float, connections: int) -> float | None:
    return cpu_seconds * 1e6 / connections if connections else None


def core_percent_per_gbps(cpu_seconds: float, gigabits: float) -> float | None:
    """Percent of one core per Gbit/s: (CPU s / wall s) / (Gbit / wall s) * 100.

    The wall time cancels out: this is CPU seconds per gigabit moved, times 100.
    """
    return cpu_seconds / gigabits * 100 if gigabits else None


# -- the table -----------------------------------------------------------------


def format_cell(metric: Metric, value: float | None, reference: float | None) -> str:
    """`7,787 (0.49x)`: the value and its ratio to the reference (HAProxy's), if any."""
    if value is None:
        return "—"
    text = metric.fmt.format(value)
    if reference:
        text += f" ({value / reference:.2f}x)"
    return text


def table(results: Results, modes: list[str]) -> str:
    """A Markdown table: a row per mode, a column per metric, ratios to HAProxy's row."""
    arrows = {True: "↓", False: "↑"}
    head = "| | " + " | ".join(f"{m.label} {arrows[m.lower_is_better]}" for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for mode in modes:
        cells = []
        for metric in METRICS:
            reference = None if mode == HAPROXY else results.median(HAPROXY, metric.key)
            cells.append(format_cell(metric, results.median(mode, metric.key), reference))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def direction_note() -> str:
    """Which way is better, column by column, for the line under the table."""
    lower = [m.label for m in METRICS if m.lower_is_better]
    higher = [m.label for m in METRICS if not m.lower_is_better]
    return (
        f"↓ lower is better ({', '.join(lower)}); ↑ higher is better ({', '.join(higher)}). "
        "In brackets: the ratio to HAProxy's figure (ours / HAProxy's), so below 1.0x "
        "wins a ↓ column and above 1.0x wins an ↑ column."
    )


def keep_hand_written(old: str) -> str:
    """The hand-written tail of the previous report (from the marker on), or ''."""
    at = old.find(HAND_WRITTEN)
    return old[at:] if at >= 0 else ""


def parse_cpu_list(cpus: str) -> list[int]:
    """taskset's list form, `0`, `0,2` or `0-3`, as CPU numbers."""
    out: list[int] = []
    for part in cpus.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def invocation(argv: list[str]) -> str:
    """This run's command line as the report shows it: without --results and its file."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--results="):
            skip = False
        elif arg == "--results":
            skip = True
        else:
            shown.append(arg)
    return shlex.join(["scripts/bench.py", *shown])
