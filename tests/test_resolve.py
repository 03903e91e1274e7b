"""Resolution at connect time: a short cache, one lookup per name in flight, its own
threads and timeout (a fake clock and fake lookups; no network)."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
import trio

from tcpproxy.config import AppConfig, Target
from tcpproxy.resolve import DNS_THREADS, NEGATIVE_TTL, POSITIVE_TTL, Resolver
from tests.inproc import PORT, arrive, serve

WAIT = 10.0  # seconds: a bound on waits that should end far sooner


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class HangingLookup:
    """A getaddrinfo stand-in that blocks until released (the test's finally)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list:
        with self._lock:
            self.calls.append(host)
        self.release.wait(WAIT)
        return [(socket.AF_INET, ("10.0.0.1", port))]


async def test_answers_are_cached_for_the_ttl() -> None:
    calls = []

    def lookup(host, port):
        calls.append(host)
        return [(socket.AF_INET, (f"10.0.0.{len(calls)}", port))]

    clock = Clock()
    r = Resolver(clock=clock, lookup=lookup)
    first = await r.resolve("svc.example", 80)
    assert first == [(socket.AF_INET, ("10.0.0.1", 80))]
    assert await r.resolve("svc.example", 80) == first
    assert calls == ["svc.example"]
    clock.now += POSITIVE_TTL + 0.1
    assert await r.resolve("svc.example", 80) != first  # re-resolved: the address moved
    r.forget()
    await r.resolve("svc.example", 80)
    assert len(calls) == 3


async def test_failures_are_cached_briefly() -> None:
    calls = []

    def failing(host, port):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    clock = Clock()
    r = Resolver(clock=clock, lookup=failing)
    for _ in range(3):
        with pytest.raises(socket.gaierror):
            await r.resolve("nope.invalid", 80)
    assert len(calls) == 1
    clock.now += NEGATIVE_TTL + 0.1
    with pytest.raises(socket.gaierror):
        await r.resolve("nope.invalid", 80)
    assert len(calls) == 2


async def test_numeric_hosts_resolve_inline() -> None:
    def no_lookup(host, port):
        raise AssertionError("numeric hosts need no lookup")

    r = Resolver(lookup=no_lookup)
    assert await r.resolve("127.0.0.1", 9) == [(socket.AF_INET, ("127.0.0.1", 9))]
    assert (await r.resolve("::1", 9))[0][0] == socket.AF_INET6


async def test_real_lookup_of_localhost() -> None:
    families = {family for family, _ in await Resolver().resolve("localhost", 9)}
    assert families and families <= {socket.AF_INET, socket.AF_INET6}


async def test_concurrent_resolves_of_one_name_make_one_lookup() -> None:
    calls = []
    entered = threading.Event()
    release = threading.Event()

    def slow(host, port):
        calls.append(host)
        entered.set()
        release.wait(WAIT)
        return [(socket.AF_INET, ("10.0.0.7", port))]

    r = Resolver(lookup=slow)
    answers = []

    async def one() -> None:
        answers.append(await r.resolve("svc.example", 80))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
            await trio.to_thread.run_sync(entered.wait, WAIT)
            await trio.sleep(0.05)  # every caller is waiting now
            release.set()
    assert calls == ["svc.example"]
    assert answers == [[(socket.AF_INET, ("10.0.0.7", 80))]] * 20


async def test_a_hanging_lookup_times_out_with_its_own_message() -> None:
    lookup = HangingLookup()
    r = Resolver(lookup=lookup, lookup_timeout=0.3)
    try:
        with trio.fail_after(WAIT):
            with pytest.raises(OSError, match=r"^DNS lookup for slow\.example timed out"):
                await r.resolve("slow.example", 80)
            # remembered briefly: the next caller fails at once, with no second thread
            with pytest.raises(socket.gaierror, match="timed out"):
                await r.resolve("slow.example", 80)
        assert lookup.calls == ["slow.example"]
    finally:
        lookup.release.set()


async def test_the_callers_deadline_bounds_the_lookup_and_names_dns(caplog) -> None:
    """The connect path reports a hanging lookup as such, not as a silent target."""
    lookup = HangingLookup()
    r = Resolver(lookup=lookup)  # its own timeout is longer than the connect timeout
    app = AppConfig("A", (PORT,), (Target("slow.example", 80),), connect_timeout=0.5)
    try:
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, resolver=r)
            with caplog.at_level(logging.WARNING, logger="tcpproxy"), arrive(proxy) as client:
                with trio.fail_after(WAIT):  # the connect timeout ends it: closed
                    assert await trio.to_thread.run_sync(client.recv, 1) == b""
            nursery.cancel_scope.cancel()
        (message,) = [r.getMessage() for r in caplog.records if "no target" in r.getMessage()]
        assert "slow.example:80: DNS lookup for slow.example timed out" in message, message
        assert "no answer" not in message
    finally:
        lookup.release.set()


async def test_hanging_lookups_leave_the_default_thread_limiter_free() -> None:
    """Config reading and file watching share trio's default limiter: DNS must not fill it."""
    lookup = HangingLookup()
    r = Resolver(lookup=lookup, lookup_timeout=WAIT)
    default_size = trio.to_thread.current_default_thread_limiter().total_tokens
    try:
        async with trio.open_nursery() as nursery:
            for i in range(int(default_size) + 10):
                nursery.start_soon(r.resolve, f"host{i}.example", 80)
            with trio.fail_after(WAIT / 2):
                while len(lookup.calls) < DNS_THREADS:
                    await trio.sleep(0.01)
                await trio.sleep(0.1)
                assert len(lookup.calls) == DNS_THREADS  # the others wait for a DNS thread
                assert await trio.to_thread.run_sync(lambda: "read") == "read"
            nursery.cancel_scope.cancel()
    finally:
        lookup.release.set()


def test_cached_answers_literals_and_fresh_entries_without_waiting() -> None:
    now = [0.0]
    lookups: list[str] = []

    def lookup(host: str, port: int) -> list[tuple[int, tuple]]:
        lookups.append(host)
        return [(socket.AF_INET, ("10.1.2.3", port))]

    resolver = Resolver(clock=lambda: now[0], lookup=lookup)
    assert resolver.cached("127.0.0.1", 80) == [(socket.AF_INET, ("127.0.0.1", 80))]
    assert resolver.cached("db.example", 80) is None  # a name: needs a lookup
    trio.run(resolver.resolve, "db.example", 80)
    assert resolver.cached("db.example", 80) == [(socket.AF_INET, ("10.1.2.3", 80))]
    now[0] += POSITIVE_TTL + 1
    assert resolver.cached("db.example", 80) is None  # stale
    assert lookups == ["db.example"]
