"""Shared fixtures: temporary config files, backends and network namespaces that clean up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpproxy.build_info import describe as describe_build
from tests.etcd_server import EtcdCluster, etcd_unavailable_reason
from tests.helpers import Backend
from tests.netns import bpf_unavailable_reason, netns_fixture

__all__ = ["netns_fixture"]

# Set by .ci/run when it runs as root: a BPF test that cannot run is then a failure.
REQUIRE_BPF = os.environ.get("TCPPROXY_REQUIRE_BPF") == "1"

# Started as root, both binaries drop to --user (default nobody) after setup; the
# configs tests write live under pytest's mode-700 tmp dirs, which nobody cannot read
# (nobody would then keep CAP_DAC_READ_SEARCH, and warn). So tests keep uid 0 (every
# capability is still dropped) unless they pass --user or unset these.
for _prog in ("TCPPROXY", "BPFPROXY"):
    os.environ.setdefault(f"{_prog}_USER", "root")


def pytest_report_header() -> str:
    """Which build the tests run (tcpproxy/build_info.py): compiled, or interpreted."""
    return f"tcpproxy build: {describe_build()}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("bpf") is None:
        return
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"BPF test cannot run but TCPPROXY_REQUIRE_BPF=1: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say once, at the end, why the BPF or etcd tests were skipped (not once per test)."""
    reason = bpf_unavailable_reason()
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum(1 for report in skipped if reason and reason in str(report.longrepr))
    if count:
        terminalreporter.write_line(f"{count} BPF tests skipped: {reason}", yellow=True)
    etcd_reason = etcd_unavailable_reason()
    count = sum(1 for report in skipped if etcd_reason and etcd_reason in str(report.longrepr))
    if count:
        terminalreporter.write_line(f"{count} etcd tests skipped: {etcd_reason}", yellow=True)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "config.json"


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """Factory: backends(name, handler=None) -> a running Backend, closed after the test."""
    made: list[Backend] = []

    def make(name: str, handler: Callable | None = None, **kw: object) -> Backend:
        backend = Backend(name, handler, **kw)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def _require_etcd() -> None:
    """Skip a real-etcd test where etcd is missing; fail instead under TCPPROXY_REQUIRE_BPF=1."""
    reason = etcd_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"etcd test cannot run but TCPPROXY_REQUIRE_BPF=1: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def etcd_factory() -> Iterator[Callable[..., EtcdCluster]]:
    """Factory: etcd_factory(size=1, tls=False, extra_args=(), extra_hosts=()) -> a
    started EtcdCluster (see its docstring).

    Every cluster made is killed and its directories removed after the test.
    """
    _require_etcd()
    made: list[EtcdCluster] = []

    def make(size: int = 1, **options: Any) -> EtcdCluster:
        cluster = EtcdCluster(size, **options)
        made.append(cluster)
        return cluster.__enter__()

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture
def etcd(etcd_factory: Callable[..., EtcdCluster]) -> EtcdCluster:
    """A one-member etcd on loopback, fresh for the test."""
    return etcd_factory(1)


@pytest.fixture
def etcd_cluster3(etcd_factory: Callable[..., EtcdCluster]) -> EtcdCluster:
    """A three-member etcd cluster on loopback, fresh for the test."""
    return etcd_factory(3)
