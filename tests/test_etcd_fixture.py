"""The real-etcd fixtures: a missing etcd skips with the reason, or fails in CI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tcpproxy.fleet.client import EtcdClient
from tcpproxy.fleet.url import parse_etcd_url
from tests import etcd_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("require", ["", "1"])
def test_missing_etcd_skips_or_fails_when_required(require: str, tmp_path: Path) -> None:
    """With etcd off PATH an etcd test is skipped, naming make setup; under
    TCPPROXY_REQUIRE_BPF=1 (CI as root) the same test fails instead."""
    env = {**os.environ, "PATH": str(tmp_path), "TCPPROXY_REQUIRE_BPF": require}
    test = "tests/test_fleet_client.py::test_range_at_revision_put_txn_delete"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "etcd and etcdctl not installed (make setup installs" in result.stdout
    if require:
        assert result.returncode == 1 and "1 error" in result.stdout  # failed in set-up
    else:
        assert result.returncode == 0 and "1 skipped" in result.stdout
        assert "1 etcd tests skipped: etcd and etcdctl not installed" in result.stdout


def test_cluster_member_stop_start_and_compact(etcd_cluster3) -> None:
    cluster = etcd_cluster3
    first = cluster.put("/k", "1")
    cluster.stop(1)
    assert not cluster.members[1].running
    second = cluster.put("/k", "2")  # two of three: still a quorum
    cluster.start(1)
    assert cluster.members[1].running
    assert cluster.request("/v3/kv/range", {"key": "L2s="}, cluster.members[1])["kvs"]
    assert cluster.compact() >= second > first
    root = cluster.root
    cluster.close()
    assert not root.exists() and not any(m.running for m in cluster.members)


@pytest.mark.slow
def test_cluster_starts_again_on_other_ports_when_one_is_taken(
    etcd_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run side by side: a port found free may be taken before etcd binds it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        real = etcd_server.free_ports
        calls: list[int] = []

        def first_one_taken(n: int) -> list[int]:
            calls.append(n)
            return [port, *real(n - 1)] if len(calls) == 1 else real(n)

        monkeypatch.setattr(etcd_server, "free_ports", first_one_taken)
        cluster = etcd_factory(1)
        assert len(calls) == 2 and cluster.members[0].client_port != port
        assert cluster.put("/k", "v") > 0


async def test_members_serve_extra_addresses_over_tls(etcd_factory) -> None:
    """extra_hosts: what tests in network namespaces reach etcd through (a veth address
    there; 127.0.0.2 here), in the members' certificate too."""
    cluster = etcd_factory(1, tls=True, extra_hosts=("127.0.0.2",))
    tls = cluster.tls
    target = parse_etcd_url(
        cluster.url("/p", host="127.0.0.2"),
        cacert=str(tls.cacert), cert=str(tls.client_cert), key=str(tls.client_key),
    )  # fmt: skip
    assert target.endpoints == (("127.0.0.2", cluster.members[0].client_port),)
    async with EtcdClient(target) as client:
        revision = await client.put("/p/k", b"v")
        assert (await client.range_prefix("/p/"))[0] == revision
