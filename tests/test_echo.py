"""The demo echo server's command line: help, usage errors, and echoing (a real process)."""

from __future__ import annotations

import socket
import subprocess
import sys

from tcpproxy.echo import main
from tests.helpers import ROOT, TIMEOUT, connect, free_port, recv_all


def test_help(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "PORT" in out and "127.0.0.1" in out


def test_bad_port_is_a_usage_error(capsys) -> None:
    assert main(["5001", "http"]) == 2
    err = capsys.readouterr().err
    assert "'http'" in err and "Traceback" not in err
    assert main(["70000"]) == 2
    assert "70000" in capsys.readouterr().err
    assert main([]) == 2  # at least one port


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcpproxy.echo", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def test_help_as_a_process_has_no_traceback() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "Traceback" not in done.stderr


def test_port_in_use_is_an_error_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _run(str(taken.getsockname()[1]))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "echo: error:" in done.stderr


def test_echoes_bytes() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcpproxy.echo", str(port)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "ports" in proc.stderr.readline()  # listening once it says so
        sock = connect(port)
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"hello"
        sock.close()
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_until_stdin_closes_stops_when_its_starter_lets_go() -> None:
    """make run's echo backends stop when the pipe on their stdin closes (the demo
    ended), with no signal: the demo may no longer be allowed to send one."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcpproxy.echo", "--until-stdin-closes", str(port)],
        cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "ports" in proc.stderr.readline()
        proc.stdin.write("anything written is ignored\n")
        proc.stdin.flush()
        with connect(port) as sock:  # still serving
            sock.sendall(b"hello")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"hello"
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stderr.close()
