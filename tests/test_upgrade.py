"""--pid-file and the upgrade on SIGUSR2: real processes, real sockets, clients under load."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from tcpproxy.notify import Notifier
from tcpproxy.upgrade import UPGRADE_FD_ENV, Handover, successor_environment
from tests.deploy import BINARIES, Deployment
from tests.helpers import (
    TIMEOUT,
    ProxyProcess,
    app,
    connect,
    free_port,
    recv_all,
    recv_line,
    tcpproxy_argv,
    wait_until,
    which_backend,
    write_config,
)
from tests.netns import NetNS

LONG_LIVED = 5  # connections held through the upgrades
SHORT_LOOPS = 4  # clients in a connect/send/receive/close loop
MESSAGE_INTERVAL = 0.1  # seconds between a long-lived connection's messages


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


class Load:
    """Short connections in loops and long-lived ones, counting every failure."""

    def __init__(
        self, port: int, make_socket: Callable[[int], socket.socket] | None = None
    ) -> None:
        self.port = port
        self.make_socket = make_socket  # where clients connect from (a netns); None: here
        self.stop = threading.Event()
        self.short_ok = 0
        self.failures: list[str] = []
        self.long_messages = [0] * LONG_LIVED
        self.end_long = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._short, daemon=True) for _ in range(SHORT_LOOPS)
        ] + [threading.Thread(target=self._long, args=(i,), daemon=True) for i in range(LONG_LIVED)]

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def _short(self) -> None:
        while not self.stop.is_set():
            try:
                with connect(self.port, make_socket=self.make_socket) as sock:
                    sock.sendall(b"ping")
                    sock.shutdown(socket.SHUT_WR)
                    answer = recv_all(sock)
                if answer != b"b1\nping":
                    self._fail(f"short: answer {answer!r}")
                else:
                    with self._lock:
                        self.short_ok += 1
            except OSError as exc:
                self._fail(f"short: {exc!r}")

    def _long(self, index: int) -> None:
        try:
            with connect(self.port, make_socket=self.make_socket) as sock:
                if recv_line(sock) != b"b1\n":
                    self._fail(f"long {index}: no greeting")
                    return
                n = 0
                while not self.end_long.is_set():
                    message = f"{index}:{n}\n".encode()
                    sock.sendall(message)
                    got = b""
                    while len(got) < len(message):
                        chunk = sock.recv(len(message) - len(got))
                        if not chunk:
                            raise ConnectionError("closed by the proxy")
                        got += chunk
                    if got != message:
                        self._fail(f"long {index}: {got!r} for {message!r}")
                        return
                    n += 1
                    self.long_messages[index] = n
                    time.sleep(MESSAGE_INTERVAL)
        except OSError as exc:
            self._fail(f"long {index}: {exc!r}")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.end_long.set()
        for thread in self._threads:
            thread.join(TIMEOUT)


@contextlib.contextmanager
def proxy_with_pid_file(config: Path, pid_file: Path, *args: str) -> Iterator[ProxyProcess]:
    """tcpproxy with --pid-file; every process it named is killed afterwards."""
    proxy = ProxyProcess(tcpproxy_argv(config, "--pid-file", str(pid_file), *args))
    seen: set[int] = {proxy.proc.pid}
    try:
        proxy.wait_for(r"tcpproxy started")
        yield proxy
    finally:
        if (pid := read_pid(pid_file)) is not None:
            seen.add(pid)
        for line in proxy.lines:
            if "upgrade: started pid " in line:
                seen.add(int(line.split("upgrade: started pid ")[1].split(",")[0]))
        for pid in seen - {proxy.proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proxy.kill()


def test_pid_file_names_the_process_and_is_removed_at_exit(config_path: Path, backends) -> None:
    port = free_port()
    write_config(config_path, [app("A", [port], [backends("b1").address])])
    pid_file = config_path.parent / "tcpproxy.pid"
    with proxy_with_pid_file(config_path, pid_file, "--user", "root") as proxy:
        assert read_pid(pid_file) == proxy.proc.pid
        assert which_backend(port) == "b1"
        assert proxy.stop() == 0
    assert not pid_file.exists()
    assert not list(config_path.parent.glob(".tcpproxy.pid.*"))  # no temp file left


def upgrade(proxy: ProxyProcess, pid_file: Path, *, twice: bool = False) -> int:
    """SIGUSR2 to the process the pid file names; the new pid, once the old one let go.

    `twice`: a second SIGUSR2 at once, which the upgrade in flight ignores."""
    old = read_pid(pid_file)
    assert old is not None
    mark = proxy.mark()
    os.kill(old, signal.SIGUSR2)
    if twice:
        proxy.wait_for(r"upgrade: started pid", start=mark)
        os.kill(old, signal.SIGUSR2)
        proxy.wait_for(r"SIGUSR2 ignored: an upgrade is in flight", start=mark)
    match = proxy.wait_for(r"upgrade: pid (\d+) serves; this process \(pid (\d+)\)", start=mark)
    new = int(match[1])
    assert int(match[2]) == old
    assert wait_until(lambda: read_pid(pid_file) == new)
    return new


@pytest.mark.slow
def test_upgrade_under_load(config_path: Path, backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three upgrades in a row: no short connection fails, the long-lived ones go on
    with the first process, each old process exits once drained. As nobody: the new
    processes start unprivileged, and read the config in a private directory with
    the CAP_DAC_READ_SEARCH they inherit."""
    monkeypatch.delenv("TCPPROXY_USER", raising=False)  # conftest sets it to root
    port, added, metrics = free_port(), free_port(), free_port()
    write_config(config_path, [app("A", [port], [backends("b1").address])])
    pid_file = config_path.parent / "tcpproxy.pid"
    with proxy_with_pid_file(config_path, pid_file, "--metrics", f"127.0.0.1:{metrics}") as proxy:
        proxy.wait_for(r"serving as uid 65534 .* with only CAP_DAC_READ_SEARCH")
        first = proxy.proc.pid
        load = Load(port)
        load.start()
        assert wait_until(lambda: all(load.long_messages) and load.short_ok > 20)
        pids = [first]
        for i in range(3):
            before = load.short_ok
            pids.append(upgrade(proxy, pid_file, twice=i == 0))
            assert wait_until(lambda b=before: load.short_ok > b + 20)  # served meanwhile
        newest = pids[-1]
        # the processes in between had only short connections: they exit once drained
        for pid in pids[1:-1]:
            assert wait_until(lambda p=pid: gone(p)), proxy.output
        # the first one still relays the long-lived connections
        counts = list(load.long_messages)
        assert wait_until(
            lambda: all(n > c + 3 for n, c in zip(load.long_messages, counts, strict=True))
        )
        assert proxy.proc.poll() is None
        # a config change after the upgrades is applied (by the newest process)
        write_config(
            config_path,
            [
                app("A", [port], [backends("b1").address]),
                app("B", [added], [backends("b2").address]),
            ],
        )
        assert wait_until(lambda: _reaches(added) == "b2"), proxy.output
        load.finish()
        assert load.failures == [], load.failures
        assert proxy.proc.wait(TIMEOUT) == 0  # drained: its long-lived connections ended
        assert read_pid(pid_file) == newest
        assert not gone(newest)
        assert wait_until(lambda: _status_pid(metrics) == newest)  # it serves /status too
        assert _status(newest)["Uid"].split()[0] == "65534", proxy.output
        assert which_backend(port) == "b1"
        os.kill(newest, signal.SIGTERM)
        assert wait_until(lambda: gone(newest))
    out = proxy.output
    assert out.count("tcpproxy stopped (pid ") == 3, out  # the second SIGUSR2 started none
    assert out.count("upgrade: started pid") == 3, out
    assert "Traceback" not in out, out


def _status_pid(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=TIMEOUT) as r:
            return json.load(r)["pid"]
    except OSError:
        return None


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _reaches(port: int, make_socket: Callable[[int], socket.socket] | None = None) -> str | None:
    try:
        return which_backend(port, make_socket=make_socket)
    except OSError:
        return None


@pytest.mark.slow
def test_failing_upgrade_keeps_the_old_process(config_path: Path, backends) -> None:
    """The config is made invalid on disk, then SIGUSR2: the new process refuses
    it and exits; the old one goes on serving, and no connection fails."""
    port = free_port()
    write_config(config_path, [app("A", [port], [backends("b1").address])])
    pid_file = config_path.parent / "tcpproxy.pid"
    with proxy_with_pid_file(config_path, pid_file) as proxy:
        load = Load(port)
        load.start()
        assert wait_until(lambda: all(load.long_messages) and load.short_ok > 20)
        mark = proxy.mark()
        config_path.write_text('{"Apps": [{"Name": "A", "Ports": ["not a port"]}]}')
        proxy.wait_for(r"rejected|invalid", start=mark)  # the running one keeps its config
        proxy.send(signal.SIGUSR2)
        proxy.wait_for(r"upgrade failed: pid \d+ exited with code 2", start=mark)
        again = proxy.mark()
        proxy.send(signal.SIGUSR2)  # a new try, after the failure, fails the same way
        proxy.wait_for(r"upgrade failed: pid \d+ exited", start=again)
        before = load.short_ok
        assert wait_until(lambda: load.short_ok > before + 20)
        load.finish()
        assert load.failures == [], load.failures
        assert read_pid(pid_file) == proxy.proc.pid
        assert proxy.stop() == 0


def no_migrate_req(netns: NetNS) -> None:
    """net.ipv4.tcp_migrate_req=0 in the test's namespace, set explicitly (the
    kernel would otherwise move a closing listener's queue to another member of its
    group, which would hide a listener closed by an upgrade); and its clients' (and
    the proxy's) own ports below those picked here as free (from the machine's
    ephemeral range), so a port a reload adds is not taken by a connection meanwhile."""
    for setting in ("net.ipv4.tcp_migrate_req=0", "net.ipv4.ip_local_port_range=10000 19999"):
        subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw", setting], check=True)


@pytest.mark.slow
def test_workers_upgrade_under_load(config_path: Path, netns: NetNS) -> None:
    """--workers 2, net.ipv4.tcp_migrate_req=0: three upgrades in a row (the second
    SIGUSR2 of the first ignored), then a failing one (config made invalid): no
    short connection fails (the new workers serve on the old ones' listeners), the
    long-lived ones go on with the first supervisor's workers, each old supervisor
    and its workers exit once drained, the pid file names the newest, and a config
    change afterwards is applied."""
    no_migrate_req(netns)
    lab = Deployment("tcpproxy", config_path, netns)
    port, added, metrics = lab.ports(3)
    b1, b2 = lab.backend("b1"), lab.backend("b2")
    pid_file = config_path.parent / "tcpproxy.pid"
    proxy = lab.start([app("A", [port], [b1.address])], "--workers", "2", "--pid-file",
                      str(pid_file), "--drain-timeout", "60",
                      "--metrics", f"127.0.0.1:{metrics}")  # fmt: skip
    load = Load(port, lab.make_socket)
    load.start()
    try:
        assert wait_until(lambda: all(load.long_messages) and load.short_ok > 20)
        pids = [proxy.proc.pid]
        workers = [children(proxy.proc.pid)]
        for i in range(3):
            before = load.short_ok
            pids.append(upgrade(proxy, pid_file, twice=i == 0))
            workers.append(children(pids[-1]))
            assert wait_until(lambda b=before: load.short_ok > b + 20)  # served meanwhile
        newest = pids[-1]
        assert [len(ws) for ws in workers] == [2, 2, 2, 2]
        # only short connections: they and their workers drained at once
        for pid in [*pids[1:-1], *(w for ws in workers[1:-1] for w in ws)]:
            assert wait_until(lambda p=pid: gone(p)), proxy.output
        counts = list(load.long_messages)  # the first supervisor's workers relay these
        assert wait_until(
            lambda: all(n > c + 3 for n, c in zip(load.long_messages, counts, strict=True))
        )
        assert proxy.proc.poll() is None
        mark = proxy.mark()
        config_path.write_text('{"Apps": [{"Name": "A", "Ports": ["not a port"]}]}')
        proxy.wait_for(r"rejected|invalid", start=mark)
        os.kill(newest, signal.SIGUSR2)
        proxy.wait_for(r"upgrade failed: pid \d+ exited with code 2", start=mark)
        before = load.short_ok
        assert wait_until(lambda: load.short_ok > before + 20)  # the newest still serves
        write_config(config_path, [app("A", [port], [b1.address]), app("B", [added], [b2.address])])
        assert wait_until(lambda: _reaches(added, lab.make_socket) == "b2"), proxy.output
    finally:
        load.finish()
    assert load.failures == [], load.failures
    assert proxy.proc.wait(TIMEOUT) == 0  # drained: its long-lived connections ended
    assert all(gone(pid) for pid in workers[0])
    assert read_pid(pid_file) == newest
    assert not gone(newest)
    assert which_backend(port, make_socket=lab.make_socket) == "b1"
    assert netns.call(_status_pid, metrics) == newest  # it serves /status
    os.kill(newest, signal.SIGTERM)
    assert wait_until(lambda: gone(newest))
    assert all(gone(pid) for pid in workers[-1])
    assert wait_until(lambda: not pid_file.exists())
    out = proxy.output
    assert out.count("tcpproxy stopped (pid ") == 3, out
    assert out.count("upgrade: started pid") == 4, out  # three, and the failing one
    assert "Traceback" not in out, out


def test_the_new_process_pings_the_watchdog() -> None:
    """systemd's WATCHDOG_PID names the old process: the new one's environment
    leaves it out, so it pings (from READY=1 and MAINPID= on, it is the main one)."""
    ours = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    env = successor_environment(7, ours)
    assert env[UPGRADE_FD_ENV] == "7" and "WATCHDOG_PID" not in env
    assert Notifier(env).watchdog_interval == 15.0
    assert Notifier(ours).watchdog_interval is None  # as it would be with the old pid


@pytest.mark.slow
def test_systemd_hears_the_new_main_pid(tmp_path: Path, backends) -> None:
    """Under systemd (a fake NOTIFY_SOCKET, with the sender's pid from SO_PASSCRED):
    the new process sends READY=1 with MAINPID= and from then on the watchdog
    pings; the old one says nothing more, not even STOPPING=1."""
    port = free_port()
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [backends("b1").address])])
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    systemd.bind(str(tmp_path / "notify.sock"))
    systemd.settimeout(TIMEOUT)

    def receive() -> tuple[int, dict[str, str]]:
        data, ancillary, _flags, _address = systemd.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(int.from_bytes(d[:4], "little") for *_, d in ancillary)
        return pid, dict(line.split("=", 1) for line in data.decode().splitlines())

    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    pid_file = tmp_path / "tcpproxy.pid"
    proxy = ProxyProcess(tcpproxy_argv(config, "--pid-file", str(pid_file)), env=env)
    new = None
    try:
        sender, fields = receive()
        assert sender == proxy.proc.pid and fields["READY"] == "1"
        assert "MAINPID" not in fields
        proxy.send(signal.SIGUSR2)
        while "READY" not in fields or sender == proxy.proc.pid:
            sender, fields = receive()
        new = sender
        assert fields["MAINPID"] == str(new) and new != proxy.proc.pid
        assert proxy.proc.wait(TIMEOUT) == 0  # no connection to drain
        systemd.setblocking(False)  # forget what was sent before it exited
        with contextlib.suppress(BlockingIOError):
            while True:
                sender, fields = receive()
                assert "STOPPING" not in fields, (sender, fields)
        systemd.settimeout(TIMEOUT)
        pings = set()
        while len(pings) < 3:  # a ping each 0.2 s, all from the new process
            sender, fields = receive()
            assert "STOPPING" not in fields, (sender, fields)
            if "WATCHDOG" in fields:
                pings.add((sender, time.monotonic()))
        assert {pid for pid, _ in pings} == {new}
        os.kill(new, signal.SIGTERM)
        while "STOPPING" not in fields:
            sender, fields = receive()
        assert sender == new
        assert wait_until(lambda: gone(new))
    finally:
        if new is not None and not gone(new):
            os.kill(new, signal.SIGKILL)
        proxy.kill()
        systemd.close()


def test_an_upgrade_without_descriptors_left_goes_on_serving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE on the socket pair: the upgrade fails with a log line, nothing escapes."""
    import trio

    from tcpproxy import upgrade

    def no_pair(*args: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def main() -> int | None:
        monkeypatch.setattr(upgrade.socket, "socketpair", no_pair)  # trio's own are made
        return await upgrade.start_successor({})

    assert trio.run(main) is None
    assert "upgrade failed: cannot make the socket pair" in caplog.text


@pytest.mark.parametrize("value", ["x", "999"])
def test_a_bad_upgrade_descriptor_is_a_startup_error(value: str) -> None:
    from tcpproxy.errors import StartupError
    from tcpproxy.upgrade import take_handover

    with pytest.raises(StartupError, match=UPGRADE_FD_ENV):
        take_handover({UPGRADE_FD_ENV: value})


def test_a_short_message_closes_what_was_received() -> None:
    """Fewer descriptors than ports: StartupError, and the received ones are closed."""
    from tcpproxy.errors import StartupError
    from tcpproxy.upgrade import take_handover

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.socket()
    with ours, listener:
        before = set(os.listdir("/proc/self/fd"))
        message = json.dumps({"ports": [1, 2]}).encode()
        socket.send_fds(ours, [message], [listener.fileno()])
        with pytest.raises(StartupError, match="descriptors missing"):
            take_handover({UPGRADE_FD_ENV: str(theirs.detach())})
        assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.slow
def test_sigusr2_before_serving_does_not_end_the_process(config_path: Path, backends) -> None:
    """The pid file is written before the process serves: a SIGUSR2 sent as soon as
    it names the process is ignored (its default action would end the process)."""
    port = free_port()
    write_config(config_path, [app("A", [port], [backends("b1").address])])
    pid_file = config_path.parent / "tcpproxy.pid"
    proxy = ProxyProcess(tcpproxy_argv(config_path, "--pid-file", str(pid_file)))
    try:
        wait_until(lambda: read_pid(pid_file) is not None)
        proxy.send(signal.SIGUSR2)
        proxy.wait_for(r"tcpproxy started")
        assert which_backend(port) == "b1"
        assert proxy.stop() == 0
    finally:
        proxy.kill()


def children(pid: int) -> list[int]:
    """The processes `pid` started (a child started from any of its threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("binary", BINARIES)
def test_workers_upgrade_serves_what_the_old_workers_queued(
    binary: str, config_path: Path, netns: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections sitting in the old workers' accept queues at the hand-over are
    served, not reset, with net.ipv4.tcp_migrate_req=0: each old worker is at its
    connection limit (2 of --max-connections 4), so the other clients queue at its
    listener; the upgrade hands those listeners to the new workers, and the old
    ones' SIGTERM only closes their descriptors. As nobody: the new supervisor and
    its workers start unprivileged, with the capability they inherit."""
    monkeypatch.delenv(f"{binary.upper()}_USER", raising=False)  # conftest sets it to root
    no_migrate_req(netns)
    lab = Deployment(binary, config_path, netns)
    port = lab.ports(1)[0]
    b1 = lab.backend("b1")
    pid_file = config_path.parent / "proxy.pid"
    proxy = lab.start([app("A", [port], [b1.address])], "--workers", "2", "--pid-file",
                      str(pid_file), "--max-connections", "4")  # fmt: skip
    answers: list[bytes | str] = []
    greeted: list[int] = []
    release = threading.Event()  # the connections the old workers accepted may end

    def client(index: int) -> None:
        try:
            with connect(port, timeout=3 * TIMEOUT, make_socket=lab.make_socket) as sock:
                greeting = recv_line(sock)
                greeted.append(index)
                release.wait(3 * TIMEOUT)
                sock.sendall(b"ping")
                sock.shutdown(socket.SHUT_WR)
                answers.append(greeting + recv_all(sock))
        except OSError as exc:
            answers.append(repr(exc))

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    try:
        for thread in clients:
            thread.start()
        assert wait_until(lambda: len(greeted) == 4)  # both old workers at their limit
        mark = proxy.mark()
        proxy.send(signal.SIGUSR2)
        proxy.wait_for(r"upgrade: stopping 2 workers; pid \d+ serves", start=mark)
    finally:
        release.set()
        for thread in clients:
            thread.join(4 * TIMEOUT)
    assert answers == [b"b1\nping"] * 16, answers
    assert proxy.proc.wait(TIMEOUT) == 0
    newest = read_pid(pid_file)
    assert newest is not None and newest != proxy.proc.pid
    assert _status(newest)["Uid"].split()[0] == "65534", proxy.output
    os.kill(newest, signal.SIGTERM)
    assert wait_until(lambda: gone(newest))


@pytest.mark.slow
def test_a_worker_that_does_not_hand_over_its_listeners_fails_the_upgrade(
    config_path: Path, netns: NetNS
) -> None:
    """A stopped worker cannot hand over its listeners: the upgrade fails before any
    new process starts (its queued connections would be reset), the log says which
    worker, and the supervisor goes on serving; once it runs again, an upgrade works."""
    no_migrate_req(netns)
    lab = Deployment("tcpproxy", config_path, netns)
    port = lab.ports(1)[0]
    b1 = lab.backend("b1")
    pid_file = config_path.parent / "tcpproxy.pid"
    proxy = lab.start([app("A", [port], [b1.address])], "--workers", "2", "--pid-file",
                      str(pid_file))  # fmt: skip
    stopped = children(proxy.proc.pid)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        mark = proxy.mark()
        proxy.send(signal.SIGUSR2)
        proxy.wait_for(r"upgrade failed: worker \d did not hand over its listeners within "
                       r"5s; this supervisor goes on serving", start=mark)  # fmt: skip
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert "upgrade: started pid" not in proxy.output
    assert read_pid(pid_file) == proxy.proc.pid
    assert which_backend(port, make_socket=lab.make_socket) == "b1"
    new = upgrade(proxy, pid_file)
    assert proxy.proc.wait(TIMEOUT) == 0
    assert which_backend(port, make_socket=lab.make_socket) == "b1"
    os.kill(new, signal.SIGTERM)
    assert wait_until(lambda: gone(new))


def test_a_handover_knows_when_the_old_process_gave_up() -> None:
    """The old process closes its end when it gives up (not ready in time): the new
    one sees it and does not take over (no pid file, no MAINPID=)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handover = Handover(theirs, {})
    try:
        assert not handover.abandoned()
        ours.close()
        assert handover.abandoned()
    finally:
        handover.close()
        ours.close()


def test_a_handover_takes_over_only_on_go() -> None:
    """The new process says "ready" and takes over only once the old one answers
    "go"; an old one that closes its end (it refused, gave up, or died) or answers
    anything else leaves it not taken over."""
    import trio

    async def exchange(answer: bytes | None) -> tuple[bytes, bool, bool]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handover = Handover(theirs, {})
        got = b""

        async def old_side() -> None:
            nonlocal got
            await trio.lowlevel.wait_readable(ours)
            got = ours.recv(64)
            if answer is None:
                ours.close()
            else:
                ours.send(answer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(old_side)
            confirmed = await handover.confirm()
        ours.close()
        return got, confirmed, handover.served

    assert trio.run(exchange, b"go") == (b"ready", True, True)
    assert trio.run(exchange, None) == (b"ready", False, False)
    assert trio.run(exchange, b"no") == (b"ready", False, False)


class FakeSystemd:
    """A NOTIFY_SOCKET that records each message with its sender's pid (SO_PASSCRED)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[int, dict[str, str]]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def received(self) -> list[tuple[int, dict[str, str]]]:
        """Every message so far, as (sender's pid, fields)."""
        with contextlib.suppress(BlockingIOError):
            while True:
                data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
                pid = next(int.from_bytes(d[:4], "little") for *_, d in ancillary)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines())
                self.messages.append((pid, fields))
        return self.messages

    def close(self) -> None:
        self.sock.close()


def refuse_while_stopping(
    proxy: ProxyProcess, pid_file: Path, systemd: FakeSystemd, hold: socket.socket
) -> None:
    """SIGUSR2, then SIGTERM before the new process says "ready" (it is held with
    SIGSTOP until the old one stops): the old one, draining `hold`, refuses the
    hand-over, so the new one must not have named itself in the pid file nor to
    systemd (MAINPID=), and exits; the old one drains, then exits 0."""
    old = proxy.proc.pid
    mark = proxy.mark()
    proxy.send(signal.SIGUSR2)
    new = int(proxy.wait_for(r"upgrade: started pid (\d+)", start=mark)[1])
    os.kill(new, signal.SIGSTOP)
    try:
        proxy.send(signal.SIGTERM)
        proxy.wait_for(r"SIGTERM: stopping", start=mark)
    finally:
        os.kill(new, signal.SIGCONT)
    proxy.wait_for(rf"upgrade failed: pid {new} |stopping pid {new} too", start=mark)
    assert wait_until(lambda: gone(new)), proxy.output
    assert read_pid(pid_file) == old, proxy.output  # it still drains `hold`
    assert [f for pid, f in systemd.received() if pid == new or "MAINPID" in f] == []
    assert proxy.proc.poll() is None
    hold.close()
    assert proxy.proc.wait(TIMEOUT) == 0
    assert "Traceback" not in proxy.output, proxy.output


@pytest.mark.slow
def test_a_stopping_process_refuses_the_hand_over(tmp_path: Path, backends) -> None:
    """The old process is stopping when the new one says "ready": it answers no "go",
    and the new one does not take over (no pid file, no MAINPID=, it exits)."""
    port = free_port()
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [backends("b1").address])])
    pid_file = tmp_path / "tcpproxy.pid"
    systemd = FakeSystemd(tmp_path / "notify.sock")
    argv = tcpproxy_argv(config, "--pid-file", str(pid_file), "--drain-timeout", "60")
    proxy = ProxyProcess(argv, env=systemd.env)
    try:
        proxy.wait_for(r"tcpproxy started")
        with connect(port) as hold:
            assert recv_line(hold) == b"b1\n"
            refuse_while_stopping(proxy, pid_file, systemd, hold)
    finally:
        kill_started(proxy)
        systemd.close()


def kill_started(proxy: ProxyProcess) -> None:
    """Every process the upgrades of `proxy` started, then `proxy`."""
    for line in proxy.lines:
        if "upgrade: started pid " in line:
            pid = int(line.split("upgrade: started pid ")[1].split(",")[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
    proxy.kill()


@pytest.mark.slow
@pytest.mark.parametrize("binary", BINARIES)
def test_a_stopping_supervisor_refuses_the_hand_over(
    binary: str, config_path: Path, netns: NetNS
) -> None:
    """--workers 2: the old supervisor is stopping (its workers drain) when the new
    one says "ready": no "go", so the new one stops its workers and exits without
    naming itself (pid file, MAINPID=)."""
    no_migrate_req(netns)
    lab = Deployment(binary, config_path, netns)
    port = lab.ports(1)[0]
    b1 = lab.backend("b1")
    pid_file = config_path.parent / "tcpproxy.pid"
    systemd = FakeSystemd(config_path.parent / "notify.sock")
    write_config(config_path, [app("A", [port], [b1.address])])
    argv = lab.argv("--workers", "2", "--pid-file", str(pid_file), "--drain-timeout", "60")
    proxy = ProxyProcess(lab.popen_argv(argv), env=systemd.env)
    try:
        proxy.wait_for(rf"{binary} started")
        with lab.connect(port) as hold:
            assert recv_line(hold) == b"b1\n"
            refuse_while_stopping(proxy, pid_file, systemd, hold)
    finally:
        kill_started(proxy)
        lab.close()
        systemd.close()


def listening_inodes(port: int) -> set[int]:
    """The inodes of the IPv4 sockets listening on `port` (this network namespace)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # 0A: LISTEN
            found.add(int(fields[9]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_an_upgrade_hands_over_the_metrics_socket(
    config_path: Path, backends, workers: list[str]
) -> None:
    """--metrics is bound without SO_REUSEPORT and handed over like the listeners:
    across two upgrades the same socket (one inode) serves /metrics, scraped in a
    loop meanwhile with not one request cut (the old process answers those it
    accepted, the new one accepts the rest), and /status names the newest process."""
    port, metrics = free_port(), free_port()
    write_config(config_path, [app("A", [port], [backends("b1").address])])
    pid_file = config_path.parent / "tcpproxy.pid"
    args = ("--metrics", f"127.0.0.1:{metrics}", *workers)
    with proxy_with_pid_file(config_path, pid_file, *args) as proxy:
        (inode,) = listening_inodes(metrics)
        stop, scraped, failures = threading.Event(), [0], []

        def scrape() -> None:
            while not stop.is_set():
                url = f"http://127.0.0.1:{metrics}/metrics"
                try:
                    with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
                        assert b"tcpproxy_config_info{" in answer.read()  # both modes
                    scraped[0] += 1
                except (OSError, AssertionError) as exc:
                    failures.append(repr(exc))

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        try:
            for _ in range(2):
                before = scraped[0]
                new = upgrade(proxy, pid_file)
                assert wait_until(lambda b=before: scraped[0] > b + 20), (scraped, failures[:3])
                assert listening_inodes(metrics) == {inode}
                assert wait_until(lambda n=new: _status_pid(metrics) == n)
        finally:
            stop.set()
            scraper.join(TIMEOUT)
        assert failures == [], (failures, [s for s in proxy.lines if "failed" in s])
        assert which_backend(port) == "b1"
        os.kill(new, signal.SIGTERM)
        assert wait_until(lambda: gone(new))
    assert "Traceback" not in proxy.output, proxy.output


def test_a_worker_hands_its_listeners_in_batches() -> None:
    """More listeners than one message carries (SCM_MAX_FD): every one arrives, by
    port, as the same socket (the same open file: one accept queue), not a copy."""
    import trio

    from tcpproxy.workers.link import (
        FDS_PER_MESSAGE,
        LISTENERS,
        SupervisorLink,
        recv,
        recv_listeners,
    )

    ours, theirs = socket.socketpair()
    sockets = {port: socket.socket() for port in range(1000, 1000 + FDS_PER_MESSAGE + 50)}
    link = SupervisorLink(theirs.detach(), 0, 1)
    supervisor = Connection(ours.detach())

    async def receive() -> dict[int, socket.socket]:
        kind, ports = await recv(supervisor)
        assert kind == LISTENERS
        return await recv_listeners(supervisor, ports)

    got: dict[int, socket.socket] = {}
    try:
        link._hand_listeners(sockets)
        got = trio.run(receive)
        assert sorted(got) == sorted(sockets)
        for port, sock in got.items():
            assert os.fstat(sock.fileno()).st_ino == os.fstat(sockets[port].fileno()).st_ino
    finally:
        for sock in [*sockets.values(), *got.values()]:
            sock.close()
        supervisor.close()
        link._conn.close()
