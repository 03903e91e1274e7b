"""tcpproxyctl run as a process against a real etcd: check, push, get, status."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcpproxy.config import MAX_PROBLEMS, parse_config
from tcpproxy.fleet.ctl import main
from tests.etcd_server import EtcdCluster
from tests.helpers import refused_port

ROOT = Path(__file__).resolve().parent.parent
P = "/fleet"


def ctl(
    *args: str, etcd: EtcdCluster | None = None, env: dict | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    """Run tcpproxyctl as a process (``python -m``, as the console script does)."""
    argv = [sys.executable, "-m", "tcpproxy.fleet.ctl"]
    if etcd is not None:
        argv += ["--etcd", etcd.url(P)]
    return subprocess.run(
        [*argv, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def keys(etcd: EtcdCluster, prefix: str = P + "/") -> dict[str, bytes]:
    raw = prefix.encode()
    end = raw[:-1] + bytes([raw[-1] + 1])
    reply = etcd.request(
        "/v3/kv/range",
        {"key": base64.b64encode(raw).decode(), "range_end": base64.b64encode(end).decode()},
    )
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in reply.get("kvs", [])
    }


APP_A = {"Name": "a", "Ports": [7001], "Targets": ["10.0.0.1:80"]}
APP_B = {"Name": "b", "Ports": [7002, 7003], "Targets": ["10.0.0.2:80"], "Strategy": "round-robin"}
APP_C = {"Name": "c", "Ports": [7004], "Targets": ["10.0.0.3:80"]}


@pytest.mark.parametrize("args", [[], ["check"], ["push"], ["get"], ["status"]])
def test_help_for_every_command(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args, "--help"]) == 0
    assert "Usage: tcpproxyctl" in capsys.readouterr().out


@pytest.mark.slow
def test_check_good_and_bad_files(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", {"Apps": [APP_A, APP_B]})
    result = ctl("check", str(good))
    assert result.returncode == 0 and "ok (2 apps, 3 ports)" in result.stdout

    bad = write(tmp_path / "bad.json", {"Apps": [{**APP_A, "Ports": [70000]}]})
    result = ctl("check", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tcpproxyctl: error: {bad}: Apps[0].Ports[0]: must be between 1 and 65535, got 70000"
    )
    loop = write(tmp_path / "loop.json", {"Apps": [{**APP_A, "Targets": ["127.0.0.1:7001"]}]})
    result = ctl("check", str(loop))
    assert result.returncode == 2 and "is this proxy itself" in result.stderr
    assert "Traceback" not in result.stderr
    result = ctl("check", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "missing.json" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_check_of_thousands_of_looping_apps_is_quick_and_short(tmp_path: Path) -> None:
    """The issue's file (app i on port i, every target 127.0.0.1:1): the check took
    over 120 s and printed 16,000 lines; now seconds, the first problems and a count."""
    n = 16_000
    apps = [{"Name": f"a{i}", "Ports": [i], "Targets": ["127.0.0.1:1"]} for i in range(1, n + 1)]
    loops = write(tmp_path / "loops.json", {"Apps": apps})
    result = ctl("check", str(loops), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"tcpproxyctl: error: {loops}: {n} problems:"
    assert lines[1].startswith("  Apps[0].Targets[0]: '127.0.0.1:1' of app 'a1' is this proxy")
    assert lines[-1] == f"  ... and {n - MAX_PROBLEMS} more"
    assert len(lines) == MAX_PROBLEMS + 2


@pytest.mark.slow
def test_check_refuses_what_push_refuses(etcd: EtcdCluster, tmp_path: Path) -> None:
    """An app name with '/' cannot be a key's last part: check says so as push does."""
    file = write(tmp_path / "slash.json", {"Apps": [APP_A, {**APP_B, "Name": "a/b"}]})
    message = (
        f"tcpproxyctl: error: {file}: Apps[1].Name: must not contain '/' in etcd "
        "(the name is the key's last part), got 'a/b'"
    )
    for args in (["check", str(file)], ["push", str(file)]):
        result = ctl(*args, etcd=etcd)
        assert (result.returncode, result.stderr.strip()) == (2, message), args
    assert keys(etcd) == {}


@pytest.mark.slow
def test_push_writes_one_key_per_app_and_only_changes(etcd: EtcdCluster, tmp_path: Path) -> None:
    file = write(tmp_path / "c.json", {"Defaults": {"ConnectTimeout": 1.5}, "Apps": [APP_B, APP_A]})
    result = ctl("push", str(file), etcd=etcd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["added app a", "added app b", "added defaults"]
    assert keys(etcd) == {
        f"{P}/apps/a": b'{"Ports":[7001],"Targets":["10.0.0.1:80"]}',
        f"{P}/apps/b": b'{"Ports":[7002,7003],"Strategy":"round-robin","Targets":["10.0.0.2:80"]}',
        f"{P}/defaults": b'{"ConnectTimeout":1.5}',
    }

    revision = etcd.revision()
    result = ctl("push", str(file), etcd=etcd)
    assert (result.returncode, result.stdout) == (0, "no change\n")
    assert etcd.revision() == revision  # nothing written

    write(file, {"Apps": [{**APP_B, "Ports": [7002]}, APP_C]})
    result = ctl("push", "--dry-run", str(file), etcd=etcd)
    assert result.returncode == 0
    expected = ["added app c", "changed app b", "removed app a", "removed defaults"]
    assert result.stdout.splitlines() == [*expected, "dry run: nothing written"]
    assert etcd.revision() == revision

    result = ctl("push", str(file), etcd=etcd)
    assert result.returncode == 0
    assert result.stdout.splitlines()[:4] == expected
    after = etcd.revision()
    assert result.stdout.splitlines()[4] == f"written at revision {after}"
    assert after == revision + 1  # one transaction
    assert sorted(keys(etcd)) == [f"{P}/apps/b", f"{P}/apps/c"]


@pytest.mark.slow
def test_push_refuses_a_bad_file_and_writes_nothing(etcd: EtcdCluster, tmp_path: Path) -> None:
    etcd.put(f"{P}/apps/a", json.dumps({"Ports": [7001], "Targets": ["10.0.0.1:80"]}))
    revision = etcd.revision()
    bad = write(tmp_path / "bad.json", {"Apps": [APP_A, {**APP_B, "Targets": []}]})
    result = ctl("push", str(bad), etcd=etcd)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tcpproxyctl: error: {bad}: Apps[1].Targets")
    slash = write(tmp_path / "slash.json", {"Apps": [{**APP_A, "Name": "team/a"}]})
    result = ctl("push", str(slash), etcd=etcd)
    assert result.returncode == 2 and "must not contain '/'" in result.stderr
    assert etcd.revision() == revision


@pytest.mark.slow
def test_get_prints_the_file_format(etcd: EtcdCluster, tmp_path: Path) -> None:
    file = write(tmp_path / "c.json", {"Defaults": {"IdleTimeout": 60}, "Apps": [APP_C, APP_A]})
    assert ctl("push", str(file), etcd=etcd).returncode == 0
    etcd.put(f"{P}/apps/broken", "{not json")
    etcd.put(f"{P}/nodes/n1", "{}")  # not config: left out
    result = ctl("get", etcd=etcd)
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document == {"Defaults": {"IdleTimeout": 60}, "Apps": [APP_A, APP_C]}
    assert f"{P}/apps/broken: not JSON" in result.stderr
    served = sorted(parse_config(file.read_bytes()).apps, key=lambda app: app.name)
    assert parse_config(result.stdout).apps == tuple(served)


def _node(etcd: EtcdCluster, node: str, revision: int, applied_at: float, **extra: object) -> None:
    record = {"node": node, "revision": revision, "applied_at": applied_at, "rejected": {}}
    etcd.put(f"{P}/nodes/{node}", json.dumps({**record, **extra}))


@pytest.mark.slow
def test_status_table_lag_and_rejections(etcd: EtcdCluster, tmp_path: Path) -> None:
    result = ctl("status", etcd=etcd)
    assert result.returncode == 0 and f"no node records under {P}/nodes/" in result.stdout

    file = write(tmp_path / "c.json", {"Apps": [APP_A]})
    assert ctl("push", str(file), etcd=etcd).returncode == 0
    first = etcd.revision()
    write(file, {"Apps": [APP_A, APP_B]})
    assert ctl("push", str(file), etcd=etcd).returncode == 0
    second = etcd.revision()
    now = time.time()
    _node(etcd, "n1", second, now - 10)
    _node(etcd, "n2", first, now - 30)  # still on the first config for ~10 s

    result = ctl("status", "--max-lag", "60", etcd=etcd)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"config revision {second}"
    assert lines[1].split() == ["NODE", "REVISION", "STATE", "BEHIND", "REJECTED"]
    assert lines[2].split() == ["n1", str(second), "current", "-", "-"]
    n2 = lines[3].split()
    assert n2[:3] == ["n2", str(first), "behind"] and 9 < float(n2[3].rstrip("s")) < 60
    assert ctl("status", etcd=etcd).returncode == 1  # behind more than 5 s

    # n2 catches up at a later revision (n1's record moved it); n1's revision has the
    # same config keys: both current
    _node(etcd, "n2", etcd.revision(), now - 1)
    result = ctl("status", etcd=etcd)
    assert result.returncode == 0, result.stdout
    assert [line.split()[2] for line in result.stdout.splitlines()[2:]] == ["current"] * 2

    # a delete no node has applied leaves no key: the nodes are behind all the same
    write(file, {"Apps": [APP_B]})
    assert ctl("push", str(file), etcd=etcd).returncode == 0
    result = ctl("status", "--max-lag", "600", etcd=etcd)
    assert result.returncode == 1
    assert [line.split()[2:4] for line in result.stdout.splitlines()[2:]] == [
        ["behind", "unknown"]
    ] * 2

    _node(etcd, "n1", etcd.revision(), time.time())
    _node(
        etcd, "n2", etcd.revision(), time.time(),
        rejected={"b": {"key": f"{P}/apps/b", "revision": 5, "reason": "port 7002 taken"}},
    )  # fmt: skip
    result = ctl("status", etcd=etcd)
    assert result.returncode == 1
    assert "b (port 7002 taken)" in result.stdout.splitlines()[3]
    etcd.put(f"{P}/nodes/n3", "garbage")
    result = ctl("status", etcd=etcd)
    assert "bad record" in result.stdout


@pytest.mark.slow
def test_status_shows_a_malformed_record_as_a_bad_record_row(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """One node's bad record neither breaks the command nor moves the config revision."""
    file = write(tmp_path / "c.json", {"Apps": [APP_A]})
    assert ctl("push", str(file), etcd=etcd).returncode == 0
    pushed = etcd.revision()
    _node(etcd, "good", pushed, time.time())
    _node(etcd, "bool", True, time.time())  # type: ignore[arg-type]
    _node(etcd, "future", pushed + 1000, time.time())
    _node(etcd, "negative", -1, time.time())
    etcd.put(f"{P}/nodes/deep", "[" * 100_000)
    result = ctl("status", "--max-lag", "600", etcd=etcd)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"config revision {pushed}"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert rows["good"].split() == ["good", str(pushed), "current", "-", "-"]
    for node in ("bool", "future", "negative", "deep"):
        assert rows[node].split()[1:4] == ["-", "bad", "record"], rows[node]
    assert "no integer 'revision'" in rows["bool"]
    assert f"revision {pushed + 1000} is outside 0..{etcd.revision()}" in rows["future"]
    assert "revision -1 is outside" in rows["negative"]


@pytest.mark.slow
def test_etcd_unreachable_is_one_line_naming_the_endpoints(tmp_path: Path) -> None:
    url = f"etcd://127.0.0.1:{refused_port()},127.0.0.1:{refused_port()}/p"
    file = write(tmp_path / "c.json", {"Apps": [APP_A]})
    for args in (["get"], ["status"], ["push", str(file)]):
        result = ctl("--etcd", url, *args)
        assert result.returncode == 2
        endpoints = url.removeprefix("etcd://").removesuffix("/p")
        assert result.stderr.startswith(f"tcpproxyctl: error: etcd unavailable at {endpoints} (")
        assert "Connection refused" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = ctl("--etcd", "etcd://127.0.0.1:2379", "get")
    assert result.returncode == 2 and "needs a key prefix" in result.stderr
    result = ctl("--etcd", url, "--etcd-user", "root:pw", "get")
    assert result.returncode == 2 and "never argv" in result.stderr


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("999.1.1.1", "not an IPv4 address"),
        ("[1::2::3]", "not an IPv6 address"),
        ("a..b", "empty label"),
        ("l" * 64 + ".example", "a label over 63 characters"),
    ],
)
def test_a_bad_host_is_one_line_exit_2(host: str, problem: str) -> None:
    url = f"etcd://{host}:1/x"
    for args in (["get"], ["status"]):
        result = ctl("--etcd", url, *args)
        assert result.returncode == 2, result.stderr
        # click's usage error: the usage, then the problem on one line
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert f"bad host {host!r} in endpoint '{host}:1': {problem}" in last


@pytest.mark.slow
def test_tls_and_auth(etcd_factory, tmp_path: Path) -> None:
    etcd = etcd_factory(1, tls=True)
    etcd.etcdctl("user", "add", "root:rootpw", "--interactive=false")
    etcd.etcdctl("user", "grant-role", "root", "root")
    etcd.etcdctl("auth", "enable")
    tls = etcd.tls
    options = ["--etcd-cacert", str(tls.cacert), "--etcd-cert", str(tls.client_cert)]
    options += ["--etcd-key", str(tls.client_key), "--etcd-user", "root"]
    file = write(tmp_path / "c.json", {"Apps": [APP_A]})
    result = ctl(*options, "push", str(file), etcd=etcd, env={"ETCD_PASSWORD": "rootpw"})
    assert result.returncode == 0, result.stderr
    result = ctl(*options, "get", etcd=etcd, env={"ETCD_PASSWORD": "rootpw"})
    assert json.loads(result.stdout) == {"Apps": [APP_A]}

    result = ctl(*options, "get", etcd=etcd, env={"ETCD_PASSWORD": "wrong"})
    assert result.returncode == 2
    assert "authentication failed" in result.stderr and "Traceback" not in result.stderr
    result = ctl(*options[:-2], "get", etcd=etcd)  # TLS without user: auth is on
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # a client certificate with a CommonName: etcd's gateway refuses it when auth is on
    with_cn = ["--etcd-cacert", str(tls.cacert), "--etcd-cert", str(tls.cert)]
    with_cn += ["--etcd-key", str(tls.key), "--etcd-user", "root"]
    result = ctl(*with_cn, "get", etcd=etcd, env={"ETCD_PASSWORD": "rootpw"})
    assert result.returncode == 2 and "use one without" in result.stderr

    for option, bad in (("--etcd-cacert", tmp_path / "missing.pem"), ("--etcd-cert", file)):
        flags = ["--etcd-cacert", str(tls.cacert), "--etcd-key", str(tls.client_key)]
        flags += ["--etcd-cert", str(tls.client_cert), option, str(bad)]
        result = ctl(*flags, "get", etcd=etcd)
        assert result.returncode == 2 and str(bad) in result.stderr
        assert "Traceback" not in result.stderr


def test_push_beyond_etcds_transaction_limit_names_it(etcd: EtcdCluster, tmp_path: Path) -> None:
    apps = [{**APP_A, "Name": f"app{i}", "Ports": [10000 + i]} for i in range(130)]
    file = write(tmp_path / "c.json", {"Apps": apps})
    result = ctl("push", str(file), etcd=etcd)
    assert result.returncode == 2
    assert "130 keys change in one transaction: raise etcd's --max-txn-ops" in result.stderr
    assert keys(etcd) == {}
