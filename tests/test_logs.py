"""Log formats: human-readable by default, JSON lines on request, ids per connection."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.helpers import ProxyProcess, app, free_ports, which_backend, write_config


def test_json_lines_carry_the_connection_id(tmp_path: Path, backends) -> None:
    a = backends("a")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [a.address])])
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config),
                          "--log-format", "json", "--log-level", "debug"])  # fmt: skip
    try:
        proxy.wait_for(r'"message": "tcpproxy started')
        for _ in range(3):
            assert which_backend(port) == "a"
        # each connection's end line: they need not come in order (a target's close
        # can reach the proxy after the next connection's whole life)
        for cid in ("1", "2", "3"):
            proxy.wait_for(rf"end=done[^\n]*\"conn\": \"{cid}\"")
    finally:
        proxy.kill()
    records = [json.loads(line) for line in proxy.lines if line.startswith("{")]
    assert records and all({"time", "level", "message"} <= r.keys() for r in records)
    by_conn: dict[str, list[str]] = {}
    for r in records:
        if "conn" in r:
            by_conn.setdefault(r["conn"], []).append(r["message"])
    assert sorted(by_conn) == ["1", "2", "3"]
    for cid, messages in by_conn.items():
        assert len(messages) == 2  # connected, then ended: both name the same id
        assert all(m.startswith(f"conn {cid} ") for m in messages)


def test_text_lines_name_the_connection_id(tmp_path: Path, backends) -> None:
    a = backends("a")
    (port,) = free_ports(1)
    config = tmp_path / "config.json"
    write_config(config, [app("A", [port], [a.address])])
    proxy = ProxyProcess([sys.executable, "-m", "tcpproxy", "-c", str(config),
                          "--log-level", "debug"])  # fmt: skip
    try:
        proxy.wait_for("tcpproxy started")
        assert which_backend(port) == "a"
        proxy.wait_for(r"conn 1 client=127\.0\.0\.1:\d+ port=\d+ app=A target=\S+ .*end=done")
    finally:
        proxy.kill()
    assert re.search(r"conn 1 client=\S+ port=\d+ app=A: connected to 127\.0\.0\.1:", proxy.output)
