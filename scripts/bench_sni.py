"""`make bench`'s TLS-by-SNI row, its pure half: the shared port's configs, the load, the table.

Issue 19's measure: new connections per second through a port shared by apps
told apart by the ClientHello's server name, and what each costs the proxy,
against HAProxy configured the same way (`req.ssl_sni` after `tcp-request
inspect-delay`). The load is scripts/bench_hello.c: each connection sends a
browser-shaped ClientHello (`tests/hellos.py`: GREASE, a post-quantum key
share, ECH GREASE; 1.7 KB in one record) and waits for the backend, which
answers its own name and closes, so a connection counts only if it reached
the app its name picks. The same hellos are also sent to a port that is not
inspected (one app, no `Hostnames`), in the same process: the inspection's
own cost, on the same traffic. No processes or files here (scripts/bench.py
runs them).
"""

from __future__ import annotations

import re

from bench_report import HAPROXY, Results

# the names on the shared port and the backend (its answer) each picks; OTHER is no
# app's: the port's default app takes it
ROUTES = {"a.test": "a", "b.test": "b", "c.test": "c"}
OTHER = "other.test"
DEFAULT = "d"
BACKENDS = ["a", "b", "c", DEFAULT]
BACKEND_BASE = 9100  # the backends' ports: BACKEND_BASE + their index in BACKENDS
SHARED, PLAIN = 10, 11  # a proxy's front ports: its mode's base port + these
CONCURRENCY = 32  # connections the load keeps open at once (as wrk's -c in the wrk row)
INSPECT_DELAY = 5  # seconds: HAProxy's inspect-delay and our InspectTimeout (our default)

# metric keys in Results: the shared port's figures, then the same hellos' on a port
# that is not inspected
SNI_KEYS = ("sni_cps", "sni_cpu_us", "sni_user_us", "sni_kernel_us")
PLAIN_KEYS = ("plain_cps", "plain_cpu_us", "plain_user_us", "plain_kernel_us")


def backend_port(name: str) -> int:
    return BACKEND_BASE + BACKENDS.index(name)


def names() -> list[str]:
    """The server names the load sends, in turn: each routed name, then one no app has."""
    return [*ROUTES, OTHER]


def answer(name: str) -> str:
    """The backend a hello for `name` must reach through the shared port."""
    return ROUTES.get(name, DEFAULT)


def server_argv(binary: str) -> list[str]:
    return [binary, "server", *(f"{backend_port(b)}:{b}" for b in BACKENDS)]


def client_argv(
    binary: str, seconds: float, hellos: dict[str, str], port: int | None, *, plain: bool = False
) -> list[str]:
    """The load: `hellos` maps each name to its file. `port` None: straight to each
    name's backend (direct); else through the proxy's port, whose answer is the
    name's app, or the one app of a port not inspected (`plain`)."""
    targets = []
    for name in names():
        backend = answer(name)
        to = backend_port(backend) if port is None else port
        targets.append(f"{to}:{hellos[name]}:{DEFAULT if plain else backend}")
    return [binary, "client", f"{seconds:g}", str(CONCURRENCY), *targets]


def parse_client(out: str) -> tuple[float, int, int]:
    """bench_hello client's line: (connections per second, connections, errors).

    Raises:
        ValueError: no such line.
    """
    match = re.search(r"connections (\d+) errors (\d+) seconds ([\d.]+)", out)
    if not match:
        raise ValueError(f"no result from bench_hello: {out[-500:]!r}")
    count, errors, seconds = int(match[1]), int(match[2]), float(match[3])
    return (count / seconds if seconds else 0.0), count, errors


def haproxy_config(front: int, plain: int, threads: int, maxconn: int) -> str:
    """HAProxy routing by SNI on `front` as its documentation shows, and `plain`: the
    same backends' default behind a port with no inspection."""
    lines = [
        "global",
        f"  nbthread {threads}",
        f"  maxconn {maxconn}",
        "defaults",
        "  mode tcp",
        "  option splice-auto",  # as the main table's HAProxy
        "  timeout connect 2s",
        "  timeout client 1h",
        "  timeout server 1h",
        "frontend shared",
        f"  bind 127.0.0.1:{front}",
        f"  tcp-request inspect-delay {INSPECT_DELAY}s",
        "  tcp-request content accept if { req.ssl_hello_type 1 }",
    ]
    lines += [f"  use_backend {b} if {{ req.ssl_sni -i {n} }}" for n, b in ROUTES.items()]
    lines += [f"  default_backend {DEFAULT}"]
    for backend in BACKENDS:
        lines += [f"backend {backend}", f"  server s1 127.0.0.1:{backend_port(backend)}"]
    lines += ["listen plain", f"  bind 127.0.0.1:{plain}"]
    lines += [f"  server s1 127.0.0.1:{backend_port(DEFAULT)}"]
    return "\n".join(lines) + "\n"


def ours_config(front: int, plain: int) -> dict:
    """The same for tcpproxy and bpfproxy: `Hostnames` on the shared port, an app
    without them there (its default), and a port one app owns (not inspected)."""
    limit = {"MaxConnections": 1_000_000}  # as HAProxy here: only the process limit
    apps = [
        {"Name": backend, "Ports": [front], "Hostnames": [name],
         "Targets": [f"127.0.0.1:{backend_port(backend)}"], **limit}
        for name, backend in ROUTES.items()
    ]  # fmt: skip
    apps.append({"Name": DEFAULT, "Ports": [front],
                 "Targets": [f"127.0.0.1:{backend_port(DEFAULT)}"], **limit})  # fmt: skip
    apps.append({"Name": "plain", "Ports": [plain],
                 "Targets": [f"127.0.0.1:{backend_port(DEFAULT)}"], **limit})  # fmt: skip
    return {"Apps": apps, "Defaults": {"InspectTimeout": INSPECT_DELAY}}


def _cell(value: float | None, reference: float | None, fmt: str) -> str:
    if value is None:
        return "—"
    text = fmt.format(value)
    return f"{text} ({value / reference:.2f}x)" if reference else text


def _cpu(results: Results, mode: str, keys: tuple[str, ...]) -> str:
    """`74 (16 + 58)`: CPU µs per connection, user + kernel; its ratio to HAProxy's."""
    total, user, kernel = (results.median(mode, key) for key in keys[1:])
    if total is None:
        return "—"
    reference = None if mode == HAPROXY else results.median(HAPROXY, keys[1])
    ratio = f", {total / reference:.2f}x" if reference else ""
    return f"{total:.0f} ({user or 0:.0f} + {kernel or 0:.0f}{ratio})"


def table(results: Results, modes: list[str]) -> str:
    """A row per mode measured: the shared port's new conn/s and CPU per connection,
    the same on the port not inspected, and what inspecting added."""
    lines = [
        "| | TLS by SNI, shared port: new conn/s ↑ | CPU µs/conn (user + kernel) ↓ "
        "| same hellos, port not inspected: new conn/s ↑ | CPU µs/conn (user + kernel) ↓ "
        "| inspecting adds, µs/conn |",
        "|---|---|---|---|---|---|",
    ]
    for mode in modes:
        if results.median(mode, "sni_cps") is None:
            continue
        cells = []
        for keys in (SNI_KEYS, PLAIN_KEYS):
            reference = None if mode == HAPROXY else results.median(HAPROXY, keys[0])
            cells.append(_cell(results.median(mode, keys[0]), reference, "{:,.0f}"))
            cells.append(_cpu(results, mode, keys))
        shared, plain = results.median(mode, "sni_cpu_us"), results.median(mode, "plain_cpu_us")
        cells.append(f"{shared - plain:+.0f}" if shared is not None and plain is not None else "—")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
