"""The engine's INSPECTING phase in-process: what InspectTimeout decides at its edge.

The loop handles a round's socket events before its due timers, at most
MAX_EVENTS of them per round: a client's bytes can be in its socket, not yet
seen, when its InspectTimeout fires (they came after the round's poll, or
with more events than one round takes). The tests stand in for that round by
calling the engine's timer handler while the client's bytes wait unseen.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from tcpproxy.config import AppConfig, Target
from tcpproxy.engine.timers import PHASE
from tests.hellos import client_hello, records
from tests.inproc import PORT, arrive, serve

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

WAIT = 5.0  # seconds a test waits for the engine to act


@pytest.fixture
def named_and_default() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Listeners for an app named a.test and its port's default."""
    made = []
    try:
        for _ in range(2):
            listener = socket.create_server(("127.0.0.1", 0))
            listener.setblocking(False)
            made.append(listener)
        yield made[0], made[1]
    finally:
        for listener in made:
            listener.close()


def _apps(named: socket.socket, default: socket.socket) -> list[AppConfig]:
    def target(listener: socket.socket) -> tuple[Target, ...]:
        return (Target("127.0.0.1", listener.getsockname()[1]),)

    return [
        AppConfig("A", (PORT,), target(named), hostnames=("a.test",), inspect_timeout=60.0),
        AppConfig("D", (PORT,), target(default), inspect_timeout=60.0),
    ]


def _accepted(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return False
    return True


async def _deadline_with_bytes_unseen(
    named: socket.socket, default: socket.socket, sent: bytes
) -> str | None:
    """A client whose `sent` bytes are in its socket when InspectTimeout fires, before
    the loop saw them: the app its connection went to, None if closed."""
    async with trio.open_nursery() as nursery:
        proxy, engine = await serve(nursery, *_apps(named, default), use_splice=False)
        with arrive(proxy, tcp=True) as client:
            (conn,) = engine.conns  # INSPECTING: nothing came yet
            client.sendall(sent)  # on loopback, in the engine's socket when sendall returns
            engine._on_timer(conn, PHASE)  # the deadline, in the same round: no event seen
            app = conn.app.config.name if conn in engine.conns else None
            await trio.sleep(0.05)  # a connect to a target, if any, reaches its listener
            nursery.cancel_scope.cancel()
    return app


async def test_a_partial_hello_at_the_deadline_is_closed_not_the_defaults(
    named_and_default: tuple[socket.socket, socket.socket],
) -> None:
    partial = records(client_hello(b"a.test"))[:200]
    assert await _deadline_with_bytes_unseen(*named_and_default, partial) is None
    assert not _accepted(named_and_default[1]), "a partial hello went to the default"


async def test_a_whole_hello_at_the_deadline_goes_by_its_name(
    named_and_default: tuple[socket.socket, socket.socket],
) -> None:
    whole = records(client_hello(b"a.test"))
    assert await _deadline_with_bytes_unseen(*named_and_default, whole) == "A"
    assert _accepted(named_and_default[0])
