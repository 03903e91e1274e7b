"""The --metrics server is bounded: what a review found, tried again on real processes.

Each finding of the review (issue 20) has a test here: slow clients that took
every descriptor, a traceback per stalled client, a name that could not be
encoded, series of removed apps kept for ever, a listen queue of 5. Plus the
HTTP server's own contract, in-process (keep-alive, HEAD, refusals).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import trio

from tcpproxy.config import ConfigError, parse_config
from tcpproxy.httpserver import BACKLOG, MAX_CLIENTS, REQUEST_DEADLINE, HttpServer, Response, listen
from tests.helpers import TIMEOUT, ProxyProcess, app, connect, exchange, free_ports, write_config

SLOW_CLIENTS = 400  # more than the proxy's descriptor limit below leaves once its reserve is out
NOFILE = 400  # the proxy's descriptor limit (soft and hard): the review's `ulimit -n`, scaled down
HELD = 20  # app connections held open while the slow clients wait


def get(port: int, path: str, request: bytes | None = None) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.0 request to the loopback `port`."""
    with connect(port) as sock:
        sock.sendall(request or f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


@pytest.fixture
def slow_clients() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_slow_clients_take_neither_descriptors_nor_threads_nor_the_app_ports(
    tmp_path, backends, slow_clients
) -> None:
    """400 clients that send half a request hold at most MAX_CLIENTS descriptors of a
    proxy limited to 400 (the rest wait in the kernel's queue), no thread each, and
    are cut at the deadline with no traceback; an app port serves all along."""
    a = backends("a")
    port, metrics_port = free_ports(2)
    config = tmp_path / "c.json"
    write_config(config, [app("A", [port], [a.address])])
    proxy = ProxyProcess(["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", sys.executable, "-m",
                          "tcpproxy", "-c", str(config), "--metrics",
                          f"127.0.0.1:{metrics_port}"])  # fmt: skip
    try:
        proxy.wait_for(r"INFO tcpproxy started")
        pid = proxy.proc.pid
        baseline, baseline_threads = open_fds(pid), threads(pid)
        for _ in range(SLOW_CLIENTS):
            sock = socket.socket()
            sock.setblocking(False)
            slow_clients.append(sock)
            sock.connect_ex(("127.0.0.1", metrics_port))  # queued, or waiting for a place
        for sock in slow_clients[: MAX_CLIENTS + BACKLOG // 2]:  # connected: in the queue
            sock.setblocking(True)
            sock.settimeout(TIMEOUT)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end
        deadline = time.monotonic() + TIMEOUT
        while open_fds(pid) < baseline + MAX_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_fds(pid) == baseline + MAX_CLIENTS  # the cap, reached and held
        assert threads(pid) <= baseline_threads + 2  # render threads at most, none per client
        held = [connect(port) for _ in range(HELD)]
        try:
            for sock in held:
                sock.sendall(b"ping")
                assert sock.recv(64).startswith(b"a\n")
        finally:
            for sock in held:
                sock.close()
        # the first ones are cut at the deadline: end of stream, not a reset or a hang
        first = slow_clients[0]
        first.settimeout(REQUEST_DEADLINE + TIMEOUT)
        assert first.recv(1024) == b""
        assert open_fds(pid) <= baseline + MAX_CLIENTS
        assert exchange(port, b"ok") == b"a\nok"
    finally:
        for sock in slow_clients:
            sock.close()
        slow_clients.clear()
        proxy.kill()
    assert "Too many open files" not in proxy.output
    assert "Traceback" not in proxy.output, proxy.output


@pytest.mark.slow
def test_a_trickling_client_is_cut_at_the_deadline_the_queue_is_long(tmp_path, backends) -> None:
    """One header line every 2 s renewed a per-read timeout for ever; the deadline is
    per request, so the client is cut within REQUEST_DEADLINE (plus slack)."""
    a = backends("a")
    port, metrics_port = free_ports(2)
    config = tmp_path / "c.json"
    write_config(config, [app("A", [port], [a.address])])
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config), "--metrics",
                          f"127.0.0.1:{metrics_port}"])  # fmt: skip
    try:
        proxy.wait_for(r"INFO tcpproxy started")
        with connect(metrics_port) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            cut = False
            for i in range(int(3 * REQUEST_DEADLINE / 2)):  # 3 deadlines' worth of lines
                sock.settimeout(2.0)
                try:
                    if sock.recv(1024) == b"":
                        cut = True
                        break
                except TimeoutError:
                    pass
                try:
                    sock.sendall(f"X-Line-{i}: slowly\r\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    cut = True
                    break
            assert cut, "the server still waits for a request it had 3 deadlines to get"
        assert get(metrics_port, "/status")[0].startswith(b"HTTP/1.1 200")
        # the listen queue is BACKLOG, not 5 (ss: Send-Q of a listening socket)
        out = subprocess.run(["ss", "-Hltn", f"sport = :{metrics_port}"], capture_output=True,
                             text=True, timeout=TIMEOUT, check=True)  # fmt: skip
        assert int(out.stdout.split()[2]) == BACKLOG
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.output, proxy.output


def test_a_name_that_cannot_be_encoded_is_a_config_error() -> None:
    data = json.dumps({"Apps": [app("sur\ud800", [7001], ["127.0.0.1:1"])]})
    with pytest.raises(ConfigError, match=r"Apps\[0\].Name: .*no lone surrogates.*sur\\ud800"):
        parse_config(data)


def test_series_without_an_app_stay_and_those_of_a_removed_app_go() -> None:
    """'-': a connection that ended before it had an app (a malformed hello, no route)."""
    from tcpproxy.metrics import PER_APP_AND_TARGET, Current

    current = Current(parse_config(json.dumps({"Apps": [app("A", [7001], ["127.0.0.1:1"])]})))
    assert current.has({"app": "-", "target": "-", "reason": "malformed"})
    assert current.has({"app": "A", "by": "name"})
    assert not current.has({"app": "B", "by": "name"})
    assert current.has({"target": "127.0.0.1:1"}) and not current.has({"target": "127.0.0.1:2"})
    assert "tcpproxy_connections_routed" in PER_APP_AND_TARGET


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_series_of_removed_apps_and_targets_are_gone(tmp_path, backends, workers) -> None:
    a, b = backends("a"), backends("b")
    port_a, port_b, metrics_port = free_ports(3)
    config = tmp_path / "c.json"
    write_config(config, [app("A", [port_a], [a.address, b.address]),
                          app("B", [port_b], [b.address])])  # fmt: skip
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config), "--metrics",
                          f"127.0.0.1:{metrics_port}", "--workers", workers])  # fmt: skip
    try:
        proxy.wait_for(r"INFO tcpproxy started")
        for _ in range(4):
            exchange(port_a, b"x")
        assert exchange(port_b, b"x") == b"b\nx"
        deadline = time.monotonic() + TIMEOUT
        while 'app="B"' not in (text := get(metrics_port, "/metrics")[1].decode()):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert f'target="{b.address}"' in text
        mark = proxy.mark()
        write_config(config, [app("A", [port_a], [a.address])])
        proxy.wait_for(r"reload.*applied", start=mark)
        text = get(metrics_port, "/metrics")[1].decode()
        assert 'app="B"' not in text
        assert f'target="{b.address}"' not in text
        assert f'app="A",target="{a.address}"' in text or f'target="{a.address}"' in text
        status = json.loads(get(metrics_port, "/status")[1])
        assert [x["name"] for x in status["apps"]] == ["A"]
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.output, proxy.output


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_a_targets_last_error_is_shown_with_workers_too(tmp_path, workers) -> None:
    """A worker's reason for marking a target down reaches the supervisor's /status."""
    port, dead, metrics_port = free_ports(3)  # nobody listens on `dead`: refused
    config = tmp_path / "c.json"
    write_config(config, [app("A", [port], [f"127.0.0.1:{dead}"])])
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config), "--metrics",
                          f"127.0.0.1:{metrics_port}", *workers])  # fmt: skip
    try:
        proxy.wait_for(r"INFO tcpproxy started")
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                exchange(port, b"x")  # the connect is refused: the target goes down
            target = json.loads(get(metrics_port, "/status")[1])["apps"][0]["targets"][0]
            if target["state"] == "down" and target["last_error"]:
                break
            assert time.monotonic() < deadline, target
            time.sleep(0.2)
        assert "refused" in target["last_error"], target
    finally:
        proxy.kill()
    assert "Traceback" not in proxy.output, proxy.output


# the server's own contract, in-process


async def _routes(request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("a bug")
    return Response(200, f"{request.method} {request.path}?{request.query}".encode())


@pytest.fixture
async def server(nursery) -> HttpServer:
    srv = HttpServer(listen("127.0.0.1", 0), _routes)
    await nursery.start(srv.serve)
    yield srv
    srv.stop()
    srv.socket.close()


async def _ask(server: HttpServer, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", server.socket.getsockname()[1])
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data


async def test_keep_alive_head_and_refusals(server: HttpServer, caplog) -> None:
    two = (b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"HEAD /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    data = await _ask(server, two)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"GET /a?x=1" in data and b"HEAD /b" not in data  # HEAD: no body
    data = await _ask(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
    assert data.startswith(b"HTTP/1.1 405")
    # headers still incomplete at 20 KB (h11 bounds what it holds unfinished)
    data = await _ask(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 3000)
    assert data.startswith(b"HTTP/1.1 431")
    data = await _ask(server, b"nonsense\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")
    data = await _ask(server, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500")
    assert "metrics: GET /boom failed: RuntimeError('a bug')" in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_hand_over_answers_the_request_taken_and_accepts_no_more(nursery) -> None:
    """After hand_over() a connection already accepted gets its next answer, with
    "Connection: close"; a new client waits in the queue (for the new process)."""
    srv = HttpServer(listen("127.0.0.1", 0), _routes)
    returned = trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await srv.serve(task_status=task_status)
        returned.set()

    await nursery.start(serve)
    port = srv.socket.getsockname()[1]
    try:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await stream.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 200") and b"GET /one" in first
            srv.hand_over()
            await stream.send_all(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and b"GET /two" in data
            assert b"connection: close" in data.lower()
            await returned.wait()
            queued = await trio.open_tcp_stream("127.0.0.1", port)  # the listen queue's
            await stream.aclose()
        with trio.move_on_after(0.2) as waited:  # neither answered nor closed here
            await queued.receive_some(100)
        assert waited.cancelled_caught
        await queued.aclose()
    finally:
        srv.socket.close()


async def test_the_page_polls_share_a_render_get_gzip_and_the_charts_asked() -> None:
    import gzip

    from prometheus_client import CollectorRegistry

    from tcpproxy.httpserver import Request
    from tcpproxy.statusserver import StatusRoutes

    asked: list[object] = []
    doc = {"apps": [{"name": f"app-{i}", "ports": "7001"} for i in range(100)]}

    async def status(with_history: object) -> dict:
        asked.append(with_history)
        return doc

    routes = StatusRoutes(status, CollectorRegistry())
    page = Request("GET", "/status", "compact=1&history_of=a%2Cb,c", {"accept-encoding": "gzip"})
    first = await routes(page)
    assert asked == [frozenset({"a,b", "c"})]  # a name may hold a comma
    assert ("Content-Encoding", "gzip") in first.headers
    assert json.loads(gzip.decompress(first.body)) == doc
    assert await routes(page) is first and len(asked) == 1  # a second viewer: no render
    plain = await routes(Request("GET", "/status", "history=1", {}))
    assert asked[-1] is True and json.loads(plain.body) == doc
    assert all(name != "Content-Encoding" for name, _ in plain.headers)


async def test_the_page_status_writes_again_only_the_entries_that_are_new() -> None:
    """The body is the snapshot's JSON whichever entries were written before (an entry
    the same object as last time is not written again: History.entries)."""
    from prometheus_client import CollectorRegistry

    from tcpproxy.httpserver import Request
    from tcpproxy.statusserver import SHARED_FOR, StatusRoutes

    entries = [{"name": f"app-{i}", "active": 0} for i in range(3)]
    doc: dict = {"binary": "tcpproxy", "apps": entries, "routed_by_name": []}

    async def status(with_history: object) -> dict:
        return {**doc, "uptime": time.monotonic()}

    routes = StatusRoutes(status, CollectorRegistry())
    page = Request("GET", "/status", "compact=1", {})
    first = json.loads((await routes(page)).body)
    assert first["apps"] == entries and first["routed_by_name"] == []
    doc["apps"] = [entries[0], {"name": "app-1", "active": 5}, entries[2]]  # one new entry
    await trio.sleep(SHARED_FOR)  # past the polls that share a body
    later = json.loads((await routes(page)).body)
    assert later["apps"] == doc["apps"] and later["uptime"] > first["uptime"]
