"""--workers N: a supervisor and N worker processes, for both binaries."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from tcpproxy.errors import StartupError
from tests.deploy import BPF_LISTEN_PORT, Deployment, deployment
from tests.helpers import TIMEOUT, ProxyProcess, app, recv_all, recv_line, wait_until
from tests.test_metrics import scrape, value

__all__ = ["deployment"]


def worker_pids(d: Deployment) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(d.pid)], capture_output=True, text=True, check=False)
    return sorted(int(p) for p in out.stdout.split())


@pytest.mark.slow
def test_two_workers_share_the_ports(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
    assert len(worker_pids(d)) == 2
    for _ in range(40):
        assert d.which(port) == "a"
    assert wait_until(lambda: proxy.output.count("end=done") == 40)
    served = {w: proxy.output.count(f"[{w}] conn ") for w in ("w0", "w1")}
    assert served["w0"] > 0 and served["w1"] > 0, served  # the kernel spreads them


@pytest.mark.slow
def test_reload_reaches_every_worker_and_bad_config_none(deployment: Deployment) -> None:
    d = deployment
    a, b = d.backend("a"), d.backend("b")
    port, extra = d.ports(2)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
    mark = proxy.mark()
    d.reconfigure([app("A", [port, extra], [b.address])])
    proxy.wait_for(r"^\S+ \S+ INFO reload \(file changed\).*applied", start=mark)
    for _ in range(20):
        assert d.which(port) == "b"
        assert d.which(extra) == "b"
    mark = proxy.mark()
    d.config_path.write_text('{"Apps": [}')
    proxy.wait_for(r"reload \(file changed\) rejected.*line 1", start=mark)
    assert d.which(port) == "b"
    assert proxy.output.count("rejected") == 1  # validated once, by the supervisor


@pytest.mark.slow
def test_sigterm_drains_every_worker_then_exits_zero(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
    held = [d.connect(port) for _ in range(6)]  # likely on both workers
    for s in held:
        assert recv_line(s) == b"a\n"
    proxy.send(signal.SIGTERM)
    proxy.wait_for(r"stopping 2 workers")
    assert wait_until(lambda: _refused(d, port))
    for s in held:  # still served to their end
        s.sendall(b"bye")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"bye"
        s.close()
    assert proxy.proc.wait(TIMEOUT) == 0
    assert "stopped" in proxy.output


@pytest.mark.slow
def test_a_stopped_worker_does_not_hold_up_shutdown(deployment: Deployment) -> None:
    """A worker that cannot drain (here SIGSTOPped) is killed once the drain
    timeout and STOP_GRACE have passed; the supervisor then exits 0."""
    from tcpproxy.workers.pool import STOP_GRACE

    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2", "--drain-timeout", "1")
    stopped, running = worker_pids(d)
    os.kill(stopped, signal.SIGSTOP)
    try:
        proxy.send(signal.SIGTERM)
        assert proxy.proc.wait(1 + STOP_GRACE + TIMEOUT) == 0, proxy.output
        assert re.search(rf"worker \d \(pid {stopped}\) did not stop within 6s: killing it",
                         proxy.output)  # fmt: skip
        assert not os.path.exists(f"/proc/{stopped}")  # reaped by the supervisor
        assert not os.path.exists(f"/proc/{running}")
    finally:
        for pid in (stopped, running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_dead_worker_is_replaced(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
    first, second = worker_pids(d)
    os.kill(first, signal.SIGKILL)
    proxy.wait_for(r"worker \d \(pid \d+\) died")
    assert wait_until(lambda: len(worker_pids(d)) == 2 and first not in worker_pids(d))
    proxy.wait_for(r"\[w\d\] \w+ started", start=proxy.output.count("\n"))
    for _ in range(20):
        assert d.which(port) == "a"
    assert second in worker_pids(d)


@pytest.mark.slow
def test_workers_die_with_their_supervisor(deployment: Deployment) -> None:
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
    workers = worker_pids(d)
    proxy.send(signal.SIGKILL)
    proxy.proc.wait(TIMEOUT)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers))
    assert wait_until(lambda: _refused(d, port))


THREAD_IDLE = 10.0  # seconds trio keeps an idle worker thread (the one that forked a worker)


@pytest.mark.slow
def test_a_replaced_worker_stays_up_and_its_metric_files_go(deployment: Deployment) -> None:
    """A worker started again must not be stopped when the thread that forked it
    retires (PR_SET_PDEATHSIG fired then), and the dead one's files must not pile up."""
    d = deployment
    a = d.backend("a")
    port, metrics_port = d.ports(2)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2",
                    "--metrics", f"127.0.0.1:{metrics_port}")  # fmt: skip
    first, second = worker_pids(d)
    directory = _environment(first)["PROMETHEUS_MULTIPROC_DIR"]
    for _ in range(10):  # both workers count something
        assert d.exchange(port, b"x") == b"a\nx"
    assert wait_until(lambda: bool(glob.glob(f"{directory}/*_{first}.db")))
    accepted = value(scrape(d, metrics_port), "tcpproxy_connections_accepted_total")
    assert accepted == 10
    os.kill(first, signal.SIGKILL)
    proxy.wait_for(r"worker \d \(pid \d+\) died")
    assert wait_until(lambda: len(worker_pids(d)) == 2 and first not in worker_pids(d))
    (replacement,) = set(worker_pids(d)) - {second}
    proxy.wait_for(r"\[w\d\] \w+ started", start=proxy.output.count("\n"))
    held = [d.connect(port) for _ in range(6)]  # likely on both workers
    for s in held:
        assert recv_line(s) == b"a\n"
    time.sleep(THREAD_IDLE + 3)
    assert worker_pids(d) == sorted([second, replacement]), proxy.output
    for s in held:  # not cut
        s.sendall(b"bye")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"bye"
        s.close()
    assert not re.search(r"\[w\d\] SIGTERM", proxy.output), proxy.output  # stopped by no one
    assert glob.glob(f"{directory}/*_{first}.db") == []
    # the dead worker's counts stay in the sum
    assert value(scrape(d, metrics_port), "tcpproxy_connections_accepted_total") == 16
    assert proxy.stop() == 0
    assert not os.path.exists(directory)


@pytest.mark.slow
def test_one_ctrl_c_drains(deployment: Deployment) -> None:
    """Ctrl-C signals the whole process group; workers must hear it once (from
    their supervisor), so one Ctrl-C drains rather than cuts."""
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2", prefix=["setsid"])
    assert os.getpgid(d.pid) == d.pid  # a process group of its own, as in a terminal
    held = [d.connect(port) for _ in range(6)]  # likely on both workers
    for s in held:
        assert recv_line(s) == b"a\n"
    os.killpg(d.pid, signal.SIGINT)
    proxy.wait_for(r"stopping 2 workers")
    assert wait_until(lambda: _refused(d, port))
    for s in held:  # still served to their end
        s.sendall(b"bye")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"bye"
        s.close()
    assert proxy.proc.wait(TIMEOUT) == 0
    assert "again" not in proxy.output


@pytest.mark.slow
def test_a_second_proxy_on_the_same_ports_is_refused(deployment: Deployment) -> None:
    """SO_REUSEPORT must not let a second supervisor join the first's ports."""
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    d.start([app("A", [port], [a.address])], "--workers", "2")
    second = ProxyProcess(d.popen_argv(d.argv("--workers", "2")))
    try:
        assert second.proc.wait(TIMEOUT * 3) == 2, second.output
    finally:
        second.kill()
    busy = BPF_LISTEN_PORT if d.binary == "bpfproxy" else port  # bpfproxy binds its -p port only
    assert re.search(rf"error: .*port {busy}.*another process listens there", second.output)
    assert "Traceback" not in second.output
    for _ in range(10):
        assert d.which(port) == "a"


RACES = 3  # pairs of supervisors started at once (each pair: 2 supervisors, 4 workers)
SERVES = "INFO tcpproxy started: 2 workers"  # the supervisor's line, once its workers serve


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["tcpproxy"], indirect=True)  # bpfproxy: see test_plans
def test_of_two_supervisors_started_at_once_one_runs(deployment: Deployment) -> None:
    """The free-port check and the workers' SO_REUSEPORT binds are not atomic:
    both supervisors' checks could pass before either's workers bound."""
    d = deployment
    a = d.backend("a")
    (port,) = d.ports(1)
    d.reconfigure([app("A", [port], [a.address])])
    for _ in range(RACES):
        pair = [ProxyProcess(d.popen_argv(d.argv("--workers", "2"))) for _ in range(2)]
        try:
            for proxy in pair:  # each one either serves or exits
                wait_until(lambda p=proxy: p.proc.poll() is not None or SERVES in p.output,
                           timeout=TIMEOUT * 3)  # fmt: skip
            running = [p for p in pair if p.proc.poll() is None]
            assert len(running) == 1, [p.output for p in pair]
            (refused,) = [p for p in pair if p.proc.poll() is not None]
            assert refused.proc.returncode == 2, refused.output
            assert re.search(rf"error: .*port {port}.*another process listens there",
                             refused.output)  # fmt: skip
            assert running[0].stop() == 0
        finally:
            for proxy in pair:
                proxy.kill()


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["tcpproxy"], indirect=True)  # bpfproxy binds no app port
def test_a_supervisor_holds_the_ports_it_serves(deployment: Deployment) -> None:
    """Ports added by a reload are claimed; removed ones are free for others."""
    from tcpproxy.workers.portlock import PortLocks

    d = deployment
    a = d.backend("a")
    port, added = d.ports(2)
    proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
    mark = proxy.mark()
    d.reconfigure([app("A", [port, added], [a.address])])
    proxy.wait_for(r"reload \(file changed\).*applied", start=mark)
    other = PortLocks(None)
    for held in (port, added):
        with pytest.raises(StartupError, match=rf"port {held}"):
            other.take([held])
    mark = proxy.mark()
    d.reconfigure([app("A", [port], [a.address])])
    proxy.wait_for(r"reload \(file changed\).*applied", start=mark)
    other.take([added])
    other.close()


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["tcpproxy"], indirect=True)  # bpfproxy binds no app port
def test_a_reload_onto_a_port_another_process_listens_on_is_rejected(
    deployment: Deployment,
) -> None:
    d = deployment
    a = d.backend("a")
    port, taken = d.ports(2)
    with socket.socket() as other:  # as a second tcpproxy --workers would listen
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("", taken))
        other.listen()
        proxy = d.start([app("A", [port], [a.address])], "--workers", "2")
        mark = proxy.mark()
        d.reconfigure([app("A", [port, taken], [a.address])])
        proxy.wait_for(rf"rejected.*app 'A'.*port {taken}.*another process listens", start=mark)
    assert "listening on port" not in proxy.output
    assert d.which(port) == "a"


def _environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        pairs = file.read().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _refused(d: Deployment, port: int) -> bool:
    try:
        d.connect(port, timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


pytestmark = pytest.mark.timeout(120)
