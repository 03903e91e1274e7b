"""Resolution at connect time with a short cache (a fake clock; no network)."""

from __future__ import annotations

import socket

import pytest
import trio

from tcpproxy.resolve import NEGATIVE_TTL, POSITIVE_TTL, Resolver


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_answers_are_cached_for_the_ttl(monkeypatch) -> None:
    calls = []

    async def fake_getaddrinfo(host, port, **kw):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.0.0.{len(calls)}", port))]

    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    clock = Clock()
    r = Resolver(clock=clock)
    first = await r.resolve("svc.example", 80)
    assert await r.resolve("svc.example", 80) == first
    assert calls == ["svc.example"]
    clock.now += POSITIVE_TTL + 0.1
    assert await r.resolve("svc.example", 80) != first  # re-resolved: the address moved
    r.forget()
    await r.resolve("svc.example", 80)
    assert len(calls) == 3


async def test_failures_are_cached_briefly(monkeypatch) -> None:
    calls = []

    async def failing(host, port, **kw):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(trio.socket, "getaddrinfo", failing)
    clock = Clock()
    r = Resolver(clock=clock)
    for _ in range(3):
        with pytest.raises(socket.gaierror):
            await r.resolve("nope.invalid", 80)
    assert len(calls) == 1
    clock.now += NEGATIVE_TTL + 0.1
    with pytest.raises(socket.gaierror):
        await r.resolve("nope.invalid", 80)
    assert len(calls) == 2


async def test_numeric_hosts_resolve_inline() -> None:
    r = Resolver()
    assert await r.resolve("127.0.0.1", 9) == [(socket.AF_INET, ("127.0.0.1", 9))]
    assert (await r.resolve("::1", 9))[0][0] == socket.AF_INET6
