"""Targets that are the proxy itself: rejected at load, refused at connect time."""

from __future__ import annotations

import ipaddress
import re
import socket
from contextlib import nullcontext

import pytest

from tcpproxy import selfloop
from tcpproxy.config import MAX_PROBLEMS, AppConfig, Config, ConfigError, Target
from tcpproxy.selfloop import (
    SELF_LOOP,
    SELF_LOOP_LOG_INTERVAL,
    SelfLoopError,
    SelfLoopGuard,
    local_addresses,
    parse_bind,
    reject_self_loops,
    self_loops,
)
from tests.deploy import BPF_LISTEN_PORT, Deployment, deployment
from tests.helpers import TIMEOUT, ProxyProcess, app, recv_all, write_config

__all__ = ["deployment"]

HOST = ipaddress.ip_address("192.0.2.10")  # "this host's" address in the pure tests
LOCAL = frozenset({HOST, ipaddress.ip_address("2001:db8::10")})


def target(text: str) -> Target:
    host, port = text.rsplit(":", 1)
    return Target(host.strip("[]"), int(port))


def config(*targets: str) -> Config:
    """App 'web' on port 5000 with `targets`; app 'db' on 6000, elsewhere."""
    return Config(apps=(
        AppConfig("web", (5000,), tuple(map(target, targets))),
        AppConfig("db", (6000,), (Target("10.9.9.9", 6000),)),
    ))  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:5000", "127.9.9.9:6000", "[::1]:5000", "0.0.0.0:5000", "[::]:6000",
     "192.0.2.10:5000", "[2001:db8::10]:6000", "[::ffff:127.0.0.1]:5000"],
)  # fmt: skip
def test_a_local_address_on_our_own_port_is_a_problem(text: str) -> None:
    (problem,) = self_loops(config("10.0.0.1:80", text), (), LOCAL)
    assert problem.startswith(f"Apps[0].Targets[1]: {text!r} of app 'web' is this proxy itself")
    owner = "app 'web' (Apps[0].Ports[0])" if text.endswith("5000") else "app 'db'"
    assert owner in problem


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1:5000", "192.0.2.11:5000", "127.0.0.1:5001", "localhost:5000", "[fe80::1]:5000"],
)
def test_remote_addresses_other_ports_and_names_pass(text: str) -> None:
    assert self_loops(config(text), (), LOCAL) == []


def test_bpfproxy_listening_port_counts_as_ours() -> None:
    (problem,) = self_loops(config("127.0.0.1:8000"), (8000,), LOCAL)
    assert "8000 is bpfproxy's listening port (-p)" in problem
    assert self_loops(config("127.0.0.1:8000"), (), LOCAL) == []


def looping(n: int, apps: type[tuple] = tuple) -> Config:
    """The issue's file: app i on port i, every target 127.0.0.1:1 (app 1's port)."""
    return Config(apps=apps(
        AppConfig(f"a{i}", (i,), (Target("127.0.0.1", 1),)) for i in range(1, n + 1)
    ))  # fmt: skip


def test_each_loop_names_the_app_and_the_port_it_reaches() -> None:
    """Among many apps, each problem names the owner of the port its target reaches."""
    apps = tuple(
        AppConfig(f"a{i}", (1000 + 2 * i, 1001 + 2 * i), (Target("127.0.0.1", 1003 + 2 * i),))
        for i in range(50)
    )  # app i targets the second port of app i+1; the last one reaches no port
    problems = self_loops(Config(apps), (), LOCAL)
    assert len(problems) == 49
    for i, problem in enumerate(problems):
        assert problem.startswith(f"Apps[{i}].Targets[0]: '127.0.0.1:{1003 + 2 * i}' of app")
        assert f"is a port of app 'a{i + 1}' (Apps[{i + 1}].Ports[1]);" in problem


def test_an_apps_port_wins_over_bpfproxys_which_wins_over_a_fleets_other_apps() -> None:
    others = {5000: "a port of app 'x'", 8000: "a port of app 'y'", 7000: "a port of app 'z'"}
    targets = ("127.0.0.1:5000", "127.0.0.1:8000", "127.0.0.1:7000")
    problems = self_loops(config(*targets), (5000, 8000), LOCAL, owners=others)
    assert [re.findall(r" and \d+ is (.*); each", problem)[0] for problem in problems] == [
        "a port of app 'web' (Apps[0].Ports[0])",
        "bpfproxy's listening port (-p)",
        "a port of app 'z'",
    ]


def test_a_rejection_words_the_first_loops_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worded: list[object] = []
    describe = selfloop._describe
    monkeypatch.setattr(selfloop, "_describe", lambda *a: worded.append(a) or describe(*a))
    with pytest.raises(ConfigError) as info:
        reject_self_loops(looping(1000), source="big.json", local=())
    assert len(worded) == MAX_PROBLEMS  # the rest are counted, not worded
    assert info.value.problems == tuple(self_loops(looping(MAX_PROBLEMS), (), ()))
    assert info.value.problems[0] == (
        "Apps[0].Targets[0]: '127.0.0.1:1' of app 'a1' is this proxy itself: 127.0.0.1 is "
        "an address of this host and 1 is a port of app 'a1' (Apps[0].Ports[0]); each "
        "connection would loop back into the proxy until no slot is left"
    )
    assert info.value.more == 1000 - MAX_PROBLEMS
    assert str(info.value).endswith(f"\n  ... and {1000 - MAX_PROBLEMS} more")


class CountedApps(tuple):
    """A config's apps that count how often they are walked."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        CountedApps.walks += 1
        return super().__iter__()


@pytest.mark.parametrize("check", ["self_loops", "reject_self_loops"])
def test_the_apps_are_walked_a_fixed_number_of_times_however_many_loop(check: str) -> None:
    """Linear: looking up each problem's owner by a scan of every app made N looping
    apps cost N^2 (16,000 apps: minutes)."""
    walks = []
    for n in (100, 1000):
        CountedApps.walks = 0
        with pytest.raises(ConfigError) if check == "reject_self_loops" else nullcontext():
            getattr(selfloop, check)(looping(n, CountedApps), (), ())
        walks.append(CountedApps.walks)
    assert walks[0] == walks[1] <= 3, walks


@pytest.mark.timeout(20)  # the quadratic check took over 120 s for 16,000 apps
def test_sixteen_thousand_looping_apps_are_judged_in_seconds() -> None:
    config = looping(16_000)
    assert len(self_loops(config, (), ())) == 16_000
    with pytest.raises(ConfigError) as info:
        reject_self_loops(config, local=())
    assert (len(info.value.problems), info.value.more) == (MAX_PROBLEMS, 16_000 - MAX_PROBLEMS)


def test_the_hosts_own_addresses_are_found() -> None:
    addresses = local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in addresses
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.123", 9))  # no packet: picks the source address for it
        try:
            source = ipaddress.ip_address(probe.getsockname()[0])
        except ValueError:
            source = None
    if source is not None and not source.is_unspecified:
        assert source in addresses


# -- the binaries ---------------------------------------------------------------------


def _run_to_exit(d: Deployment, apps: list[dict], *args: str) -> tuple[int, str]:
    write_config(d.config_path, apps)
    proc = ProxyProcess(d.popen_argv(d.argv(*args)))
    try:
        code = proc.proc.wait(TIMEOUT)
    finally:
        proc.kill()
    return code, proc.output


@pytest.mark.slow
def test_start_with_a_target_on_our_own_port_exits_2(deployment: Deployment) -> None:
    d = deployment
    live = d.backend("live")
    port, other = d.ports(2)
    code, output = _run_to_exit(d, [
        app("web", [port], [live.address]),
        app("loop", [other], [live.address, f"127.0.0.1:{port}"]),
    ])  # fmt: skip
    assert code == 2, output
    assert f"Apps[1].Targets[1]: '127.0.0.1:{port}' of app 'loop' is this proxy itself" in output
    assert "app 'web' (Apps[0].Ports[0])" in output
    assert "Traceback" not in output
    if d.binary == "bpfproxy":  # its own listening port is ours too
        code, output = _run_to_exit(d, [app("web", [port], [f"127.0.0.1:{BPF_LISTEN_PORT}"])])
        assert code == 2, output
        assert "listening port (-p)" in output


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_reload_with_a_target_on_our_own_port_is_rejected(
    deployment: Deployment, workers: str
) -> None:
    d = deployment
    a, b = d.backend("a"), d.backend("b")
    port, other = d.ports(2)
    proxy = d.start([app("A", [port], [a.address])], "--workers", workers)
    mark = proxy.mark()
    d.reconfigure([app("A", [port], [b.address, f"[::1]:{other}"]), app("B", [other], [b.address])])
    proxy.wait_for(rf"rejected.*Apps\[0\]\.Targets\[1\]: '\[::1\]:{other}'.*itself", start=mark)
    assert d.which(port) == "a"  # the old config still serves


@pytest.mark.slow
def test_a_reload_of_thousands_of_looping_apps_is_rejected_with_a_short_log(
    deployment: Deployment,
) -> None:
    """The issue's file as a reload: rejected in seconds (it held a core for 81 s), in a
    log of MAX_PROBLEMS problems and a count (it was 16,000 lines, 3.7 MB)."""
    d = deployment
    live = d.backend("live")
    (port,) = d.ports(1)
    proxy = d.start([app("web", [port], [live.address])])
    mark = proxy.mark()
    n = 16_000
    d.reconfigure([app(f"a{i}", [i], ["127.0.0.1:1"]) for i in range(1, n + 1)])
    proxy.wait_for(rf"rejected.*: {n} problems:$", start=mark, timeout=30)  # old: ~60 s
    proxy.wait_for(rf"^  \.\.\. and {n - MAX_PROBLEMS} more$", start=mark)
    lines = proxy.output.split("\n")[mark:]
    shown = [line for line in lines if line.startswith("  Apps[")]
    assert len(shown) == MAX_PROBLEMS, lines
    assert shown[0].startswith("  Apps[0].Targets[0]: '127.0.0.1:1' of app 'a1' is this proxy")
    assert d.which(port) == "live"  # the running config still serves


@pytest.mark.slow
def test_a_name_that_resolves_to_our_own_port_is_refused_and_failed_over(
    deployment: Deployment,
) -> None:
    d = deployment
    live, other = d.backend("live"), d.backend("other")
    failover, alone, third = d.ports(3)
    proxy = d.start(
        [
            app("failover", [failover], [f"localhost:{failover}", live.address]),
            app("alone", [alone], [f"localhost:{alone}"]),
            app("third", [third], [other.address]),
        ],
        "--max-connections", "20",
    )  # fmt: skip
    for _ in range(4):
        assert d.which(failover) == "live"
    for _ in range(3):
        with d.connect(alone) as sock:  # refused, not looped: closed at once
            try:
                assert recv_all(sock) == b""
            except ConnectionResetError:
                pass
    assert d.which(third) == "other"  # slots were not eaten by a loop
    proxy.wait_for(SELF_LOOP)
    warnings = proxy.output.count(f"refused ({SELF_LOOP})")
    assert 1 <= warnings <= 4, proxy.output  # rate-limited: per target, not per connection


def test_the_connect_time_guard_refuses_our_ports_on_local_addresses_only(caplog) -> None:
    now = [0.0]
    guard = SelfLoopGuard(clock=lambda: now[0])
    guard.ports = frozenset({5000})
    name = Target("localhost", 5000)
    for sockaddr in [("127.0.0.1", 5000), ("::1", 5000, 0, 0), ("0.0.0.0", 5000)]:
        with pytest.raises(SelfLoopError, match=SELF_LOOP):
            guard.check(name, socket.AF_INET, sockaddr)
    guard.check(name, socket.AF_INET, ("127.0.0.1", 5001))  # not our port
    guard.check(name, socket.AF_INET, ("192.0.2.123", 5000))  # not this host
    assert caplog.text.count(SELF_LOOP) == 1  # one warning per target per interval
    now[0] += SELF_LOOP_LOG_INTERVAL
    with pytest.raises(SelfLoopError):
        guard.check(name, socket.AF_INET, ("127.0.0.1", 5000))
    assert caplog.text.count(SELF_LOOP) == 2


# -- --bind: only the address the proxy listens on loops ---------------------------------

V4, V6 = ipaddress.ip_address("10.77.0.1"), ipaddress.ip_address("2001:db8::1")
LO2 = ipaddress.ip_address("127.0.0.2")


@pytest.mark.parametrize(
    ("text", "bind", "loops"),
    [
        ("127.0.0.1:5000", None, True),  # every address: any local one loops (as before)
        ("127.0.0.1:5000", "0.0.0.0", True),
        ("127.0.0.1:5000", "::", True),
        ("127.0.0.1:5000", "10.77.0.1", False),  # a loopback service exposed on 10.77.0.1
        ("[::1]:5000", "10.77.0.1", False),
        ("0.0.0.0:5000", "10.77.0.1", False),  # reaches loopback, where we do not listen
        ("192.0.2.10:5000", "10.77.0.1", False),  # another address of this host
        ("10.77.0.1:5000", "10.77.0.1", True),
        ("[::ffff:10.77.0.1]:5000", "10.77.0.1", True),  # v4-mapped is the same address
        ("10.77.0.1:5000", "::ffff:10.77.0.1", True),
        ("10.77.0.1:5001", "10.77.0.1", False),  # not our port
        ("127.0.0.1:5000", "127.0.0.2", False),
        ("127.0.0.2:6000", "127.0.0.2", True),
        ("0.0.0.0:5000", "127.0.0.2", True),  # connect() to 0.0.0.0 reaches loopback
        ("[::]:5000", "127.0.0.2", False),  # ::1 is not 127.0.0.2
        ("[::]:5000", "::1", True),
        ("0.0.0.0:5000", "::1", False),
        ("[2001:db8::1]:5000", "[2001:db8::1]", True),  # the option may be bracketed
        ("[::1]:5000", "2001:db8::1", False),
        ("127.0.0.1:5000", "localhost", True),  # a name: checked as every address, to be safe
    ],
)
def test_with_a_bind_address_only_that_address_loops(text: str, bind: str, loops: bool) -> None:
    address = parse_bind(bind)
    assert len(self_loops(config(text), (), LOCAL | {V4, V6, LO2}, address)) == int(loops)


def test_with_a_bind_address_bpfproxys_listening_port_is_ours_there_only() -> None:
    bind = parse_bind("127.0.0.2")
    assert self_loops(config("127.0.0.1:8000"), (8000,), LOCAL, bind) == []
    (problem,) = self_loops(config("127.0.0.2:8000"), (8000,), LOCAL, bind)
    assert "where it listens (127.0.0.2)" in problem and "listening port (-p)" in problem


def test_the_connect_time_guard_with_a_bind_address_refuses_that_address_only() -> None:
    guard = SelfLoopGuard(bind="127.0.0.2")
    guard.ports = frozenset({5000})
    name = Target("localhost", 5000)
    guard.check(name, socket.AF_INET, ("127.0.0.1", 5000))  # a loopback service: allowed
    guard.check(name, socket.AF_INET6, ("::1", 5000, 0, 0))
    for sockaddr in [("127.0.0.2", 5000), ("::ffff:127.0.0.2", 5000, 0, 0), ("0.0.0.0", 5000)]:
        with pytest.raises(SelfLoopError):
            guard.check(name, socket.AF_INET, sockaddr)


BIND = "127.0.0.2"  # a loopback address other than 127.0.0.1: Linux answers all of 127/8


@pytest.mark.slow
def test_bind_elsewhere_serves_a_loopback_service_on_our_own_port(deployment: Deployment) -> None:
    """--bind B exposes 127.0.0.1:P on B:P, same port: nothing loops, it starts and serves."""
    d = deployment
    (port,) = d.ports(1)
    d.backend("loopback-service", port=port)  # 127.0.0.1:port
    d.start([app("expose", [port], [f"127.0.0.1:{port}"])], "--bind", BIND)
    assert d.which(port, host=BIND) == "loopback-service"


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])  # workers get --bind for their guard too
def test_bind_elsewhere_serves_a_name_for_a_loopback_service_on_our_own_port(
    deployment: Deployment, workers: str
) -> None:
    """The same with a name, checked at connect time: served, not refused as a loop."""
    d = deployment
    (port,) = d.ports(1)
    d.backend("loopback-service", port=port)
    proxy = d.start(
        [app("expose", [port], [f"localhost:{port}"])], "--bind", BIND, "--workers", workers
    )
    for _ in range(3):
        assert d.which(port, host=BIND) == "loopback-service"
    assert SELF_LOOP not in proxy.output


def test_bind_address_on_our_own_port_still_exits_2(deployment: Deployment) -> None:
    d = deployment
    live = d.backend("live")
    port, other = d.ports(2)
    apps = [app("web", [port], [live.address]), app("loop", [other], [f"{BIND}:{port}"])]
    code, output = _run_to_exit(d, apps, "--bind", BIND)
    assert code == 2, output
    assert f"Apps[1].Targets[0]: '{BIND}:{port}' of app 'loop' is this proxy itself" in output
    assert "Traceback" not in output
