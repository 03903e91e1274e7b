"""Both binaries, started as root, serve as --user with no capability, and still work.

Each test runs the real binary in a network namespace it creates, with a
config in a directory the unprivileged user can read, and checks
/proc/PID/status of the serving process (and of its workers): uid, gid,
CapEff, CapPrm, CapAmb, NoNewPrivs. Then the things that need the kernel
after the drop: steering, a reload that adds and removes ports, a
restarted worker, a clean stop that releases every port and pin.

Without --user, a config nobody cannot read (in a mode-700 directory) is no
error: the process drops to nobody all the same but keeps CAP_DAC_READ_SEARCH,
and its reloads, its config watcher and its workers still work. Where that
capability is not permitted (run under setpriv without it in the bounding
set, as in a container), it stays root with no capability instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpproxy.privileges import Unreadable, under_service_manager, when_unreadable
from tests.deploy import BPF_LISTEN_PORT, Deployment
from tests.helpers import (
    ROOT,
    TIMEOUT,
    ProxyProcess,
    app,
    exchange,
    free_ports,
    wait_until,
    write_config,
)
from tests.netns import NetNS

NOBODY = 65534
CAP_DAC_READ_SEARCH = 1 << 2
CAP_NET_BIND_SERVICE = 1 << 10

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (it drops it)")


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp dirs are mode 700, root's)."""
    path = Path(tempfile.mkdtemp(prefix="tcpproxy-privileges-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def deployment(binary: str, readable_dir: Path, netns: NetNS) -> Iterator[Deployment]:
    d = Deployment(binary, readable_dir / "config.json", netns)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def bpf_lab(readable_dir: Path, netns: NetNS) -> Iterator[Deployment]:
    yield from deployment("bpfproxy", readable_dir, netns)


@pytest.fixture
def tcp_lab(readable_dir: Path, netns: NetNS) -> Iterator[Deployment]:
    yield from deployment("tcpproxy", readable_dir, netns)


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A bpffs of the test's own (under a mode-700 dir: nobody cannot walk to it)."""
    root = tmp_path / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True, timeout=TIMEOUT)
    try:
        yield root
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=False, timeout=TIMEOUT)


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def children(pid: int) -> list[int]:
    """The process's children, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(found)


def assert_dropped(pid: int, caps: int = 0) -> None:
    """Uid and gid nobody (real, effective, saved), no groups, only `caps`, no_new_privs."""
    fields = status(pid)
    assert fields["Uid"].split()[:3] == [str(NOBODY)] * 3, fields["Uid"]
    assert fields["Gid"].split()[:3] == [str(NOBODY)] * 3, fields["Gid"]
    assert fields["Groups"] == ""
    assert int(fields["CapEff"], 16) == caps
    assert int(fields["CapPrm"], 16) == caps
    assert int(fields["CapAmb"], 16) in (0, caps)
    assert fields["NoNewPrivs"] == "1"


def refused(d: Deployment, port: int) -> bool:
    try:
        d.connect(port).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_bpfproxy_serves_reloads_and_stops_as_nobody(
    bpf_lab: Deployment, bpffs: Path, workers: int
) -> None:
    a, b = bpf_lab.backend("a"), bpf_lab.backend("b")
    instance = f"privileges-{os.getpid()}"
    proxy = bpf_lab.start(
        [app("A", [7001, 7002], [a.address])],
        "--user", "nobody", "--bpffs", str(bpffs), "--instance", instance,
        "--workers", str(workers),
    )  # fmt: skip
    proxy.wait_for(r"serving as uid 65534 gid 65534 \(nobody\) with no capabilities")
    assert_dropped(bpf_lab.pid)
    # The compiler ran in a child that is gone: no bcc/LLVM in the serving process.
    maps = Path(f"/proc/{bpf_lab.pid}/maps").read_text()
    assert "libbcc" not in maps and "LLVM" not in maps
    if workers > 1:
        wait_until(lambda: len(children(bpf_lab.pid)) == workers)
        for pid in children(bpf_lab.pid):
            assert_dropped(pid)
    assert bpf_lab.which(7001) == "a"

    # A reload after the drop: map updates on the descriptors held.
    mark = proxy.mark()
    apps = [app("A", [7001], [a.address]), app("B", [7003], [b.address])]
    write_config(bpf_lab.config_path, apps)
    proxy.wait_for(r"applied", start=mark)
    assert bpf_lab.which(7003) == "b"
    assert bpf_lab.which(7001) == "a"
    assert refused(bpf_lab, 7002)

    if workers > 1:  # a restarted worker gets a listener the supervisor opens as nobody
        dead = children(bpf_lab.pid)[0]
        mark = proxy.mark()
        os.kill(dead, signal.SIGKILL)
        proxy.wait_for(r"started", start=mark)
        wait_until(lambda: dead not in children(bpf_lab.pid))
        wait_until(lambda: len(children(bpf_lab.pid)) == workers)
        for _ in range(10):  # whichever worker's listener the port is steered to
            assert bpf_lab.which(7001) == "a"

    # A clean stop as nobody still releases every port and removes every pin.
    assert proxy.stop(signal.SIGTERM) == 0
    assert refused(bpf_lab, 7001)
    assert refused(bpf_lab, 7003)
    assert refused(bpf_lab, BPF_LISTEN_PORT)
    left = bpffs / "bpfproxy" / instance
    assert not left.exists() or list(left.iterdir()) == []  # an empty directory may stay


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_tcpproxy_as_root_binds_then_serves_as_nobody(tcp_lab: Deployment, workers: int) -> None:
    a, b = tcp_lab.backend("a"), tcp_lab.backend("b")
    proxy = tcp_lab.start([app("A", [7001], [a.address])], "--user", "nobody",
                          "--workers", str(workers))  # fmt: skip
    proxy.wait_for(r"serving as uid 65534 gid 65534 \(nobody\) with no capabilities")
    assert_dropped(tcp_lab.pid)
    for pid in children(tcp_lab.pid):
        assert_dropped(pid)
    assert tcp_lab.which(7001) == "a"
    mark = proxy.mark()
    apps = [app("A", [7001], [a.address]), app("B", [7002], [b.address])]
    write_config(tcp_lab.config_path, apps)
    proxy.wait_for(r"applied", start=mark)
    assert tcp_lab.which(7002) == "b"
    assert proxy.stop(signal.SIGTERM) == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_tcpproxy_keeps_only_net_bind_service_for_a_low_port(
    tcp_lab: Deployment, workers: int
) -> None:
    a, b = tcp_lab.backend("a"), tcp_lab.backend("b")
    proxy = tcp_lab.start([app("A", [80], [a.address])], "--user", "nobody",
                          "--workers", str(workers))  # fmt: skip
    proxy.wait_for(r"serving as .* with only CAP_NET_BIND_SERVICE")
    assert_dropped(tcp_lab.pid, CAP_NET_BIND_SERVICE)
    for pid in children(tcp_lab.pid):  # the workers bind the ports: ambient
        assert_dropped(pid, CAP_NET_BIND_SERVICE)
    assert tcp_lab.which(80) == "a"
    mark = proxy.mark()
    write_config(tcp_lab.config_path, [app("A", [80], [a.address]), app("B", [81], [b.address])])
    proxy.wait_for(r"applied", start=mark)
    assert tcp_lab.which(81) == "b"


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
def test_bpfproxy_keeps_only_net_bind_service_for_a_low_port(
    bpf_lab: Deployment, bpffs: Path, workers: int
) -> None:
    """-p and --metrics below 1024: the supervisor (or the single process) keeps
    CAP_NET_BIND_SERVICE, so a restarted worker's listener binds again."""
    a = bpf_lab.backend("a")
    proxy = bpf_lab.start(
        [app("A", [7001], [a.address])],
        "-p", "80", "--metrics", "127.0.0.1:90", "--user", "nobody", "--bpffs", str(bpffs),
        "--instance", f"low-{os.getpid()}", "--workers", str(workers),
    )  # fmt: skip
    proxy.wait_for(r"serving as .* with only CAP_NET_BIND_SERVICE")
    assert_dropped(bpf_lab.pid, CAP_NET_BIND_SERVICE)
    assert bpf_lab.which(7001) == "a"
    with bpf_lab.connect(90) as sock:
        sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        assert sock.recv(12) in (b"HTTP/1.0 200", b"HTTP/1.1 200")  # h11 answers 1.1
    if workers > 1:
        wait_until(lambda: len(children(bpf_lab.pid)) == workers)
        dead = children(bpf_lab.pid)[0]
        mark = proxy.mark()
        os.kill(dead, signal.SIGKILL)
        proxy.wait_for(r"started", start=mark)
        wait_until(lambda: dead not in children(bpf_lab.pid))
        wait_until(lambda: len(children(bpf_lab.pid)) == workers)
        for _ in range(10):  # whichever worker's listener the port is steered to
            assert bpf_lab.which(7001) == "a"
        for pid in children(bpf_lab.pid):  # their supervisor binds for them: none here
            assert_dropped(pid)
        # The supervisor an upgrade starts keeps it (ambient), for its own restarts.
        mark = proxy.mark()
        proxy.send(signal.SIGUSR2)
        new = int(proxy.wait_for(r"pid (\d+) serves", start=mark)[1])
        assert proxy.proc.wait(TIMEOUT) == 0
        try:
            assert_dropped(new, CAP_NET_BIND_SERVICE)
            wait_until(lambda: len(children(new)) == workers)
            dead = children(new)[0]
            mark = proxy.mark()
            os.kill(dead, signal.SIGKILL)
            proxy.wait_for(r"started", start=mark)
            wait_until(lambda: dead not in children(new) and len(children(new)) == workers)
            for _ in range(10):
                assert bpf_lab.which(7001) == "a"
        finally:
            os.kill(new, signal.SIGTERM)
            wait_until(lambda: not alive(new))
        return
    assert proxy.stop(signal.SIGTERM) == 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (not gone, not a zombie nobody reaped yet)."""
    try:
        return status(pid)["State"][0] != "Z"
    except FileNotFoundError:
        return False


def run_tcpproxy(
    *args: str, runner: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*runner, sys.executable, "-m", "tcpproxy", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip


def test_a_config_the_user_cannot_read_is_a_startup_error(tmp_path: Path) -> None:
    config = tmp_path / "config.json"  # under pytest's mode-700 tmp dir
    write_config(config, [app("A", [7001], ["127.0.0.1:9"])])
    proc = run_tcpproxy("-c", str(config), "--user", "nobody")
    assert proc.returncode == 2, proc.stderr
    assert "user nobody (--user) cannot read the config file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_fifo_config_is_refused_not_waited_on(readable_dir: Path) -> None:
    """Checking that --user can read the config must not open a FIFO and wait for a
    writer: the start goes on to the reader, which refuses it."""
    config = readable_dir / "config.json"
    os.mkfifo(config)  # mode 644 after the umask: nobody may open it
    proc = run_tcpproxy("-c", str(config), "--user", "nobody", timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert f"{config}: is a FIFO (named pipe), not a regular file" in proc.stderr


def test_user_without_root_is_a_usage_error() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    runner = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    proc = run_tcpproxy("-c", "/nonexistent.json", "--user", "root", runner=runner)
    assert proc.returncode == 2, proc.stderr
    assert "only root can switch to another user" in proc.stderr


@pytest.mark.slow
@pytest.mark.bpf
def test_bpfproxy_without_a_bpffs_drops_too(bpf_lab: Deployment, tmp_path: Path) -> None:
    """Unpinned state (no bpffs can be had): the descriptors came from the compile
    child all the same, and serving, a reload and a clean stop work as nobody."""
    a = bpf_lab.backend("a")
    missing = tmp_path / "no-such-dir"  # nothing can be mounted there
    proxy = bpf_lab.start([app("A", [7001], [a.address])], "--user", "nobody",
                          "--bpffs", str(missing))  # fmt: skip
    proxy.wait_for(r"running without it")
    proxy.wait_for(r"serving as uid 65534 gid 65534 \(nobody\) with no capabilities")
    assert_dropped(bpf_lab.pid)
    assert bpf_lab.which(7001) == "a"
    mark = proxy.mark()
    write_config(bpf_lab.config_path, [app("A", [7002], [a.address])])
    proxy.wait_for(r"applied", start=mark)
    assert bpf_lab.which(7002) == "a"
    assert refused(bpf_lab, 7001)
    assert proxy.stop(signal.SIGTERM) == 0
    assert refused(bpf_lab, 7002)


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    """A mode-700 directory of root's, as tempfile.mkdtemp and pytest's tmp_path make."""
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    return path


def inotify_inodes(pid: int) -> set[int]:
    """The inodes a process watches with inotify, from its /proc fdinfo."""
    inodes = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue  # closed meanwhile
        for line in lines:
            if line.startswith("inotify wd:"):
                inodes.add(int(line.split("ino:")[1].split()[0], 16))
    return inodes


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
@pytest.mark.parametrize(
    "binary", ["tcpproxy", pytest.param("bpfproxy", marks=pytest.mark.bpf)]
)  # fmt: skip
def test_default_user_keeps_dac_read_search_for_a_private_config(
    binary: str,
    workers: int,
    private_dir: Path,
    bpffs: Path,
    netns: NetNS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No --user and a config nobody cannot read: the proxy serves as nobody with
    CAP_DAC_READ_SEARCH only (workers too), warns once naming the file, watches its
    directory with inotify, and applies a reload."""
    for variable in ("TCPPROXY_USER", "BPFPROXY_USER"):  # conftest sets them to root
        monkeypatch.delenv(variable, raising=False)
    d = Deployment(binary, private_dir / "config.json", netns)
    try:
        a, b = d.backend("a"), d.backend("b")
        extra = ("--bpffs", str(bpffs), "--instance", f"private-{os.getpid()}")
        proxy = d.start([app("A", [7001], [a.address])], "--workers", str(workers),
                        *(extra if binary == "bpfproxy" else ()))  # fmt: skip
        warning = proxy.wait_for(
            r"WARNING user nobody cannot read the config file (\S+) \(Permission denied\): "
            r"serving as nobody anyway, keeping CAP_DAC_READ_SEARCH .* or pass --user"
        )
        assert warning.group(1) == str(d.config_path)
        assert len(proxy.output.split("cannot read the config file")) == 2  # said once
        proxy.wait_for(r"serving as uid 65534 gid 65534 \(nobody\) with only CAP_DAC_READ_SEARCH")
        assert_dropped(d.pid, CAP_DAC_READ_SEARCH)
        if workers > 1:
            wait_until(lambda: len(children(d.pid)) == workers)
            for pid in children(d.pid):  # ambient: they import the code and read too
                assert_dropped(pid, CAP_DAC_READ_SEARCH)
        assert d.which(7001) == "a"
        # The watcher (not only the stat() poll) got its inotify watch on the directory.
        wait_until(lambda: private_dir.stat().st_ino in inotify_inodes(d.pid))

        mark = proxy.mark()
        write_config(d.config_path, [app("A", [7001], [a.address]), app("B", [7002], [b.address])])
        proxy.wait_for(r"applied", start=mark)
        assert d.which(7002) == "b"
        assert proxy.stop(signal.SIGTERM) == 0
    finally:
        d.close()


@pytest.mark.parametrize("how", ["option", "env"])
@pytest.mark.parametrize(
    "binary", ["tcpproxy", pytest.param("bpfproxy", marks=pytest.mark.bpf)]
)  # fmt: skip
def test_an_explicit_user_that_cannot_read_is_still_an_error(
    binary: str, how: str, private_dir: Path, netns: NetNS
) -> None:
    """--user nobody (or its environment variable) named the account: no capability is
    kept to make up for it, the start fails before any setup (in a namespace of the
    test's all the same, should it not)."""
    config = private_dir / "config.json"
    write_config(config, [app("A", [7001], ["127.0.0.1:9"])])
    argv = ["ip", "netns", "exec", netns.name, sys.executable, "-m", binary, "-c", str(config)]
    if binary == "bpfproxy":
        argv += ["-p", str(BPF_LISTEN_PORT)]
    env = {k: v for k, v in os.environ.items() if k not in ("TCPPROXY_USER", "BPFPROXY_USER")}
    if how == "option":
        argv += ["--user", "nobody"]
    else:
        env[f"{binary.upper()}_USER"] = "nobody"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=env, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"user nobody (--user) cannot read the config file {config}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("chosen", "permitted", "expected"),
    [
        (True, True, Unreadable.REFUSE),  # rule 1: named, whatever could be kept
        (True, False, Unreadable.REFUSE),
        (False, True, Unreadable.KEEP_READ_SEARCH),  # rule 2: a host's root
        (False, False, Unreadable.STAY),  # rule 3: Docker's default capabilities
    ],
)
def test_when_the_account_cannot_read(chosen: bool, permitted: bool, expected: Unreadable) -> None:
    assert when_unreadable(chosen=chosen, read_search_permitted=permitted) is expected
    # rule 4: under a service manager root never stays root unasked
    managed = when_unreadable(chosen=chosen, read_search_permitted=permitted, managed=True)
    assert managed is (Unreadable.REFUSE if expected is Unreadable.STAY else expected)


def test_a_service_manager_is_seen_by_its_variables() -> None:
    assert not under_service_manager({})
    assert under_service_manager({"INVOCATION_ID": "5f0c"})
    assert under_service_manager({"NOTIFY_SOCKET": "/run/systemd/notify"})


def without_dac_read_search() -> tuple[str, ...]:
    """A prefix that runs a command with CAP_DAC_READ_SEARCH out of its bounding set, so
    root is not permitted it (as in a container with Docker's default capabilities)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return (setpriv, "--bounding-set", "-dac_read_search", "--")


@pytest.mark.parametrize("variable", ["INVOCATION_ID", "NOTIFY_SOCKET"])
def test_under_a_service_manager_root_does_not_stay_root_unasked(
    variable: str, private_dir: Path, netns: NetNS
) -> None:
    """As the newcomer's case, but started by a service manager (a unit whose bounding
    set leaves CAP_DAC_READ_SEARCH out): exit 2 naming the file, not uid 0 unasked."""
    config = private_dir / "config.json"
    write_config(config, [app("A", [7001], ["127.0.0.1:9"])])
    argv = ["ip", "netns", "exec", netns.name, *without_dac_read_search(), sys.executable,
            "-m", "tcpproxy", "-c", str(config)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TCPPROXY_USER", "BPFPROXY_USER")}
    env[variable] = str(private_dir / "notify") if variable == "NOTIFY_SOCKET" else "5f0c"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=env, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"user nobody (--user) cannot read the config file {config}" in proc.stderr
    assert "under a service manager root does not stay root unasked" in proc.stderr
    assert "Traceback" not in proc.stderr


def assert_root_without_capabilities(pid: int) -> None:
    fields = status(pid)
    assert fields["Uid"].split()[:3] == ["0"] * 3, fields["Uid"]
    for caps in ("CapEff", "CapPrm", "CapAmb"):
        assert int(fields[caps], 16) == 0, (caps, fields[caps])
    assert fields["NoNewPrivs"] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])
@pytest.mark.parametrize(
    "binary", ["tcpproxy", pytest.param("bpfproxy", marks=pytest.mark.bpf)]
)  # fmt: skip
def test_default_user_stays_root_without_capabilities_where_it_cannot_read_search(
    binary: str,
    workers: int,
    private_dir: Path,
    bpffs: Path,
    netns: NetNS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The newcomer's case: root in a container (no CAP_DAC_READ_SEARCH to keep), no
    --user, a config nobody cannot read. The proxy serves as root with no capability
    (workers too), warns once naming the file and how to serve as nobody, applies a
    reload, and an upgrade's new process (root, no capability) serves too."""
    for variable in ("TCPPROXY_USER", "BPFPROXY_USER"):  # conftest sets them to root
        monkeypatch.delenv(variable, raising=False)
    prefix = without_dac_read_search()
    d = Deployment(binary, private_dir / "config.json", netns)
    new = None
    try:
        a, b = d.backend("a"), d.backend("b")
        extra = ("--bpffs", str(bpffs), "--instance", f"stay-{os.getpid()}")
        proxy = d.start([app("A", [7001], [a.address])], "--workers", str(workers),
                        *(extra if binary == "bpfproxy" else ()), prefix=prefix)  # fmt: skip
        warning = proxy.wait_for(
            r"WARNING user nobody cannot read the config file (\S+) \(Permission denied; "
            r"CAP_DAC_READ_SEARCH, which would read it anyway, is not permitted here\): "
            r"serving as root \(uid 0\) with no capabilities instead, as --user root does; "
            r"to serve as nobody, make it .* or pass --user"
        )
        assert warning.group(1) == str(d.config_path)
        assert len(proxy.output.split("cannot read the config file")) == 2  # said once
        proxy.wait_for(r"serving as uid 0 gid 0 \(root\) with no capabilities")
        assert_root_without_capabilities(d.pid)
        if workers > 1:
            wait_until(lambda: len(children(d.pid)) == workers)
            for pid in children(d.pid):
                assert_root_without_capabilities(pid)
        assert d.which(7001) == "a"

        mark = proxy.mark()
        write_config(d.config_path, [app("A", [7001], [a.address]), app("B", [7002], [b.address])])
        proxy.wait_for(r"applied", start=mark)
        assert d.which(7002) == "b"

        # The new process stays root too: it does not try to become nobody.
        mark = proxy.mark()
        proxy.send(signal.SIGUSR2)
        new = int(proxy.wait_for(r"pid (\d+) serves", start=mark)[1])
        assert proxy.proc.wait(TIMEOUT) == 0
        assert_root_without_capabilities(new)
        assert d.which(7002) == "b"
    finally:
        if new is not None and alive(new):
            os.kill(new, signal.SIGTERM)
            wait_until(lambda: not alive(new))
        d.close()


def test_default_user_refused_where_root_without_capabilities_cannot_read_either(
    readable_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staying root is checked too: a file of another user's (mode 600) that neither
    nobody nor root without capabilities can read is still an error at start."""
    monkeypatch.delenv("TCPPROXY_USER", raising=False)
    config = readable_dir / "config.json"
    write_config(config, [app("A", [7001], ["127.0.0.1:9"])])
    config.chmod(0o600)
    os.chown(config, 12345, 12345)
    proc = run_tcpproxy("-c", str(config), runner=without_dac_read_search())
    assert proc.returncode == 2, proc.stderr
    assert (
        f"user nobody (--user) cannot read the config file {config} (Permission denied; "
        "CAP_DAC_READ_SEARCH, which would read it anyway, is not permitted here, and root "
        "cannot without capabilities)"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_explicit_user_is_not_replaced_by_root(private_dir: Path) -> None:
    """--user nobody, named, that cannot read: exit 2 also where root would stay root."""
    config = private_dir / "config.json"
    write_config(config, [app("A", [7001], ["127.0.0.1:9"])])
    proc = run_tcpproxy("-c", str(config), "--user", "nobody", runner=without_dac_read_search())
    assert proc.returncode == 2, proc.stderr
    assert f"user nobody (--user) cannot read the config file {config}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_make_run_as_root_stops_its_echo_backends(
    readable_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run`'s demo started as root serves as nobody, and can no longer signal the
    echo backends it started as root: SIGTERM to it alone (not its process group)
    still stops it cleanly, and them with it."""
    monkeypatch.delenv("TCPPROXY_USER", raising=False)
    port, target = free_ports(2)
    config = readable_dir / "config.json"
    write_config(config, [app("A", [port], [f"127.0.0.1:{target}"])])
    config.chmod(0o644)
    demo = ProxyProcess([sys.executable, "-m", "tcpproxy.demo", "--config", str(config)])
    echo = None
    try:
        demo.wait_for(r"serving as uid 65534 gid 65534 \(nobody\) with no capabilities")
        demo.wait_for(r"echo backends on 127.0.0.1 ports")
        [echo] = children(demo.proc.pid)
        assert status(echo)["Uid"].split()[0] == "0"
        assert wait_until(lambda: exchange(port) == b"hello")
        assert demo.stop(signal.SIGTERM) == 0, demo.output
        assert "Traceback" not in demo.output
        assert wait_until(lambda: not alive(echo))
    finally:
        demo.kill()
        if echo is not None and alive(echo):
            os.kill(echo, signal.SIGKILL)
