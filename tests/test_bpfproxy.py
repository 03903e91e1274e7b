"""bpfproxy as a user runs it: the real binary and real BPF, each test in its own netns.

Nothing here steers this machine's own ports: the proxy, its backends and
its clients all live in a network namespace the test creates and removes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import BPF_LISTEN_PORT, Deployment
from tests.helpers import (
    ROOT,
    TIMEOUT,
    ProxyProcess,
    app,
    exchange,
    recv_all,
    recv_line,
    wait_until,
    which_backend,
    write_config,
)
from tests.netns import NetNS
from tests.test_upgrade import (
    FakeSystemd,
    Load,
    _status_pid,
    children,
    gone,
    kill_started,
    no_migrate_req,
    read_pid,
    refuse_while_stopping,
    upgrade,
)

pytestmark = pytest.mark.bpf


@pytest.fixture
def lab(netns: NetNS, config_path: Path) -> Iterator[Deployment]:
    d = Deployment("bpfproxy", config_path, netns)
    try:
        yield d
    finally:
        d.close()


def refused(d: Deployment, port: int, host: str = "127.0.0.1") -> bool:
    try:
        d.connect(port, host).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_each_port_reaches_its_app_and_others_are_refused(lab: Deployment) -> None:
    a, b = lab.backend("a"), lab.backend("b")
    lab.start([app("A", [7001, 7002], [a.address]),
                                   app("B", [7101], [b.address])])  # fmt: skip
    assert lab.which(7001) == "a"
    assert lab.which(7002) == "a"
    assert lab.which(7101) == "b"
    assert refused(lab, 7003)  # not configured: the normal lookup finds nothing
    assert exchange(7101, b"hi", make_socket=lab.make_socket) == b"b\nhi"


def test_ipv6_loopback(lab: Deployment) -> None:
    a = lab.backend("a")
    lab.start([app("A", [7001], [a.address])])
    assert lab.which(7001, host="::1") == "a"
    assert refused(lab, 7003, host="::1")


def test_a_thousand_port_app(lab: Deployment) -> None:
    a = lab.backend("a")
    ports = list(range(20000, 21000))
    proxy = lab.start([app("A", ports, [a.address])])
    proxy.wait_for(r"1000 ports steered")
    for port in [*ports[::97], ports[0], ports[-1]]:
        assert lab.which(port) == "a"
    assert refused(lab, ports[-1] + 1)
    assert refused(lab, ports[0] - 1)


@pytest.mark.slow
def test_reload_adds_and_removes_ports_keeping_established(lab: Deployment) -> None:
    a, b = lab.backend("a"), lab.backend("b")
    proxy = lab.start([app("A", [7001, 7002], [a.address])])
    established = lab.connect(7002)
    assert recv_line(established) == b"a\n"
    mark = proxy.mark()
    write_config(lab.config_path, [app("A", [7001], [a.address]), app("B", [7201], [b.address])])
    proxy.wait_for(r"applied", start=mark)
    assert lab.which(7201) == "b"
    assert lab.which(7001) == "a"
    assert refused(lab, 7002)
    established.sendall(b"still here")
    established.shutdown(socket.SHUT_WR)
    assert recv_all(established) == b"still here"
    established.close()


@pytest.mark.slow
def test_invalid_reload_keeps_the_port_map(lab: Deployment) -> None:
    a = lab.backend("a")
    proxy = lab.start([app("A", [7001], [a.address])])
    mark = proxy.mark()
    lab.config_path.write_text('{"Apps": [{"Name": "A", "Ports": [7001, 7001], "Targets": []}]}')
    proxy.wait_for(r"rejected", start=mark)
    assert lab.which(7001) == "a"


@pytest.mark.slow
def test_reload_claiming_the_listen_port_is_rejected(lab: Deployment) -> None:
    a = lab.backend("a")
    proxy = lab.start([app("A", [7001], [a.address])])
    mark = proxy.mark()
    write_config(lab.config_path, [app("A", [7001, BPF_LISTEN_PORT], [a.address])])
    proxy.wait_for(rf"rejected.*port {BPF_LISTEN_PORT}.*listening port", start=mark)
    assert lab.which(7001) == "a"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ports_are_released_when_bpfproxy_exits(lab: Deployment, signum: int) -> None:
    # Default root: under `ip netns exec` the bpffs bpfproxy mounts is in the process's own
    # mount namespace, so its pins end with it even after SIGKILL (see the pinned tests).
    a = lab.backend("a")
    proxy = lab.start([app("A", [7001, 7002], [a.address])])
    assert lab.which(7001) == "a"
    proxy.send(signum)
    code = proxy.proc.wait(TIMEOUT)
    assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
    assert refused(lab, 7001)
    assert refused(lab, 7002)
    assert refused(lab, BPF_LISTEN_PORT)


def test_listen_port_is_served_normally_and_not_routed(lab: Deployment) -> None:
    a = lab.backend("a")
    lab.start([app("A", [7001], [a.address])])
    with lab.connect(BPF_LISTEN_PORT) as sock:  # reaches the listener, belongs to no app
        assert recv_all(sock) == b""


def test_listen_port_used_by_an_app_is_a_startup_error(lab: Deployment) -> None:
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001, BPF_LISTEN_PORT], [a.address])])
    argv = [
        sys.executable,
        "-m",
        "bpfproxy",
        "-p",
        str(BPF_LISTEN_PORT),
        "-c",
        str(lab.config_path),
    ]
    proc = lab.ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2
    assert b"port 8000 of app 'A' (Ports[1])" in out and b"Traceback" not in out


# The veth pair between the proxy's namespace (A) and another host's (B).
A_V4, B_V4 = "10.99.0.1", "10.99.0.2"


@pytest.fixture
def peer(netns: NetNS) -> Iterator[NetNS]:
    """Another host: namespace B, linked to the proxy's namespace A by a veth pair."""
    with NetNS() as other:
        netns.veth(other, (f"{A_V4}/24",), (f"{B_V4}/24",))
        yield other


def from_peer(peer: NetNS, port: int, host: str = A_V4) -> str:
    """Which backend a client in B reaches through A's veth address; "refused" if none."""
    try:
        return which_backend(port, host, make_socket=lambda family: peer.socket(family))
    except ConnectionRefusedError:
        return "refused"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_bind_loopback_keeps_app_ports_off_other_addresses(
    lab: Deployment, peer: NetNS, workers: int
) -> None:
    a = lab.backend("a")
    lab.start([app("A", [7001], [a.address])], "--bind", "127.0.0.1", "--workers", str(workers))
    assert lab.which(7001) == "a"
    assert from_peer(peer, 7001) == "refused"  # another host, over the veth: not proxied
    assert refused(lab, 7001, host=A_V4)  # A's own external address neither
    assert refused(lab, 7001, host="::1")
    assert lab.which(7001) == "a"


def test_bind_external_address_serves_only_that_address(lab: Deployment, peer: NetNS) -> None:
    a = lab.backend("a")
    lab.start([app("A", [7001], [a.address])], "--bind", A_V4)
    assert from_peer(peer, 7001) == "a"
    assert refused(lab, 7001, host="127.0.0.1")


def test_default_bind_serves_every_address(lab: Deployment, peer: NetNS) -> None:
    a = lab.backend("a")
    lab.start([app("A", [7001], [a.address])])
    assert from_peer(peer, 7001) == "a"
    assert lab.which(7001) == "a"


def test_check_loads_the_program() -> None:
    out = subprocess.run([sys.executable, "-m", "bpfproxy", "--check"], capture_output=True,
                         timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert b"ok" in out.stdout


@functools.cache
def _unprivileged_runner() -> list[str] | None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


# Prints each top-level module that bpfproxy's command line imports, with its file
# (bpfproxy.__main__ would run it; the package is copied whole, so it comes along).
_IMPORT_PROBE = """
import json, sys
import bpfproxy.cli, bpfproxy.dispatcher, bpfproxy.errors, bpfproxy.loader
print(json.dumps({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
                  if "." not in n}))
"""


@pytest.fixture
def readable_copy() -> Iterator[Path]:
    """bpfproxy and what it imports from the venv, copied where any user can read them.

    The checkout and its .venv may sit under a mode-700 home such as /root,
    which uid 65534 cannot enter; Debian's python and its site dirs are
    readable by all, so only what lives elsewhere is copied.
    """
    probe = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True,
                           timeout=60, check=True, cwd=ROOT)  # fmt: skip
    system = os.path.realpath(sys.base_prefix) + os.sep
    copy = Path(tempfile.mkdtemp(prefix="bpfproxy-readable-"))
    try:
        copy.chmod(0o755)
        for name, file in json.loads(probe.stdout).items():
            if file is None or os.path.realpath(file).startswith(system):
                continue  # built in, a namespace package, or readable where it is
            source = Path(file)
            if source.name.startswith("__init__."):
                shutil.copytree(source.parent, copy / name,
                                ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
            elif not name.startswith("__editable__"):
                shutil.copy2(source, copy / source.name)
        yield copy
    finally:
        shutil.rmtree(copy)


@pytest.mark.slow
def test_non_root_gets_a_clear_error(readable_copy: Path) -> None:
    runner = _unprivileged_runner()
    if runner is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # Debian's interpreter (the venv's base) on the readable copy, not the
    # checkout's venv, which uid 65534 may not be able to read.
    python = os.path.realpath(sys.executable)
    proc = subprocess.run(
        [*runner, python, "-m", "bpfproxy", "-p", "8000"],
        capture_output=True, timeout=60, check=False, cwd="/",
        env={**os.environ, "PYTHONPATH": str(readable_copy)},
    )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "bpfproxy: error:" in err and "sudo" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- pinned state


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A bpffs of the test's own, mounted where `ip netns exec` still sees it.

    bpfproxy's default root, /sys/fs/bpf, is hidden by `ip netns exec` (it
    mounts a fresh /sys), so pins made there end with the process. Unmounting
    releases whatever a failed test left pinned.
    """
    root = tmp_path / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True, timeout=TIMEOUT)
    try:
        yield root
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=False, timeout=TIMEOUT)


def pinned_args(bpffs: Path, instance: str) -> tuple[str, ...]:
    return ("--bpffs", str(bpffs), "--instance", instance)


def instance_name() -> str:
    return f"test-{os.getpid()}-{secrets.token_hex(3)}"


def start_again(lab: Deployment, *args: str) -> ProxyProcess:
    """Start another bpfproxy of the same deployment at once (the old one is gone)."""
    old = lab.proxy
    argv = lab.popen_argv(lab.argv("--log-level", "debug", *args))
    lab.proxy = ProxyProcess(argv)  # lab.close() kills it
    if old is not None:
        old.kill()
    return lab.proxy


def run_bpfproxy(lab: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    argv = lab.popen_argv([sys.executable, "-m", "bpfproxy", "-p", str(BPF_LISTEN_PORT), *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def attempt(lab: Deployment, port: int, timeout: float = TIMEOUT) -> str:
    """The backend a client reaches, or why not: "refused", "timeout" or the error."""
    try:
        with lab.connect(port, timeout=timeout) as sock:
            return recv_line(sock).decode().strip() or "closed"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return repr(exc)


def counter(bpffs: Path, instance: str, name: str) -> int:
    """One of the program's counters, read from its pinned map, summed over CPUs."""
    from bpfproxy import bpfsys
    from bpfproxy.loader import COUNTERS

    fd = bpfsys.obj_get(str(bpffs / "bpfproxy" / instance / "map_counters"))
    try:
        cpus = bpfsys.possible_cpus()
        raw = bpfsys.map_lookup_elem(fd, COUNTERS.index(name).to_bytes(4, sys.byteorder), 8 * cpus)
    finally:
        os.close(fd)
    assert raw is not None
    return sum(int.from_bytes(raw[i : i + 8], sys.byteorder) for i in range(0, len(raw), 8))


@pytest.mark.slow
def test_sigkill_then_restart_refuses_no_connection(lab: Deployment, bpffs: Path) -> None:
    a = lab.backend("a")
    instance = instance_name()
    args = pinned_args(bpffs, instance)
    proxy = lab.start([app("A", [7001], [a.address])], *args)
    assert lab.which(7001) == "a"

    outcomes: list[tuple[float, str]] = []  # (when the attempt started, how it ended)
    stop = threading.Event()

    def connect_loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            outcomes.append((started, attempt(lab, 7001)))

    def served() -> int:
        return sum(1 for _, outcome in outcomes if outcome == "a")

    clients = [threading.Thread(target=connect_loop, daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    wait_until(lambda: served() >= 20)
    proxy.send(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)
    dead = time.monotonic()  # every descriptor of the old process is closed
    # A client whose SYN is sent while no process serves: held, not refused.
    during = concurrent.futures.ThreadPoolExecutor(1).submit(attempt, lab, 7001)
    restarted = start_again(lab, *args)  # within milliseconds of the kill
    restarted.wait_for(r"INFO bpfproxy started")
    assert during.result(timeout=2 * TIMEOUT) == "a"
    before = served()
    wait_until(lambda: served() >= before + 20)
    stop.set()
    for client in clients:
        client.join(2 * TIMEOUT)

    # Not one connection refused or timed out. Those that reached the old process before
    # it died (accepted, or queued on its listener) die with it: reset or closed.
    assert not [outcome for _, outcome in outcomes if outcome in ("refused", "timeout")]
    after = [outcome for started, outcome in outcomes if started >= dead]
    assert after and set(after) == {"a"}, sorted(set(after))
    lost = [outcome for started, outcome in outcomes if started < dead and outcome != "a"]
    assert all("ConnectionReset" in outcome or outcome == "closed" for outcome in lost), lost
    assert counter(bpffs, instance, "held") >= 1
    assert "reusing the pinned program" in restarted.output
    assert "compiled and loaded" not in restarted.output


@pytest.mark.slow
def test_restart_reuses_the_state_without_compiling_and_diffs_the_ports(
    lab: Deployment, bpffs: Path
) -> None:
    a, b = lab.backend("a"), lab.backend("b")
    args = pinned_args(bpffs, instance_name())
    first = lab.start([app("A", [7001, 7002], [a.address])], *args)
    assert "compiled and loaded sk_lookup.c" in first.output
    first.send(signal.SIGKILL)
    first.proc.wait(TIMEOUT)
    write_config(lab.config_path, [app("A", [7001], [a.address]), app("B", [7003], [b.address])])

    second = start_again(lab, *args)
    second.wait_for(r"INFO bpfproxy started")
    assert "compiled and loaded" not in second.output
    second.wait_for(r"reusing the pinned program .* no compile")
    second.wait_for(r"port map: 2 ports steered \(added 7003; removed 7002\)")
    assert lab.which(7001) == "a"
    assert lab.which(7003) == "b"
    assert refused(lab, 7002)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_clean_stop_releases_every_port_and_leaves_no_pin(
    lab: Deployment, bpffs: Path, workers: int
) -> None:
    a = lab.backend("a")
    instance = instance_name()
    args = (*pinned_args(bpffs, instance), "--workers", str(workers))
    proxy = lab.start([app("A", [7001, 7002], [a.address])], *args)
    assert (bpffs / "bpfproxy" / instance / "link").exists()
    assert lab.which(7001) == "a"
    assert proxy.stop(signal.SIGTERM) == 0
    assert refused(lab, 7001)
    assert refused(lab, 7002)
    assert refused(lab, BPF_LISTEN_PORT)
    assert list(bpffs.glob("bpfproxy*")) == []


@pytest.mark.slow
def test_release_removes_the_state_of_a_dead_instance(lab: Deployment, bpffs: Path) -> None:
    a = lab.backend("a")
    instance = instance_name()
    args = pinned_args(bpffs, instance)
    proxy = lab.start([app("A", [7001], [a.address])], *args)

    running = run_bpfproxy(lab, "--release", *args)
    assert running.returncode == 2
    assert f"instance {instance} is running" in running.stderr
    assert lab.which(7001) == "a"  # still serving

    proxy.send(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)
    assert attempt(lab, 7001, timeout=1.5) == "timeout"  # held: pinned, nobody serves
    released = run_bpfproxy(lab, "--release", *args)
    assert released.returncode == 0, released.stderr
    assert f"released instance {instance}" in released.stdout
    for pin in ("link", "prog", "hold", "hold-1", "map_steered_ports", "map_listener"):
        assert pin in released.stdout
    assert refused(lab, 7001)
    assert list(bpffs.glob("bpfproxy*")) == []

    again = run_bpfproxy(lab, "--release", *args)
    assert again.returncode == 0
    assert "has no pinned state" in again.stdout


@pytest.mark.slow
def test_incompatible_pinned_state_asks_for_release(lab: Deployment, bpffs: Path) -> None:
    a = lab.backend("a")
    instance = instance_name()
    args = pinned_args(bpffs, instance)
    proxy = lab.start([app("A", [7001], [a.address])], *args)
    proxy.send(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)
    state = bpffs / "bpfproxy" / instance
    (version,) = state.glob("source-*")
    version.rename(state / "source-0123456789abcdef")  # as if pinned by another version

    started = run_bpfproxy(lab, "-c", str(lab.config_path), *args)
    assert started.returncode == 2
    assert "pinned by another bpfproxy" in started.stderr
    assert f"bpfproxy --release --instance {instance}" in started.stderr
    assert "Traceback" not in started.stderr
    assert run_bpfproxy(lab, "--release", *args).returncode == 0
    assert list(bpffs.glob("bpfproxy*")) == []


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "-x", "x" * 65])
def test_a_bad_instance_name_is_a_usage_error(name: str, capsys: pytest.CaptureFixture) -> None:
    from bpfproxy.cli import main

    assert main(["--instance", name, "--release"]) == 2
    assert "is not an instance name" in capsys.readouterr().err


def test_without_a_bpffs_it_runs_unpinned(lab: Deployment, tmp_path: Path) -> None:
    a = lab.backend("a")
    missing = tmp_path / "no-such-dir"  # nothing can be mounted there
    proxy = lab.start([app("A", [7001], [a.address])], "--bpffs", str(missing))
    proxy.wait_for(r"WARNING .*no-such-dir is not a bpffs .* running without it")
    assert lab.which(7001) == "a"
    proxy.send(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)
    assert refused(lab, 7001)  # nothing pinned: the ports went with the process


@pytest.mark.slow
def test_a_draining_proxy_refuses_new_connections_at_once(lab: Deployment, bpffs: Path) -> None:
    a = lab.backend("a")
    args = (*pinned_args(bpffs, instance_name()), "--drain-timeout", "30")
    proxy = lab.start([app("A", [7001, 7002], [a.address])], *args)
    established = lab.connect(7001)
    assert recv_line(established) == b"a\n"
    mark = proxy.mark()
    proxy.send(signal.SIGTERM)
    proxy.wait_for(r"draining 1 connections", start=mark)
    # Still pinned and steered, no listener: refused, not held (a clean stop is on).
    assert attempt(lab, 7002, timeout=1.5) == "refused"
    established.close()
    assert proxy.proc.wait(TIMEOUT) == 0
    assert list(bpffs.glob("bpfproxy*")) == []


@pytest.mark.slow
def test_pid_file_names_the_process_and_is_removed_at_exit(lab: Deployment, tmp_path: Path) -> None:
    """--pid-file names the process while it serves and is gone after SIGTERM."""
    a = lab.backend("a")
    pid_file = tmp_path / "bpfproxy.pid"
    proxy = lab.start([app("A", [7001], [a.address])], "--pid-file", str(pid_file))
    assert pid_file.read_text() == f"{lab.pid}\n"
    assert lab.which(7001) == "a"
    assert proxy.stop() == 0
    assert not pid_file.exists()


# --------------------------------------------------------------------------- upgrade (SIGUSR2)


@pytest.fixture
def upgrade_lab(netns: NetNS) -> Iterator[Deployment]:
    """A deployment whose config nobody can read (pytest's tmp dirs are root's, 700),
    started with --user nobody: the processes an upgrade starts are nobody from the
    start, with no capability."""
    readable = Path(tempfile.mkdtemp(prefix="bpfproxy-upgrade-"))
    readable.chmod(0o755)
    d = Deployment("bpfproxy", readable / "config.json", netns)
    try:
        yield d
    finally:
        d.close()
        shutil.rmtree(readable)


@contextlib.contextmanager
def every_process_killed(proxy: ProxyProcess, pid_file: Path) -> Iterator[None]:
    """Whatever an upgrade started is killed after the test, whatever happened."""
    try:
        yield
    finally:
        seen = {pid} if (pid := read_pid(pid_file)) is not None else set()
        for line in proxy.lines:
            if "upgrade: started pid " in line:
                seen.add(int(line.split("upgrade: started pid ")[1].split(",")[0]))
        for pid in seen - {proxy.proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: gone(p))


def cap_eff_and_uid(pid: int) -> tuple[int, str]:
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["CapEff"], 16), fields["Uid"].split()[0]


@pytest.mark.slow
def test_workers_upgrade_under_load(lab: Deployment, bpffs: Path) -> None:
    """--workers 2, net.ipv4.tcp_migrate_req=0: three SIGUSR2 in a row under load (the
    second of the first ignored), then a failing one (config made invalid). No short
    connection fails: the new supervisor's worker i serves on the old worker i's
    listener, so no member of the group closes. The long-lived connections go on with
    the first supervisor's workers; each old supervisor and its workers exit once
    drained, without unpinning; the pid file names the newest, which compiled
    nothing and steers a config change; its clean stop releases every port and pin."""
    assert lab.ns is not None
    no_migrate_req(lab.ns)
    b1, b2 = lab.backend("b1"), lab.backend("b2")
    instance = instance_name()
    pid_file = lab.config_path.parent / "bpfproxy.pid"
    args = (*pinned_args(bpffs, instance), "--workers", "2", "--pid-file", str(pid_file),
            "--drain-timeout", "60")  # fmt: skip
    proxy = lab.start([app("A", [7001, 7002], [b1.address])], *args)
    with every_process_killed(proxy, pid_file):
        load = Load(7001, make_socket=lab.make_socket)
        load.start()
        try:
            assert wait_until(lambda: all(load.long_messages) and load.short_ok > 20)
            pids = [lab.pid]
            workers = [children(lab.pid)]
            for i in range(3):
                before = load.short_ok
                pids.append(upgrade(proxy, pid_file, twice=i == 0))
                workers.append(children(pids[-1]))
                assert wait_until(lambda b=before: load.short_ok > b + 20)  # served meanwhile
            newest = pids[-1]
            assert [len(ws) for ws in workers] == [2, 2, 2, 2]
            for pid in [*pids[1:-1], *(w for ws in workers[1:-1] for w in ws)]:
                assert wait_until(lambda p=pid: gone(p)), proxy.output  # drained at once
            counts = list(load.long_messages)  # the first supervisor's workers relay these
            assert wait_until(
                lambda: all(n > c + 3 for n, c in zip(load.long_messages, counts, strict=True))
            )
            assert proxy.proc.poll() is None
            assert (bpffs / "bpfproxy" / instance / "link").exists()  # nobody unpinned

            mark = proxy.mark()
            lab.config_path.write_text('{"Apps": [{"Name": "A", "Ports": ["not a port"]}]}')
            proxy.wait_for(r"rejected|invalid", start=mark)
            os.kill(newest, signal.SIGUSR2)
            proxy.wait_for(r"upgrade failed: pid \d+ exited with code 2", start=mark)
            before = load.short_ok
            assert wait_until(lambda: load.short_ok > before + 20)  # the newest still serves
            assert lab.which(7002) == "b1"

            # A config change after the upgrades: the newest diffs the port map.
            write_config(lab.config_path, [app("A", [7001], [b1.address]),
                                           app("B", [7003], [b2.address])])  # fmt: skip
            assert wait_until(lambda: _reaches(lab, 7003) == "b2"), proxy.output
            assert refused(lab, 7002)
        finally:
            load.finish()
        assert load.failures == [], load.failures
        assert proxy.proc.wait(TIMEOUT) == 0  # drained: its long-lived connections ended
        assert all(gone(pid) for pid in workers[0])
        assert read_pid(pid_file) == newest
        assert lab.which(7001) == "b1"

        os.kill(newest, signal.SIGTERM)  # a clean stop of the newest releases everything
        assert wait_until(lambda: gone(newest))
        assert all(gone(pid) for pid in workers[-1])
        assert refused(lab, 7001)
        assert refused(lab, 7003)
        assert refused(lab, BPF_LISTEN_PORT)
        left = bpffs / "bpfproxy" / instance
        assert not left.exists() or list(left.iterdir()) == []
    out = proxy.output
    assert out.count("compiled and loaded") == 1, out  # by the first supervisor only
    assert out.count("upgrade: started pid") == 4, out  # three, and the failing one
    assert out.count("bpfproxy stopped (pid ") == 3, out
    assert "Traceback" not in out, out


def _reaches(lab: Deployment, port: int) -> str | None:
    try:
        return lab.which(port)
    except OSError:
        return None


@pytest.mark.slow
def test_upgrade_under_load(upgrade_lab: Deployment, bpffs: Path) -> None:
    """Three SIGUSR2 in a row under load: no short connection fails, the long-lived ones
    go on with the first process, each old process exits once drained, without
    unpinning; the new ones compile nothing, hold no capability, and steer a config
    change; a clean stop of the newest releases every port and pin."""
    lab = upgrade_lab
    b1, b2 = lab.backend("b1"), lab.backend("b2")
    instance = instance_name()
    pid_file = lab.config_path.parent / "bpfproxy.pid"  # where nobody can rewrite it
    # --engine epoll: an old unit file's option, accepted (deprecated) by every process
    # the upgrades start from this command line
    args = (*pinned_args(bpffs, instance), "--user", "nobody", "--pid-file", str(pid_file),
            "--engine", "epoll", "--metrics", "127.0.0.1:9100")  # fmt: skip
    proxy = lab.start([app("A", [7001, 7002], [b1.address])], *args)
    with every_process_killed(proxy, pid_file):
        proxy.wait_for(r"serving as uid 65534 gid 65534 \(nobody\) with no capabilities")
        first = lab.pid
        load = Load(7001, make_socket=lab.make_socket)
        load.start()
        assert wait_until(lambda: all(load.long_messages) and load.short_ok > 20)
        pids = [first]
        for i in range(3):
            before = load.short_ok
            pids.append(upgrade(proxy, pid_file, twice=i == 0))
            assert wait_until(lambda b=before: load.short_ok > b + 20)  # served meanwhile
        newest = pids[-1]
        assert cap_eff_and_uid(newest) == (0, "65534")
        for pid in pids[1:-1]:  # only short connections: they exit once drained
            assert wait_until(lambda p=pid: gone(p)), proxy.output
        counts = list(load.long_messages)  # the first one still relays the long-lived
        assert wait_until(
            lambda: all(n > c + 3 for n, c in zip(load.long_messages, counts, strict=True))
        )
        assert proxy.proc.poll() is None
        assert (bpffs / "bpfproxy" / instance / "link").exists()  # nobody unpinned

        # A config change after the upgrades: the newest diffs the port map.
        mark = proxy.mark()
        write_config(lab.config_path, [app("A", [7001], [b1.address]),
                                       app("B", [7003], [b2.address])])  # fmt: skip
        proxy.wait_for(r"port map: 2 ports steered \(added 7003; removed 7002\)", start=mark)
        assert lab.which(7003) == "b2"
        assert refused(lab, 7002)
        load.finish()
        assert load.failures == [], load.failures
        assert proxy.proc.wait(TIMEOUT) == 0  # drained: its long-lived connections ended
        assert read_pid(pid_file) == newest
        assert lab.which(7001) == "b1"
        assert lab.ns is not None and lab.ns.call(_status_pid, 9100) == newest  # handed over

        os.kill(newest, signal.SIGTERM)  # a clean stop of the newest releases everything
        assert wait_until(lambda: gone(newest))
        assert refused(lab, 7001)
        assert refused(lab, 7003)
        assert refused(lab, BPF_LISTEN_PORT)
        left = bpffs / "bpfproxy" / instance
        assert not left.exists() or list(left.iterdir()) == []  # an empty directory may stay
        # (the pid file stays: nobody may not unlink in its root-owned directory)
    out = proxy.output
    assert out.count("compiled and loaded") == 1, out  # by the first process only
    assert out.count("upgrade: started pid") == 3, out  # the second SIGUSR2 started none
    assert out.count("bpfproxy stopped (pid ") == 3, out
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_failing_upgrade_keeps_the_old_process(upgrade_lab: Deployment, bpffs: Path) -> None:
    """The config made invalid on disk, then SIGUSR2: the new process refuses it and
    exits; the old one goes on serving its ports, and no connection fails."""
    lab = upgrade_lab
    b1 = lab.backend("b1")
    pid_file = lab.config_path.parent / "bpfproxy.pid"
    args = (*pinned_args(bpffs, instance_name()), "--user", "nobody",
            "--pid-file", str(pid_file))  # fmt: skip
    proxy = lab.start([app("A", [7001, 7002], [b1.address])], *args)
    with every_process_killed(proxy, pid_file):
        load = Load(7001, make_socket=lab.make_socket)
        load.start()
        assert wait_until(lambda: all(load.long_messages) and load.short_ok > 20)
        mark = proxy.mark()
        lab.config_path.write_text('{"Apps": [{"Name": "A", "Ports": ["not a port"]}]}')
        proxy.wait_for(r"rejected|invalid", start=mark)  # the running one keeps its config
        proxy.send(signal.SIGUSR2)
        proxy.wait_for(r"upgrade failed: pid \d+ exited with code 2", start=mark)
        before = load.short_ok
        assert wait_until(lambda: load.short_ok > before + 20)
        assert lab.which(7002) == "b1"
        load.finish()
        assert load.failures == [], load.failures
        assert read_pid(pid_file) == proxy.proc.pid
        assert proxy.stop() == 0
        assert refused(lab, 7001)


@pytest.mark.slow
def test_a_stopping_process_refuses_the_hand_over(lab: Deployment, bpffs: Path) -> None:
    """The old process is stopping when the new one says "ready": it answers no "go",
    and the new one does not take over (no pid file, no MAINPID=, it exits, leaving
    the BPF state to the old one, whose clean stop then releases every port)."""
    b1 = lab.backend("b1")
    instance = instance_name()
    pid_file = lab.config_path.parent / "bpfproxy.pid"
    systemd = FakeSystemd(lab.config_path.parent / "notify.sock")
    write_config(lab.config_path, [app("A", [7001], [b1.address])])
    argv = lab.argv(*pinned_args(bpffs, instance), "--pid-file", str(pid_file),
                    "--drain-timeout", "60")  # fmt: skip
    proxy = ProxyProcess(lab.popen_argv(argv), env=systemd.env)
    try:
        proxy.wait_for(r"bpfproxy started")
        with lab.connect(7001) as hold:
            assert recv_line(hold) == b"b1\n"
            refuse_while_stopping(proxy, pid_file, systemd, hold)
        assert refused(lab, 7001)
        left = bpffs / "bpfproxy" / instance
        assert not left.exists() or list(left.iterdir()) == []
    finally:
        kill_started(proxy)
        systemd.close()


def test_a_listener_that_cannot_be_given_away_is_a_steering_error() -> None:
    """BpfPlan.hand_to: a failing fchown says what, as Instance.hand_to does."""
    from bpfproxy.errors import SteeringError
    from bpfproxy.plan import BpfPlan
    from tcpproxy.privileges import Account

    plan = BpfPlan.__new__(BpfPlan)
    closed = socket.socket()
    closed.close()
    plan._listeners = [closed]
    with pytest.raises(SteeringError, match="cannot give the listener"):
        plan.hand_to(Account("nobody", 65534, 65534))


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_a_failed_first_start_leaves_no_pin(lab: Deployment, bpffs: Path, workers: int) -> None:
    """--metrics cannot bind (a backend holds its port): exit 2, and the state made
    for this start is unpinned, so no port stays captured."""
    a = lab.backend("a")
    write_config(lab.config_path, [app("A", [7001], [a.address])])
    metrics = a.address
    args = (*pinned_args(bpffs, instance_name()), "--metrics", metrics, "--workers", str(workers))
    argv = lab.popen_argv(lab.argv(*args))
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert failed.returncode == 2, failed.stderr
    assert "--metrics" in failed.stderr
    assert list(bpffs.glob("bpfproxy/*/*")) == []
    assert refused(lab, 7001)
