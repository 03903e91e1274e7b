"""Both binaries following a prefix in a real etcd: changes, rejections, outages, the cache.

etcd is never mocked: tests/etcd_server.py starts real members on loopback (for
bpfproxy: inside the test's network namespace) and removes them afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpproxy.cli_common import FleetOptions, open_config
from tcpproxy.fleet.client import PROBE_EVERY, PROBE_TIMEOUT
from tcpproxy.fleet.publish import LEASE_TTL
from tests.deploy import BPF_LISTEN_PORT, Deployment
from tests.etcd_server import EtcdCluster
from tests.helpers import (
    ProxyProcess,
    free_port,
    free_ports,
    recv_line,
    wait_until,
    which_backend,
)
from tests.netns import NetNS, _setns
from tests.test_upgrade import gone, read_pid, upgrade

P = "/fleet"
WAIT = 20.0  # seconds for a change to reach a proxy (an outage's back-off included)


def value(*ports: int, targets: tuple[str, ...], **options: object) -> str:
    return json.dumps({"Ports": list(ports), "Targets": list(targets), **options})


def start(
    url: str, *args: str, binary: str = "tcpproxy", wrap: Callable[[list[str]], list[str]] = list
) -> ProxyProcess:
    argv = [sys.executable, "-m", binary, "--config", url, "--log-level", "debug", *args]
    proxy = ProxyProcess(wrap(argv))
    proxy.wait_for(rf"INFO {binary} started", timeout=WAIT)
    return proxy


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    made: list[ProxyProcess] = []
    yield made
    for proxy in made:
        proxy.kill()


APPLIED = re.compile(r"reload \(etcd revision (\d+)\): config \w+ applied")


def applied(proxy: ProxyProcess, revision: int, mark: int, within: float = WAIT) -> None:
    """Wait (at most `within` seconds) until the proxy applied `revision` or later (a
    batch of events may carry another node's record too, and is named by its last
    revision)."""

    def reached() -> bool:
        text = "\n".join(proxy.lines[mark:])
        return any(int(m[1]) >= revision for m in APPLIED.finditer(text))

    if not wait_until(reached, within):
        raise AssertionError(f"revision {revision} not applied; output:\n{proxy.output}")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def scrape(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_follows_apps_added_changed_and_removed(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    a, b = backends("a"), backends("b")
    web, db, extra, metrics = free_ports(4)
    etcd.put(f"{P}/defaults", '{"ConnectTimeout": 3}')
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    cache = tmp_path / "cache.json"
    proxy = start(etcd.url(P), "--node-id", "edge-1", "--etcd-cache", str(cache),
                  "--metrics", f"127.0.0.1:{metrics}")  # fmt: skip
    proxies.append(proxy)
    assert which_backend(web) == "a"
    held = socket.create_connection(("127.0.0.1", web), timeout=10)  # across every change
    assert recv_line(held) == b"a\n"

    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/db", value(db, targets=(b.address,)))
    applied(proxy, revision, mark)
    assert which_backend(db) == "b"
    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/db", value(db, extra, targets=(b.address,)))
    applied(proxy, revision, mark)
    assert which_backend(extra) == "b"
    mark = proxy.mark()
    revision = etcd.delete(f"{P}/apps/db")
    applied(proxy, revision, mark)
    assert refused(db) and refused(extra)
    assert which_backend(web) == "a"
    held.sendall(b"still here")
    assert held.recv(100) == b"still here"
    held.close()

    # what the node applied, in etcd and on disk
    # the revision a batch reached: this delete's, or a node record written just after
    assert wait_until(lambda: _node(etcd, "edge-1").get("revision", 0) >= revision, WAIT)
    record = _node(etcd, "edge-1")
    assert record["apps"] == {"web": [web]} and record["rejected"] == {}
    status = json.loads(scrape(metrics, "/status"))
    assert status["config"]["hash"] == record["digest"]
    assert status["config"]["path"] == etcd.url(P)
    cached = json.loads(cache.read_text())
    assert cached == {
        "Defaults": {"ConnectTimeout": 3},
        "Apps": [{"Name": "web", "Ports": [web], "Targets": [a.address]}],
    }
    assert proxy.stop() == 0
    assert _node(etcd, "edge-1") == {}  # revoked at the clean stop


def _node(etcd: EtcdCluster, node: str) -> dict[str, Any]:
    out = etcd.etcdctl("get", f"{P}/nodes/{node}", "--print-value-only").stdout.strip()
    return json.loads(out) if out else {}


@pytest.mark.slow
def test_a_bad_value_rejects_its_app_only(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    a, b = backends("a"), backends("b")
    web, db, new, other, metrics = free_ports(5)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--node-id", "edge-1", "--metrics", f"127.0.0.1:{metrics}")
    proxies.append(proxy)

    mark = proxy.mark()
    bad_web = etcd.put(f"{P}/apps/web", value(web, targets=("a:b:c",)))  # existing app
    proxy.wait_for(rf"etcd: {P}/apps/web rejected at revision {bad_web}, keeping its "
                   r"version of revision \d+: Targets\[0\]: 'a:b:c' has too many ':'",
                   WAIT, mark)  # fmt: skip
    bad_new = etcd.put(f"{P}/apps/new", value(new, targets=(b.address,), Strategy="fastest"))
    proxy.wait_for(rf"{P}/apps/new rejected at revision {bad_new}, not served: Strategy: "
                   "must be one of", WAIT, mark)  # fmt: skip
    clash = etcd.put(f"{P}/apps/clash", value(web, targets=(b.address,)))  # web's port
    proxy.wait_for(rf"{P}/apps/clash rejected at revision {clash}, not served: Ports\[0\]: "
                   rf"port {web} is used by app 'web'", WAIT, mark)  # fmt: skip
    revision = etcd.put(f"{P}/apps/db", value(db, targets=(b.address,)))  # others go on
    applied(proxy, revision, mark)
    assert which_backend(db) == "b"
    assert which_backend(web) == "a"  # its last good version
    assert refused(new)

    status = json.loads(scrape(metrics, "/status"))
    assert set(status["rejected"]) == {"web", "new", "clash"}
    assert status["rejected"]["new"]["revision"] == bad_new
    assert status["rejected"]["web"]["key"] == f"{P}/apps/web"
    assert "rejected new: /fleet/apps/new at revision" in scrape(metrics, "/status.txt")
    # the page's header: this node, the revision it applied, nothing seen but not applied
    assert status["fleet"] == {"node": "edge-1", "revision": revision, "seen": revision,
                               "lag": 0, "lost_since": None}  # fmt: skip
    text = scrape(metrics, "/metrics")
    assert 'tcpproxy_config_app_rejections_total{app="new"} 1.0' in text
    assert wait_until(
        lambda: set(_node(etcd, "edge-1").get("rejected", {})) == set(status["rejected"])
    )

    # fixing a value clears its rejection; each rejection was logged once
    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/new", value(new, other, targets=(b.address,)))
    applied(proxy, revision, mark)
    assert which_backend(other) == "b"
    assert "new" not in json.loads(scrape(metrics, "/status"))["rejected"]
    assert proxy.output.count(f"{P}/apps/new rejected") == 1


@pytest.mark.slow
def test_etcd_down_for_10s_fails_no_connection_and_a_later_change_applies(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    a = backends("a")
    web, late, metrics = free_ports(3)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--metrics", f"127.0.0.1:{metrics}")
    proxies.append(proxy)
    held = socket.create_connection(("127.0.0.1", web), timeout=10)
    assert recv_line(held) == b"a\n"
    mark = proxy.mark()
    etcd.stop(0)
    down_until = time.monotonic() + 10
    while time.monotonic() < down_until:  # new connections, all the while
        assert which_backend(web) == "a"
        time.sleep(0.2)
    proxy.wait_for(r"etcd unavailable .* serving the config of revision", 1, mark)
    assert json.loads(scrape(metrics, "/status"))["fleet"]["lost_since"]  # the page says so
    etcd.start(0)
    revision = etcd.put(f"{P}/apps/late", value(late, targets=(a.address,)))
    applied(proxy, revision, mark)
    assert which_backend(late) == "a"
    assert proxy.output.count("WARNING etcd unavailable") == 1  # once per outage
    proxy.wait_for(r"etcd answers again after \d+\.\ds; following from revision", 1, mark)
    assert json.loads(scrape(metrics, "/status"))["fleet"]["lost_since"] is None
    held.sendall(b"ping")
    assert held.recv(10) == b"ping"
    held.close()
    assert proxy.proc.poll() is None


@pytest.mark.slow
def test_starts_from_the_cache_when_etcd_is_down(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    a = backends("a")
    web, later = free_ports(2)
    cache = tmp_path / "cache.json"
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    first = start(etcd.url(P), "--etcd-cache", str(cache))
    assert wait_until(cache.exists)
    assert first.stop() == 0
    etcd.stop(0)

    proxy = start(etcd.url(P), "--etcd-cache", str(cache), "--node-id", "edge-1")
    proxies.append(proxy)
    proxy.wait_for(rf"etcd is unreachable .*: starting from the cache {cache} \(written ")
    assert which_backend(web) == "a"
    mark = proxy.mark()
    etcd.start(0)
    # read again, the same config: nothing to apply, and the node says which revision
    assert wait_until(lambda: _node(etcd, "edge-1").get("revision", 0) > 0, WAIT)
    assert "applied" not in "\n".join(proxy.lines[mark:])
    revision = etcd.put(f"{P}/apps/later", value(later, targets=(a.address,)))
    applied(proxy, revision, mark)  # read again in full, then followed
    assert which_backend(later) == "a"


@pytest.mark.slow
def test_no_etcd_and_no_cache_exits_2_saying_so(tmp_path: Path) -> None:
    url = f"etcd://127.0.0.1:{free_port()}{P}"
    for extra in ([], ["--etcd-cache", str(tmp_path / "missing.json")]):
        proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "--config", url, *extra])
        assert proxy.proc.wait(WAIT) == 2
        proxy.kill()
        assert f"tcpproxy: error: {url}: etcd is unreachable" in proxy.output
        assert "Traceback" not in proxy.output
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "--config", "etcd://h:x/p"])
    assert proxy.proc.wait(WAIT) == 2
    proxy.kill()
    assert "tcpproxy: error: --config: etcd URL 'etcd://h:x/p'" in proxy.output
    for host in ("999.1.1.1", "[1::2::3]", "a..b", "l" * 64 + ".example"):
        url = f"etcd://{host}:1/x"
        proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "--config", url])
        assert proxy.proc.wait(WAIT) == 2
        proxy.kill()
        assert f"tcpproxy: error: --config: etcd URL {url!r}: bad host {host!r}" in proxy.output
        assert "Traceback" not in proxy.output


@pytest.mark.slow
def test_three_members_the_watched_one_stops_and_every_change_arrives(
    etcd_cluster3: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    """With --workers 2: the supervisor follows etcd and feeds its workers."""
    cluster = etcd_cluster3
    a = backends("a")
    ports = free_ports(6)
    cluster.put(f"{P}/apps/app0", value(ports[0], targets=(a.address,)))
    proxy = start(cluster.url(P), "--workers", "2")  # the client starts on member 0
    proxies.append(proxy)
    assert which_backend(ports[0]) == "a"
    cluster.stop(0)
    for i in range(1, 6):
        cluster.put(f"{P}/apps/app{i}", value(ports[i], targets=(a.address,)))
    assert wait_until(lambda: not any(refused(port) for port in ports), WAIT)
    assert all(which_backend(port) == "a" for port in ports)


@pytest.mark.slow
def test_three_members_the_watched_one_hangs_and_a_change_still_arrives(
    etcd_cluster3: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    """SIGSTOP the member the proxy watches and publishes through: its connections
    stay open and silent. The probe of the silent watch notices within
    PROBE_EVERY + PROBE_TIMEOUT, the watch resumes on another member; the node
    record's keep-alives move too, so the record outlives its lease's TTL."""
    cluster = etcd_cluster3
    a = backends("a")
    web, late, after = free_ports(3)
    cluster.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(cluster.url(P), "--node-id", "edge-1")  # its clients start on member 0
    proxies.append(proxy)
    held = socket.create_connection(("127.0.0.1", web), timeout=10)
    assert recv_line(held) == b"a\n"
    assert wait_until(lambda: _node(cluster, "edge-1").get("revision", 0) > 0, WAIT)
    mark = proxy.mark()
    cluster.pause(0)
    paused_at = time.monotonic()
    try:
        revision = cluster.put(f"{P}/apps/late", value(late, targets=(a.address,)))
        applied(proxy, revision, mark, within=PROBE_EVERY + PROBE_TIMEOUT + 7)
        assert which_backend(late) == "a"
        proxy.wait_for(rf"etcd watch: {cluster.members[0].endpoint} sent nothing for "
                       r"\d+s and did not answer a probe", 1, mark)  # fmt: skip
        assert wait_until(lambda: _node(cluster, "edge-1").get("revision", 0) >= revision, WAIT)
        time.sleep(max(0.0, paused_at + LEASE_TTL + 2 - time.monotonic()))
        assert _node(cluster, "edge-1").get("revision", 0) >= revision  # kept alive
    finally:
        cluster.resume(0)
    revision = cluster.put(f"{P}/apps/after", value(after, targets=(a.address,)))
    applied(proxy, revision, mark)
    assert which_backend(after) == "a"
    held.sendall(b"still here")
    assert held.recv(100) == b"still here"
    held.close()
    assert "etcd unavailable" not in proxy.output  # moving to another member is no outage
    assert proxy.stop() == 0
    assert _node(cluster, "edge-1") == {}


@pytest.mark.slow
def test_an_upgrade_reads_etcd_again_and_the_new_process_follows(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    a, b = backends("a"), backends("b")
    web, db = free_ports(2)
    pid_file = tmp_path / "tcpproxy.pid"
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--pid-file", str(pid_file), "--node-id", "edge-1")
    proxies.append(proxy)
    old = proxy.proc.pid
    etcd.put(f"{P}/apps/web", value(web, targets=(b.address,)))  # the old one applies it too
    assert wait_until(lambda: _node(etcd, "edge-1").get("started", 0) > 0, WAIT)
    old_started = _node(etcd, "edge-1")["started"]
    new = upgrade(proxy, pid_file)
    assert wait_until(lambda: gone(old), WAIT)
    # the record outlives the old process (its lease revoked at exit): the new one's
    assert wait_until(lambda: _node(etcd, "edge-1").get("started", 0) > old_started, WAIT)
    assert which_backend(web) == "b"
    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/db", value(db, targets=(a.address,)))
    applied(proxy, revision, mark)
    assert which_backend(db) == "a"
    assert wait_until(lambda: _node(etcd, "edge-1").get("revision", 0) >= revision, WAIT)
    os.kill(new, signal.SIGTERM)
    assert wait_until(lambda: gone(new), WAIT) and read_pid(pid_file) is None
    assert wait_until(lambda: _node(etcd, "edge-1") == {}, WAIT)


class InNamespace:
    """A thread that stays inside a network namespace and runs what it is given: etcd
    started from it lives in the namespace (and dies with the thread, its parent)."""

    def __init__(self, ns: NetNS) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(ns,), daemon=True)
        self._thread.start()

    def _run(self, ns: NetNS) -> None:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        while (job := self._jobs.get()) is not None:
            fn, answer = job
            try:
                answer.put((True, fn()))
            except BaseException as exc:
                answer.put((False, exc))

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        answer: queue.Queue[Any] = queue.Queue()
        self._jobs.put((lambda: fn(*args), answer))
        ok, result = answer.get(timeout=60)
        if not ok:
            raise result
        return result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(10)


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.parametrize("workers", [1, 2])
def test_bpfproxy_in_its_namespace_follows_etcd(
    netns: NetNS, config_path: Path, workers: int
) -> None:
    """etcd runs inside the namespace; with --workers the supervisor follows it."""
    inside = InNamespace(netns)
    lab = Deployment("bpfproxy", config_path, netns)
    cluster: EtcdCluster | None = None
    try:
        cluster = inside(lambda: EtcdCluster(1).__enter__())
        a, b = lab.backend("a"), lab.backend("b")
        web, db = 7001, 7002
        inside(cluster.put, f"{P}/apps/web", value(web, targets=(a.address,)))
        argv = [sys.executable, "-m", "bpfproxy", "-p", str(BPF_LISTEN_PORT), "--config",
                cluster.url(P), "--log-level", "debug", "--node-id", "bpf-1",
                "--workers", str(workers)]  # fmt: skip
        lab.proxy = proxy = ProxyProcess(lab.popen_argv(argv))
        proxy.wait_for(r"INFO bpfproxy started", WAIT)
        assert lab.which(web) == "a"
        mark = proxy.mark()
        revision = inside(cluster.put, f"{P}/apps/db", value(db, targets=(b.address,)))
        applied(proxy, revision, mark)
        assert lab.which(db) == "b"
        mark = proxy.mark()
        revision = inside(cluster.delete, f"{P}/apps/web")
        applied(proxy, revision, mark)
        with pytest.raises(ConnectionRefusedError):
            lab.connect(web).close()
        record = inside(cluster.etcdctl, "get", f"{P}/nodes/bpf-1", "--print-value-only")
        assert json.loads(record.stdout)["apps"]["db"] == [db]
    finally:
        lab.close()
        if cluster is not None:
            cluster.close()
        inside.close()


@pytest.mark.slow
def test_three_nodes_follow_pushes_and_status_shows_them_converged(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """tcpproxyctl push writes the file; three proxies (each on its own loopback
    address) apply it; tcpproxyctl status says they converged, then names a rejection."""
    a, b = backends("a"), backends("b")
    web, db = free_ports(2)
    config = tmp_path / "fleet.json"
    config.write_text(
        json.dumps({"Apps": [{"Name": "web", "Ports": [web], "Targets": [a.address]}]})
    )

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tcpproxy.fleet.ctl", "--etcd", etcd.url(P), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, check=False)

    assert ctl("push", str(config)).returncode == 0
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    for i, host in enumerate(hosts):
        proxies.append(start(etcd.url(P), "--bind", host, "--node-id", f"edge-{i}"))
    assert all(which_backend(web, host) == "a" for host in hosts)
    assert wait_until(lambda: ctl("status").returncode == 0, WAIT), ctl("status").stdout

    marks = [proxy.mark() for proxy in proxies]
    config.write_text(json.dumps({"Apps": [
        {"Name": "web", "Ports": [web], "Targets": [b.address]},
        {"Name": "db", "Ports": [db], "Targets": [a.address]},
    ]}))  # fmt: skip
    assert ctl("push", str(config)).returncode == 0
    for proxy, mark in zip(proxies, marks, strict=True):
        proxy.wait_for(r"config \w+ applied: apps added: db; apps changed: web", WAIT, mark)
    assert all(which_backend(web, h) == "b" and which_backend(db, h) == "a" for h in hosts)
    assert wait_until(lambda: ctl("status").returncode == 0, WAIT), ctl("status").stdout
    status = ctl("status").stdout
    assert all(f"edge-{i}" in status for i in range(3))

    etcd.put(f"{P}/apps/bad", value(db, targets=(a.address,)))  # db's port: rejected
    assert wait_until(lambda: ctl("status").returncode == 1, WAIT)
    assert "bad" in ctl("status").stdout


def test_an_app_whose_port_is_taken_here_is_set_aside_and_the_others_go_on(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    """Valid in etcd, but this machine cannot bind its port: that app is rejected on
    this node (with the bind error), and later changes to other apps still apply."""
    a = backends("a")
    web, taken, other = free_ports(3)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--node-id", "edge-1")
    proxies.append(proxy)
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", taken))
    squatter.listen()
    mark = proxy.mark()
    bad = etcd.put(f"{P}/apps/squat", value(taken, targets=(a.address,)))
    proxy.wait_for(rf"etcd: {P}/apps/squat rejected at revision {bad}, not served: "
                   rf"not applied: .*{taken}", WAIT, mark)  # fmt: skip
    revision = etcd.put(f"{P}/apps/other", value(other, targets=(a.address,)))
    applied(proxy, revision, mark)
    assert which_backend(other) == "a" and which_backend(web) == "a"
    assert wait_until(lambda: "squat" in _node(etcd, "edge-1").get("rejected", {}), WAIT)
    squatter.close()
    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/squat", value(taken, targets=(a.address,), IdleTimeout=60))
    applied(proxy, revision, mark)  # a new value is judged afresh
    assert which_backend(taken) == "a"
    # no retry loop: the app set aside was offered again after 5 s, then 15 s, ...
    assert proxy.output.count("rejected, keeping the running config") <= 3


@pytest.mark.slow
def test_follows_etcd_over_tls(
    etcd_factory: Callable[..., EtcdCluster], backends: Any, proxies: list[ProxyProcess]
) -> None:
    etcd = etcd_factory(1, tls=True)
    assert etcd.tls is not None
    a = backends("a")
    web, db = free_ports(2)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    tls = ["--etcd-cacert", str(etcd.tls.cacert), "--etcd-cert", str(etcd.tls.cert),
           "--etcd-key", str(etcd.tls.key)]  # fmt: skip
    proxy = start(etcd.url(P), *tls)
    proxies.append(proxy)
    assert etcd.url(P).startswith("etcds://") and which_backend(web) == "a"
    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/db", value(db, targets=(a.address,)))
    applied(proxy, revision, mark)
    assert which_backend(db) == "a"
    # without the client certificate etcd refuses us: exit 2, saying so
    refused_start = ProxyProcess([sys.executable, "-m", "tcpproxy", "--config", etcd.url(P),
                                  "--etcd-cacert", str(etcd.tls.cacert)])  # fmt: skip
    assert refused_start.proc.wait(WAIT) == 2
    refused_start.kill()
    assert "tcpproxy: error: " in refused_start.output
    assert "Traceback" not in refused_start.output


@pytest.mark.slow
def test_follows_etcd_as_a_user_with_the_password_from_the_environment(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    a = backends("a")
    web, db = free_ports(2)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    etcd.etcdctl("user", "add", "root:rootpw", "--interactive=false")
    etcd.etcdctl("user", "add", "edge:edgepw", "--interactive=false")
    etcd.etcdctl("role", "add", "edge")
    etcd.etcdctl("role", "grant-permission", "edge", "--prefix=true", "readwrite", f"{P}/")
    etcd.etcdctl("user", "grant-role", "edge", "edge")
    etcd.etcdctl("user", "grant-role", "root", "root")
    etcd.etcdctl("auth", "enable")
    argv = [sys.executable, "-m", "tcpproxy", "--config", etcd.url(P), "--etcd-user", "edge",
            "--node-id", "edge-1"]  # fmt: skip

    wrong = ProxyProcess(argv, env={"ETCD_PASSWORD": "nope"})
    assert wrong.proc.wait(WAIT) == 2
    wrong.kill()
    assert "tcpproxy: error: " in wrong.output and "edge" in wrong.output
    assert "nope" not in wrong.output

    proxy = ProxyProcess([*argv, "--log-level", "debug"], env={"ETCD_PASSWORD": "edgepw"})
    proxies.append(proxy)
    proxy.wait_for(r"INFO tcpproxy started", WAIT)
    assert which_backend(web) == "a"
    mark = proxy.mark()
    put = etcd.etcdctl("--user=root:rootpw", "put", f"{P}/apps/db", value(db, targets=(a.address,)))
    assert put.stdout.strip() == "OK"
    proxy.wait_for(r"config \w+ applied: apps added: db", WAIT, mark)
    assert which_backend(db) == "a"
    record = etcd.etcdctl("--user=root:rootpw", "get", f"{P}/nodes/edge-1", "--print-value-only")
    assert json.loads(record.stdout)["apps"]["db"] == [db]
    assert "edgepw" not in " ".join(proxy.argv)


@pytest.mark.slow
@pytest.mark.bpf
def test_three_bpfproxy_nodes_in_their_namespaces_converge(tmp_path: Path) -> None:
    """Three bpfproxy nodes, each in its own network namespace, reach etcd (in a
    fourth) over veth pairs the test creates; tcpproxyctl pushes and reads the
    status from etcd's namespace: every node serves each push, status says converged."""
    backend_a, backend_b = 9101, 9102  # the same in every node's namespace
    web, db = 7001, 7002
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(NetNS(prefix="fleet-etcd"))
        nodes = [stack.enter_context(NetNS(prefix="fleet-node")) for _ in range(3)]
        hosts = tuple(f"10.97.{i + 1}.1" for i in range(len(nodes)))
        for i, ns in enumerate(nodes):
            store.veth(ns, addresses=(f"{hosts[i]}/24",), other_addresses=(f"10.97.{i + 1}.2/24",))
        inside = InNamespace(store)
        stack.callback(inside.close)
        cluster = inside(lambda: EtcdCluster(1, extra_hosts=hosts).__enter__())
        stack.callback(cluster.close)
        labs = [
            Deployment("bpfproxy", tmp_path / f"node{i}.json", ns) for i, ns in enumerate(nodes)
        ]
        for lab in labs:
            stack.callback(lab.close)
            lab.backend("a", port=backend_a)
            lab.backend("b", port=backend_b)

        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            argv = ["ip", "netns", "exec", store.name, sys.executable, "-m",
                    "tcpproxy.fleet.ctl", "--etcd", cluster.url(P), *args]  # fmt: skip
            return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, check=False)

        def push(apps: list[dict[str, object]]) -> None:
            (tmp_path / "fleet.json").write_text(json.dumps({"Apps": apps}))
            result = ctl("push", str(tmp_path / "fleet.json"))
            assert result.returncode == 0, result.stdout + result.stderr

        push([{"Name": "web", "Ports": [web], "Targets": [f"127.0.0.1:{backend_a}"]}])
        for i, lab in enumerate(labs):
            argv = [sys.executable, "-m", "bpfproxy", "-p", str(BPF_LISTEN_PORT), "--config",
                    cluster.url(P, host=hosts[i]), "--node-id", f"bpf-{i}"]  # fmt: skip
            lab.proxy = ProxyProcess(lab.popen_argv(argv))
            lab.proxy.wait_for(r"INFO bpfproxy started", WAIT)
        assert all(lab.which(web) == "a" for lab in labs)
        assert wait_until(lambda: ctl("status").returncode == 0, WAIT), ctl("status").stdout

        marks = [lab.proxy.mark() for lab in labs if lab.proxy is not None]
        push([
            {"Name": "web", "Ports": [web], "Targets": [f"127.0.0.1:{backend_b}"]},
            {"Name": "db", "Ports": [db], "Targets": [f"127.0.0.1:{backend_a}"]},
        ])  # fmt: skip
        for lab, mark in zip(labs, marks, strict=True):
            assert lab.proxy is not None
            lab.proxy.wait_for(r"config \w+ applied: apps added: db; apps changed: web", WAIT, mark)
            assert lab.which(web) == "b"
            assert lab.which(db) == "a"
        assert wait_until(lambda: ctl("status").returncode == 0, WAIT), ctl("status").stdout
        status = ctl("status").stdout
        assert all(f"bpf-{i}" in status for i in range(len(nodes))), status
        for lab in labs:
            assert lab.proxy is not None
            assert lab.proxy.stop(signal.SIGTERM) == 0


def _txn(etcd: EtcdCluster, puts: dict[str, str]) -> int:
    """One etcd transaction putting every key (one revision): a push of several apps."""
    b64 = base64.b64encode
    ops = [{"requestPut": {"key": b64(key.encode()).decode(), "value": b64(val.encode()).decode()}}
           for key, val in puts.items()]  # fmt: skip
    return int(etcd.request("/v3/kv/txn", {"success": ops})["header"]["revision"])


@contextlib.contextmanager
def squatting(port: int) -> Iterator[socket.socket]:
    """Another program holds `port` on this machine."""
    squatter = socket.socket()
    try:
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        yield squatter
    finally:
        squatter.close()


def test_at_start_an_app_looping_into_another_or_on_a_taken_port_is_rejected_alone(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    """What the per-app check cannot see alone (a target on another app's port, a
    port another program holds) rejects that app at start, not the whole node."""
    a = backends("a")
    loop, looped, taken, other = free_ports(4)
    etcd.put(f"{P}/apps/loop", value(loop, targets=(f"127.0.0.1:{looped}",)))
    etcd.put(f"{P}/apps/looped", value(looped, targets=(a.address,)))
    squat = etcd.put(f"{P}/apps/squat", value(taken, targets=(a.address,)))
    revision = etcd.put(f"{P}/apps/other", value(other, targets=(a.address,)))
    with squatting(taken):
        proxy = start(etcd.url(P), "--node-id", "edge-1")
        proxies.append(proxy)
        proxy.wait_for(
            rf"etcd: {P}/apps/loop rejected at revision \d+, not served: "
            rf"Apps\[0\].Targets\[0\]: '127.0.0.1:{looped}' of app 'loop' is this "
            rf"proxy itself: .* {looped} is a port of app 'looped' \({P}/apps/looped\)"
        )
        proxy.wait_for(rf"etcd: {P}/apps/squat rejected at revision {squat}, not served: not "
                       rf"applied: app 'squat': cannot listen on port {taken}")  # fmt: skip
        assert which_backend(looped) == "a" and which_backend(other) == "a"
        assert refused(loop)
        assert wait_until(lambda: set(_node(etcd, "edge-1").get("rejected", {}))
                          == {"loop", "squat"}, WAIT)  # fmt: skip
        assert _node(etcd, "edge-1")["revision"] == revision


def test_bpfproxy_at_start_rejects_an_app_claiming_its_listening_port_alone(
    etcd: EtcdCluster,
) -> None:
    """bpfproxy's -p is the proxy's own: an app claiming it, or targeting it, is
    rejected; the rest is the config to start with (no BPF needed to judge it)."""
    listen, web, claim = free_ports(3)
    etcd.put(f"{P}/apps/web", value(web, targets=("127.0.0.1:9",)))
    bad = etcd.put(f"{P}/apps/claim", value(claim, listen, targets=("127.0.0.1:9",)))
    etcd.put(f"{P}/apps/into", value(claim + 1, targets=(f"127.0.0.1:{listen}",)))
    source, _, config = open_config(etcd.url(P), FleetOptions(), (listen,))
    assert [app.name for app in config.apps] == ["web"]
    rejected = source.rejected()  # type: ignore[union-attr]
    assert rejected["claim"] == {
        "key": f"{P}/apps/claim",
        "revision": bad,
        "reason": f"Ports[1]: port {listen} is this proxy's own listening port (-p): "
        "choose another port for the app, or another -p for the node",
    }
    assert "bpfproxy's listening port (-p)" in str(rejected["into"]["reason"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_one_push_with_a_taken_port_sets_aside_that_app_only(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], workers: int
) -> None:
    a = backends("a")
    web, taken, free = free_ports(3)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--node-id", "edge-1", "--workers", str(workers))
    proxies.append(proxy)
    with squatting(taken):
        mark = proxy.mark()
        push = _txn(etcd, {f"{P}/apps/d": value(taken, targets=(a.address,)),
                           f"{P}/apps/e": value(free, targets=(a.address,))})  # fmt: skip
        proxy.wait_for(rf"etcd: {P}/apps/d rejected at revision {push}, not served: not "
                       rf"applied: app 'd': cannot listen on port {taken}", WAIT, mark)  # fmt: skip
        applied(proxy, push, mark)
        assert which_backend(free) == "a"
        assert f"{P}/apps/e rejected" not in proxy.output


def test_a_push_that_changes_nothing_served_still_moves_the_node_record(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    """An app set aside at once: the config served is the same, the record's revision
    and rejections are not."""
    a = backends("a")
    web, taken = free_ports(2)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--node-id", "edge-1")
    proxies.append(proxy)
    with squatting(taken):
        alone = etcd.put(f"{P}/apps/f", value(taken, targets=(a.address,)))
        # (later: its own record's writes, seen when f is offered again by itself)
        assert wait_until(lambda: _node(etcd, "edge-1").get("revision", 0) >= alone, WAIT)
        record = _node(etcd, "edge-1")
        assert set(record["rejected"]) == {"f"}
        assert record["rejected"]["f"]["revision"] == alone


@pytest.mark.slow
def test_an_app_set_aside_is_offered_again_by_itself_and_on_sighup(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess]
) -> None:
    a = backends("a")
    web, taken, taken2 = free_ports(3)
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    proxy = start(etcd.url(P), "--node-id", "edge-1")
    proxies.append(proxy)
    with squatting(taken):
        mark = proxy.mark()
        etcd.put(f"{P}/apps/s", value(taken, targets=(a.address,)))
        proxy.wait_for(rf"{P}/apps/s rejected .*cannot listen on port {taken}", WAIT, mark)
    assert wait_until(lambda: not refused(taken), WAIT)  # the retry, with no change in etcd
    assert which_backend(taken) == "a"
    assert wait_until(lambda: "s" not in _node(etcd, "edge-1")["rejected"], WAIT)
    with squatting(taken2):
        mark = proxy.mark()
        etcd.put(f"{P}/apps/t", value(taken2, targets=(a.address,)))
        proxy.wait_for(rf"{P}/apps/t rejected .*cannot listen on port {taken2}", WAIT, mark)
    mark = proxy.mark()
    proxy.send(signal.SIGHUP)
    proxy.wait_for(r"etcd: offering again the apps set aside: t", WAIT, mark)
    proxy.wait_for(r"reload \(SIGHUP\): config \w+ applied", WAIT, mark)
    assert which_backend(taken2) == "a"


@pytest.mark.slow
def test_a_bad_value_keeps_its_last_good_version_across_an_upgrade_and_a_restart(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    a = backends("a")
    web, pc = free_ports(2)
    pid_file, cache = tmp_path / "tcpproxy.pid", tmp_path / "cache.json"
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    etcd.put(f"{P}/apps/c", value(pc, targets=(a.address,)))
    args = ("--pid-file", str(pid_file), "--node-id", "edge-1", "--etcd-cache", str(cache))
    proxy = start(etcd.url(P), *args)
    proxies.append(proxy)
    bad = etcd.put(f"{P}/apps/c", value(pc, targets=("a:b:c",)))
    proxy.wait_for(rf"{P}/apps/c rejected at revision {bad}, keeping its version", WAIT)
    old = proxy.proc.pid
    mark = proxy.mark()
    new = upgrade(proxy, pid_file)  # the old process hands over the config it serves
    assert wait_until(lambda: gone(old), WAIT)
    proxy.wait_for(rf"{P}/apps/c rejected at revision {bad}, keeping the version this node "
                   "served before", WAIT, mark)  # fmt: skip
    assert which_backend(pc) == "a" and which_backend(web) == "a"
    os.kill(new, signal.SIGTERM)
    assert wait_until(lambda: gone(new), WAIT)

    restarted = start(etcd.url(P), *args)  # a restart: the cache says what it served
    proxies.append(restarted)
    restarted.wait_for(rf"{P}/apps/c rejected at revision {bad}, keeping the version")
    assert which_backend(pc) == "a"


@pytest.mark.slow
def test_an_upgrade_while_etcd_does_not_answer_starts_from_the_config_handed_over(
    etcd: EtcdCluster, backends: Any, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """etcd stopped (SIGSTOP: connections open, no answer), no cache: the new process
    waits a bounded time, serves what the old one served, and follows etcd later."""
    a, b = backends("a"), backends("b")
    web, pc, late = free_ports(3)
    pid_file = tmp_path / "tcpproxy.pid"
    etcd.put(f"{P}/apps/web", value(web, targets=(a.address,)))
    etcd.put(f"{P}/apps/c", value(pc, targets=(b.address,)))
    proxy = start(etcd.url(P), "--pid-file", str(pid_file), "--node-id", "edge-1")
    proxies.append(proxy)
    etcd.put(f"{P}/apps/c", value(pc, targets=("a:b:c",)))  # c runs on its last good version
    proxy.wait_for(rf"{P}/apps/c rejected", WAIT)
    etcd.members[0].pause()
    try:
        mark = proxy.mark()
        new = upgrade(proxy, pid_file)
        proxy.wait_for(r"etcd is unreachable .*no answer within 4s.*: starting from the config "
                       "the old process served", WAIT, mark)  # fmt: skip
        assert which_backend(pc) == "b" and which_backend(web) == "a"
    finally:
        etcd.resume(0)
    mark = proxy.mark()
    revision = etcd.put(f"{P}/apps/late", value(late, targets=(a.address,)))
    applied(proxy, revision, mark)
    assert which_backend(late) == "a" and which_backend(pc) == "b"
    os.kill(new, signal.SIGTERM)
    assert wait_until(lambda: gone(new), WAIT)
