"""Prometheus /metrics and /status, scraped from running proxies as traffic flows."""

from __future__ import annotations

import json
import re
import time

import pytest

from tcpproxy.build_info import describe as describe_build
from tests.deploy import Deployment, deployment
from tests.helpers import TIMEOUT, app, free_ports, recv_line

__all__ = ["deployment"]


def scrape(d: Deployment, port: int, path: str = "/metrics") -> str:
    """GET from inside the deployment's network (a namespace for bpfproxy)."""
    sock = d.connect(port)
    try:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_move_with_traffic(deployment: Deployment, workers: str) -> None:
    d = deployment
    a, b = d.backend("a"), d.backend("b")
    port, metrics_port = d.ports(2)
    proxy = d.start([app("A", [port], [a.address])],
                    "--metrics", f"127.0.0.1:{metrics_port}", "--workers", workers)  # fmt: skip
    if workers == "1":  # a worker sets its gauges on its first reload or state change
        assert value(scrape(d, metrics_port), "tcpproxy_target_up", target=a.address) == 1
    for _ in range(5):
        assert d.exchange(port, b"12345") == b"a\n12345"
    held = d.connect(port)
    assert recv_line(held) == b"a\n"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        text = scrape(d, metrics_port)
        if value(text, "tcpproxy_connections_ended_total", app="A", reason="done") >= 5:
            break
        time.sleep(0.1)
    assert value(text, "tcpproxy_connections_accepted_total", app="A") >= 6
    assert value(text, "tcpproxy_connections_active", app="A", target=a.address) == 1
    assert value(text, "tcpproxy_bytes_total", app="A", direction="up") == 25
    assert value(text, "tcpproxy_bytes_total", app="A", direction="down") == 5 * 7
    assert value(text, "tcpproxy_connect_seconds_count", target=a.address) >= 6
    status = json.loads(scrape(d, metrics_port, "/status"))
    assert status["active_connections"] == 1
    assert status["build"] == describe_build()  # the same install and environment as here
    assert status["apps"][0]["targets"][0] == {
        **status["apps"][0]["targets"][0],
        "address": a.address,
        "state": "up",
        "active": 1,
    }
    assert "app A: ports" in scrape(d, metrics_port, "/status.txt")
    held.close()
    old_hash = status["config"]["hash"]
    mark = proxy.mark()
    d.reconfigure([app("A", [port], [b.address])])
    proxy.wait_for(r"INFO reload.*applied", start=mark)
    text = scrape(d, metrics_port)
    assert value(text, "tcpproxy_config_reloads_total", result="ok") == 1
    new_status = json.loads(scrape(d, metrics_port, "/status"))
    assert new_status["config"]["hash"] != old_hash
    assert re.search(rf'tcpproxy_config_info\{{[^}}]*hash="{new_status["config"]["hash"]}"', text)
    # only the running hash, at 1; and no warning (multiprocess files cannot remove labels)
    assert value(text, "tcpproxy_config_info", hash=new_status["config"]["hash"]) == 1
    assert f'hash="{old_hash}"' not in text
    assert "Warning" not in proxy.output, proxy.output


def test_what_connections_count_reaches_the_series_once_per_flush() -> None:
    """Connections count in plain ints; `flush` (the engine's, after each round) folds
    them into the series, each once."""
    from prometheus_client import CollectorRegistry

    from tcpproxy.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sample = registry.get_sample_value
    for _ in range(2):
        metrics.accepted("A")
    metrics.connected("A", "t:1", 0.002)
    metrics.ended("A", "t:1", "done", 5, 7)
    metrics.ended("A", None, "no-target", 0, 0)
    for _ in range(2):  # the second finds nothing new
        metrics.flush()
        assert sample("tcpproxy_connections_accepted_total", {"app": "A"}) == 2
        assert sample("tcpproxy_connections_active", {"app": "A", "target": "t:1"}) == 0
        assert sample("tcpproxy_connections_ended_total",
                      {"app": "A", "target": "t:1", "reason": "done"}) == 1  # fmt: skip
        assert sample("tcpproxy_connections_ended_total",
                      {"app": "A", "target": "-", "reason": "no-target"}) == 1  # fmt: skip
        assert sample("tcpproxy_bytes_total",
                      {"app": "A", "target": "t:1", "direction": "up"}) == 5  # fmt: skip
        assert sample("tcpproxy_bytes_total",
                      {"app": "A", "target": "t:1", "direction": "down"}) == 7  # fmt: skip
        assert sample("tcpproxy_connect_seconds_count", {"target": "t:1"}) == 1
    metrics.connected("A", "t:1", 0.002)  # held open: counted from the next flush on
    metrics.flush()
    assert sample("tcpproxy_connections_active", {"app": "A", "target": "t:1"}) == 1


@pytest.mark.slow
def test_bad_metrics_address_is_a_startup_error(tmp_path) -> None:
    import subprocess
    import sys

    config = tmp_path / "c.json"
    (port,) = free_ports(1)
    config.write_text(json.dumps({"Apps": [app("A", [port], ["127.0.0.1:1"])]}))
    out = subprocess.run([sys.executable, "-m", "tcpproxy", "-c", str(config),
                          "--metrics", "nonsense"], capture_output=True, text=True,
                         timeout=30, check=False)  # fmt: skip
    assert out.returncode == 2 and "--metrics 'nonsense'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.bpf
def test_bpfproxy_reports_steered_ports(tmp_path, netns) -> None:
    d = Deployment("bpfproxy", tmp_path / "c.json", netns)
    try:
        a = d.backend("a")
        metrics_port = 9100
        d.start(
            [app("A", [7001, 7002, 7003], [a.address])], "--metrics", f"127.0.0.1:{metrics_port}"
        )
        assert value(scrape(d, metrics_port), "tcpproxy_bpf_steered_ports") == 3
    finally:
        d.close()


@pytest.mark.slow
def test_a_silent_scraper_blocks_neither_scrapes_nor_shutdown(tmp_path, backends) -> None:
    import signal
    import sys

    from tests.helpers import ProxyProcess, connect, write_config

    a = backends("a")
    port, metrics_port = free_ports(2)
    config = tmp_path / "c.json"
    write_config(config, [app("A", [port], [a.address])])
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config),
                          "--metrics", f"127.0.0.1:{metrics_port}"])  # fmt: skip
    try:
        proxy.wait_for("tcpproxy started")
        silent = connect(metrics_port)  # connects, never sends a request
        d = Deployment("tcpproxy", config, None)
        assert "tcpproxy_connections_accepted" in scrape(d, metrics_port)
        proxy.send(signal.SIGTERM)
        assert proxy.proc.wait(TIMEOUT) == 0
        silent.close()
    finally:
        proxy.kill()


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_proxy_on_the_same_metrics_port_exits_2(tmp_path, backends, workers) -> None:
    """The metrics socket has no SO_REUSEPORT: a second proxy cannot share its port
    (it would answer half the scrapes); it exits 2 naming the address, and the
    first one goes on answering."""
    import sys

    from tests.helpers import ProxyProcess, write_config

    a = backends("a")
    first_port, second_port, metrics_port = free_ports(3)
    address = f"127.0.0.1:{metrics_port}"
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    write_config(first, [app("A", [first_port], [a.address])])
    write_config(second, [app("B", [second_port], [a.address])])

    def argv(config) -> list[str]:
        return [sys.executable, "-m", "tcpproxy", "-c", str(config), "--metrics", address,
                "--workers", workers]  # fmt: skip

    running = ProxyProcess(argv(first))
    try:
        running.wait_for("tcpproxy started")
        refused = ProxyProcess(argv(second))
        try:
            assert refused.proc.wait(TIMEOUT) == 2, refused.output
        finally:
            refused.kill()
        assert f"error: --metrics {address}: address already in use" in refused.output
        assert "Traceback" not in refused.output, refused.output
        d = Deployment("tcpproxy", first, None)
        assert json.loads(scrape(d, metrics_port, "/status"))["pid"] == running.proc.pid
    finally:
        running.kill()


@pytest.mark.slow
def test_metrics_on_a_workers_port_exits_2(tmp_path, backends) -> None:
    """--workers: a --metrics port that an app listens on is refused (bound first,
    the metrics socket would make every worker fail to bind it)."""
    import subprocess
    import sys

    from tests.helpers import write_config

    (port,) = free_ports(1)
    config = tmp_path / "c.json"
    write_config(config, [app("A", [port], [backends("a").address])])
    out = subprocess.run([sys.executable, "-m", "tcpproxy", "-c", str(config), "--workers",
                          "2", "--metrics", f"127.0.0.1:{port}"], capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"--metrics 127.0.0.1:{port}: port {port} is also a port of app 'A'" in out.stderr
    assert "Traceback" not in out.stderr
