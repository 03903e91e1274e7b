"""Connecting to targets: which failures are the target's, and per-address attempts
(through the engine, in-process)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
import trio

from tcpproxy.config import AppConfig, Target
from tcpproxy.connect import describe_error, interleave
from tcpproxy.proxy_protocol import HEADER_TIMEOUT
from tests.helpers import TIMEOUT, app, connect, free_ports, running_tcpproxy, write_config
from tests.inproc import PORT, arrive, serve
from tests.netns import NetNS


def _disable_ipv6() -> None:
    # /proc/sys/net is per namespace, picked by the opening thread's namespace.
    with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", "w") as knob:
        knob.write("1")


def test_address_not_available_fails_over_and_blames_the_target() -> None:
    """IPv6 disabled: connecting to [::1] gives EADDRNOTAVAIL, a failure of that
    target (fail over, mark down), not a shortage of ours that resets the client."""
    with NetNS("tcpproxy-test") as ns:
        ns.call(_disable_ipv6)
        listener = ns.socket()
        with listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.setblocking(False)
            port = listener.getsockname()[1]
            v6, v4 = Target("::1", port), Target("127.0.0.1", port)

            async def main() -> str:
                async with trio.open_nursery() as nursery:
                    proxy, _ = await serve(nursery, AppConfig("app", (PORT,), (v6, v4)))
                    with arrive(proxy):
                        with trio.fail_after(5):  # failed over to the next target
                            await trio.lowlevel.wait_readable(listener)
                        listener.accept()[0].close()
                        book = proxy.health.book
                        assert not book.is_down(v4)
                        why = book.get(v6).reason if book.is_down(v6) else "not down"
                    nursery.cancel_scope.cancel()
                return why

            # sockets are made by the thread running trio: inside the namespace
            assert ns.call(trio.run, main) == "cannot assign requested address"


class Blackhole:
    """A loopback listener whose accept queue is full: SYNs to it are dropped."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.address = self.sock.getsockname()
        self.fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(self.address)
            self.fillers.append(s)
        time.sleep(0.1)

    def close(self) -> None:
        for s in [*self.fillers, self.sock]:
            s.close()


class StubResolver:
    """Answers every name with fixed addresses, as a DNS name with several would
    (from its cache: at once)."""

    def __init__(self, addresses: list[tuple[int, tuple]]) -> None:
        self.addresses = addresses

    def cached(self, host: str, port: int) -> list[tuple[int, tuple]]:
        return self.addresses

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        return self.addresses

    def forget(self) -> None:
        pass


async def test_a_dead_first_address_does_not_use_up_the_connect_timeout() -> None:
    """A name whose first address drops SYNs: the next address is tried after a
    short stagger (happy eyeballs), within the one ConnectTimeout of the target."""
    hole = Blackhole()
    live = socket.socket()
    try:
        live.bind(("127.0.0.1", 0))
        live.listen()
        live.setblocking(False)
        resolver = StubResolver([
            (socket.AF_INET, hole.address), (socket.AF_INET, live.getsockname()),
        ])  # fmt: skip
        app = AppConfig("app", (PORT,), (Target("db.example", 5432),), connect_timeout=2.0)
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, resolver=resolver)
            started = trio.current_time()
            with arrive(proxy), trio.fail_after(2.0):
                await trio.lowlevel.wait_readable(live)
            assert trio.current_time() - started < 2.0
            live.accept()[0].close()
            nursery.cancel_scope.cancel()
    finally:
        hole.close()
        live.close()


async def test_every_address_failing_reports_the_failure(caplog) -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    with refused:
        resolver = StubResolver([(socket.AF_INET, refused.getsockname())] * 2)
        app = AppConfig("app", (PORT,), (Target("db.example", 5432),))
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, resolver=resolver)
            with caplog.at_level(logging.WARNING, logger="tcpproxy"), arrive(proxy) as client:
                with trio.fail_after(5):
                    assert await trio.to_thread.run_sync(client.recv, 1) == b""  # closed
            nursery.cancel_scope.cancel()
    assert (
        "app 'app': no target could be connected (db.example:5432: connection refused)"
        in caplog.text
    )


def test_addresses_interleave_families_first_family_first() -> None:
    a4, b4, c4 = ((socket.AF_INET, (f"10.0.0.{i}", 1)) for i in (1, 2, 3))
    a6, b6 = ((socket.AF_INET6, (f"fd00::{i}", 1, 0, 0)) for i in (1, 2))
    assert interleave([a6, b6, a4, b4, c4]) == [a6, a4, b6, b4, c4]
    assert interleave([a4, b4, a6]) == [a4, a6, b4]
    assert interleave([a4]) == [a4]
    assert interleave([]) == []


def test_timeouts_are_described_not_named() -> None:
    """trio.TooSlowError has no text: its type name must not reach a log line."""
    assert describe_error(trio.TooSlowError(), 1.5) == "no answer within 1.5s"
    assert "TooSlowError" not in describe_error(trio.TooSlowError())


@pytest.mark.slow
def test_a_client_silent_past_the_header_timeout_is_logged_in_words(
    config_path: Path, backends
) -> None:
    target = backends("t")
    (port,) = free_ports(1)
    write_config(config_path, [app("A", [port], [target.address], AcceptProxyProtocol=True)])
    with running_tcpproxy(config_path) as proxy, connect(port):
        line = proxy.wait_for(rf"port={port} app=A: .*", timeout=HEADER_TIMEOUT + TIMEOUT)
    assert "TooSlowError" not in line.group(0)
    assert f"no complete PROXY header within {HEADER_TIMEOUT:g} s" in line.group(0)
