"""The epoll engine in-process: its loop must notice what its helper tasks change."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any

import pytest
import trio

from tcpproxy.admission import Ticket
from tcpproxy.config import AppConfig, Config, Target
from tcpproxy.engine.conn import Conn
from tcpproxy.engine.loop import IN
from tcpproxy.engine.timers import PHASE
from tcpproxy.flow import Flow
from tcpproxy.listeners import ACCEPT_BACKOFF
from tcpproxy.proxy import Proxy
from tests.inproc import PORT, arrive, serve
from tests.test_connect import Blackhole

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too


class LookupResolver:
    """Nothing cached: every connection's name is resolved on the engine's lookup task."""

    def __init__(self, addresses: list[tuple[int, tuple]]) -> None:
        self.addresses = addresses

    def cached(self, host: str, port: int) -> None:
        return None

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        await trio.sleep(0.05)  # answered while the loop sleeps
        return self.addresses

    def forget(self) -> None:
        pass


async def test_the_stagger_armed_by_a_lookup_wakes_the_loop() -> None:
    """A name whose first address drops SYNs: the lookup task arms the happy-eyeballs
    stagger; the sleeping loop must wake for it, not only at the connect timeout."""
    hole = Blackhole()
    live = socket.socket()
    client = None
    try:
        live.bind(("127.0.0.1", 0))
        live.listen()
        live.setblocking(False)
        resolver = LookupResolver([
            (socket.AF_INET, hole.address), (socket.AF_INET, live.getsockname()),
        ])  # fmt: skip
        app = AppConfig("A", (PORT,), (Target("db.test", 5432),), connect_timeout=5.0)
        async with trio.open_nursery() as nursery:
            proxy, _engine = await serve(
                nursery, app, max_connections=10, resolver=resolver, use_splice=False
            )  # type: ignore[arg-type]
            client = arrive(proxy)
            with trio.move_on_after(2.5) as waited:  # well within the 5 s connect timeout
                await trio.lowlevel.wait_readable(live)
            assert not waited.cancelled_caught, "the second address was not tried in time"
            live.accept()[0].close()
            nursery.cancel_scope.cancel()
    finally:
        hole.close()
        live.close()
        if client is not None:
            client.close()


class FlakyListener(socket.socket):
    """A listener whose accept fails with EMFILE while `out_of_fds` is set."""

    out_of_fds = False

    def _accept(self):  # type: ignore[override]
        if self.out_of_fds:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super()._accept()


async def test_a_listener_backing_off_then_paused_at_the_limit_accepts_again() -> None:
    """EMFILE (backoff), then the backoff's retry finds the connection limit reached
    (pause): once a slot is free the listener must accept again, not stay deaf."""
    backend = socket.socket()
    listener = FlakyListener()
    clients: list[socket.socket] = []
    try:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        backend.setblocking(False)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        app = AppConfig("A", (PORT,), (Target("127.0.0.1", backend.getsockname()[1]),))
        async with trio.open_nursery() as nursery:
            proxy, engine = await serve(nursery, app, max_connections=1, use_splice=False)
            engine.add_listener(listener, PORT)

            listener.out_of_fds = True
            late = socket.create_connection(listener.getsockname())
            clients.append(late)
            await trio.sleep(0.03)  # its accept failed: backing off
            first = arrive(proxy)  # meanwhile the one slot is taken
            clients.append(first)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(backend)
            backend.accept()[0].close()
            listener.out_of_fds = False
            await trio.sleep(3 * ACCEPT_BACKOFF)  # the retry came and found no slot: paused
            first.close()  # the slot is free again (the target's close ends it too)
            with trio.move_on_after(3) as waited:
                await trio.lowlevel.wait_readable(backend)
            assert not waited.cancelled_caught, "the listener no longer accepts"
            backend.accept()[0].close()
            nursery.cancel_scope.cancel()
    finally:
        for sock in [*clients, backend, listener]:
            sock.close()


async def test_an_ended_connection_lets_go_of_its_buffers() -> None:
    """A stale timer keeps an ended Conn until the timer heap is swept: it must not
    keep the bytes a slow reader never took (nor its directions) with it."""
    backend = socket.socket()
    client = served = None
    try:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        app = AppConfig("A", (PORT,), (Target("127.0.0.1", backend.getsockname()[1]),))
        async with trio.open_nursery() as nursery:
            proxy, engine = await serve(nursery, app, max_connections=10, use_splice=False)
            client = arrive(proxy)
            (conn,) = engine.conns
            client.send(b"x")  # the first byte: the engine connects
            served = (await trio.to_thread.run_sync(backend.accept))[0]
            served.setblocking(False)
            with trio.fail_after(5):  # the client reads nothing: the engine holds bytes
                while conn.down is None or conn.down.pend is None:
                    try:
                        served.send(b"y" * 65536)
                    except BlockingIOError:
                        pass
                    await trio.sleep(0.01)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # reset
            with trio.fail_after(5):
                while conn in engine.conns:
                    await trio.sleep(0.01)
            assert (conn.up, conn.down, conn.header, conn.hbuf) == (None, None, None, b"")
            nursery.cancel_scope.cancel()
    finally:
        for sock in (client, served, backend):
            if sock is not None:
                sock.close()


async def test_bytes_held_for_a_slow_reader_survive_reads_the_other_way() -> None:
    """Copying reads into one buffer shared by every connection: what a destination
    did not take must be kept apart, or the next read (here the other direction's)
    overwrites it before it is sent."""
    backend = socket.socket()
    client = served = None
    try:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        app = AppConfig("A", (PORT,), (Target("127.0.0.1", backend.getsockname()[1]),))
        async with trio.open_nursery() as nursery:
            proxy, engine = await serve(nursery, app, max_connections=10, use_splice=False)
            client = arrive(proxy)
            (conn,) = engine.conns
            client.send(b"u")  # the first byte: the engine connects
            served = (await trio.to_thread.run_sync(backend.accept))[0]
            served.setblocking(False)
            down = bytearray()
            block = 0
            with trio.fail_after(5):  # the client reads nothing: the engine holds bytes
                while conn.down is None or conn.down.pend is None:
                    try:
                        chunk = bytes([block % 251]) * 4096
                        served.send(chunk)
                        down += chunk
                        block += 1
                    except BlockingIOError:
                        pass
                    await trio.sleep(0.001)
            client.sendall(b"U" * 16384)  # read the other way, into the same buffer
            received = bytearray()
            client.settimeout(5)
            with trio.fail_after(5):
                while len(received) < len(down):
                    received += await trio.to_thread.run_sync(client.recv, 65536)
            assert received == down
            nursery.cancel_scope.cancel()
    finally:
        for sock in (client, served, backend):
            if sock is not None:
                sock.close()


async def test_a_silent_client_holds_no_target_until_it_speaks() -> None:
    """With a FirstByteTimeout the target is chosen and counted at the first byte
    (as on the trio path), not at accept: a silent client must not weigh on one."""
    backend = socket.socket()
    client = None
    try:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        target = Target("127.0.0.1", backend.getsockname()[1])
        app = AppConfig("A", (PORT,), (target,), first_byte_timeout=5.0)
        async with trio.open_nursery() as nursery:
            proxy, _engine = await serve(nursery, app, max_connections=10, use_splice=False)
            client = arrive(proxy)
            await trio.sleep(0.05)
            assert dict(proxy.admission.active) == {}
            client.send(b"x")
            with trio.fail_after(5):
                while not proxy.admission.active:
                    await trio.sleep(0.01)
            assert dict(proxy.admission.active) == {target: 1}
            nursery.cancel_scope.cancel()
    finally:
        backend.close()
        if client is not None:
            client.close()


class FailingResolver(LookupResolver):
    """Every lookup fails, a little later (on the engine's lookup task)."""

    def __init__(self) -> None:
        super().__init__([])

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        await trio.sleep(0.3)
        raise OSError("no such name")


async def test_a_connection_ended_by_its_lookup_frees_its_slot_at_once() -> None:
    """At --max-connections 1 the next client waits in the listen queue; the first
    one's failed lookup frees the slot, and the loop must resume accepting then, not
    when its next timer (the 5 s connect timeout) happens to wake it."""
    listener = socket.socket()
    clients: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        app = AppConfig("A", (PORT,), (Target("db.test", 5432),), connect_timeout=5.0)
        async with trio.open_nursery() as nursery:
            _proxy, engine = await serve(
                nursery, app, max_connections=1, resolver=FailingResolver(), use_splice=False
            )  # type: ignore[arg-type]
            engine.add_listener(listener, PORT)
            for _ in range(2):
                clients.append(socket.create_connection(listener.getsockname()))
                clients[-1].setblocking(False)
            with trio.move_on_after(2.5) as waited:  # the second's lookup fails at 0.6 s
                await trio.lowlevel.wait_readable(clients[1])
            assert not waited.cancelled_caught, "the second client was not served in time"
            nursery.cancel_scope.cancel()
    finally:
        for sock in [*clients, listener]:
            sock.close()


async def test_the_self_check_sees_a_connection_waiting_for_nothing() -> None:
    """check() (TCPPROXY_ENGINE_CHECKS=1) must catch what would stall a connection:
    a relay watching neither socket, or one watching a descriptor closed under it."""
    backend = socket.socket()
    client = served = None
    try:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        app = AppConfig("A", (PORT,), (Target("127.0.0.1", backend.getsockname()[1]),))
        async with trio.open_nursery() as nursery:
            proxy, engine = await serve(nursery, app, max_connections=10, use_splice=False)
            client = arrive(proxy)
            served = (await trio.to_thread.run_sync(backend.accept))[0]
            (conn,) = engine.conns
            assert engine.check() == []
            conn.interest(engine.loop, 0, 0)  # as a forgotten _update would leave it
            assert any("watching neither socket" in p for p in engine.check())
            conn.interest(engine.loop, IN, IN)
            assert engine.check() == []
            twin = os.dup(conn.tfd)  # the file stays in epoll after its descriptor closes
            os.close(conn.tfd)
            spare = socket.socket()  # takes the number: epoll's entry is the old file's
            try:
                assert spare.fileno() == conn.tfd
                assert any("another (closed) file" in p for p in engine.check())
            finally:
                spare.close()
                os.dup2(twin, conn.tfd)
                os.close(twin)
            nursery.cancel_scope.cancel()
    finally:
        for sock in (client, served, backend):
            if sock is not None:
                sock.close()


class RefusedMeanwhile(socket.SocketType):
    """A connecting socket whose connect fails just after its SO_ERROR is read."""

    __slots__ = ()

    def getsockopt(self, level: int, option: int, *args: int) -> Any:  # type: ignore[override]
        value = super().getsockopt(level, option, *args)
        if (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR):
            self.shutdown(socket.SHUT_RDWR)  # SYN_SENT -> CLOSE, its error pending
        return value


async def test_a_connect_failing_while_its_event_is_read_is_not_a_success() -> None:
    """A stale event on a connect still in flight (its descriptor's number was reused)
    must be told from an answer; the connect failing in the middle of that check must
    not pass for a success (the client was reset instead of the next address tried)."""
    hole = Blackhole()
    live = socket.socket()
    client = None
    try:
        live.bind(("127.0.0.1", 0))
        live.listen()
        live.setblocking(False)
        resolver = LookupResolver([
            (socket.AF_INET, hole.address), (socket.AF_INET, live.getsockname()),
        ])  # fmt: skip
        resolver.cached = lambda host, port: resolver.addresses  # type: ignore[assignment,method-assign]
        app = AppConfig("A", (PORT,), (Target("db.test", 5432),), connect_timeout=5.0)
        async with trio.open_nursery() as nursery:
            proxy, engine = await serve(
                nursery, app, max_connections=10, resolver=resolver, use_splice=False
            )  # type: ignore[arg-type]
            client = arrive(proxy)
            (conn,) = engine.conns
            (attempt,) = conn.attempts  # to the blackhole: SYN_SENT
            fd = attempt.fileno()
            family, kind, proto = attempt.family, attempt.type, attempt.proto
            attempt = RefusedMeanwhile(family, kind, proto, attempt.detach())
            conn.attempts[0] = attempt
            engine.loop.fds[fd] = (engine.dialer.on_attempt, (conn, attempt))
            engine.dialer.on_attempt((conn, attempt), select.EPOLLOUT)  # a stale event
            with trio.move_on_after(2.5) as waited:  # the stagger tries the next address
                await trio.lowlevel.wait_readable(live)
            assert not waited.cancelled_caught, "the next address was not tried"
            live.accept()[0].close()
            nursery.cancel_scope.cancel()
    finally:
        hole.close()
        live.close()
        if client is not None:
            client.close()


async def test_the_timer_sweep_drops_a_timer_of_an_ended_connection() -> None:
    """The sweep (Timers.compact) keeps a timer only if its owner is live; an ended
    connection's timer must be dropped, whatever its generation (a Conn has no
    listener's descriptor)."""
    app = AppConfig("A", (PORT,), (Target("127.0.0.1", 9),))
    ours, client = socket.socketpair()
    try:
        proxy = Proxy(Config(apps=(app,)), max_connections=10)
        engine = proxy.engine
        ticket = proxy.admission.admit(PORT, ("127.0.0.1", 40000))
        assert isinstance(ticket, Ticket)
        ended = Conn(ours, PORT, ("127.0.0.1", 40000), ticket, Flow(), 0.0)
        engine.loop.timers.at(3600.0, ended, PHASE)  # armed with its current generation
        engine.loop.timers.compact()
        assert engine.loop.timers.heap == []
    finally:
        ours.close()
        client.close()


async def test_every_way_a_connection_ends_gives_back_what_it_held() -> None:
    """A refused target, a silent client, a bad PROXY header, a refusal of the app's
    limit at routing, a relay both sides end, a shutdown's cut: each connection's
    ticket is released, its slot and every count
    given back (admission.Ticket.release, called from one place)."""
    refused, backend = socket.socket(), socket.socket()
    clients: list[socket.socket] = []
    try:
        refused.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        up = Target("127.0.0.1", backend.getsockname()[1])
        apps = (
            AppConfig("refused", (1,), (Target("127.0.0.1", refused.getsockname()[1]),)),
            AppConfig("silent", (2,), (up,), first_byte_timeout=0.1),
            AppConfig("header", (3,), (up,), accept_proxy_protocol=True),
            AppConfig("relay", (4,), (up,), max_connections_per_source=5),
            AppConfig("full", (5,), (up,), max_connections_per_source=1, first_byte_timeout=0.2),
        )
        async with trio.open_nursery() as nursery:
            proxy, engine = await serve(nursery, *apps, use_splice=False)
            admission = proxy.admission

            def nothing_held() -> bool:
                return (
                    admission.active_total, admission.free_slots, admission.active,
                    admission.active_by_app, admission.active_by_source,
                ) == (0, admission.max_connections, {}, {}, {})  # fmt: skip

            for port in (1, 2, 3):
                clients.append(arrive(proxy, port=port))
            clients[-1].sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a PROXY header
            clients.append(arrive(proxy, port=5))  # waits for its first byte...
            clients.append(arrive(proxy, port=5))  # ...so this one is over its source limit
            assert clients[-1].recv(1) == b""  # refused at routing (AF_UNIX: no reset)
            assert admission.active_by_app["full"] == 1  # the first, until its timeout
            with trio.fail_after(5):
                while engine.connections:
                    await trio.sleep(0.01)
            assert nothing_held()
            for _ in range(2):  # one ends cleanly, one is cut at shutdown
                clients.append(arrive(proxy, port=4))
                served = (await trio.to_thread.run_sync(backend.accept))[0]
                clients.append(served)
            clients[-4].shutdown(socket.SHUT_WR)
            clients[-3].shutdown(socket.SHUT_WR)
            with trio.fail_after(5):
                while engine.connections > 1:
                    await trio.sleep(0.01)
            assert admission.active_total == 1
            nursery.cancel_scope.cancel()
        assert nothing_held()
    finally:
        for sock in (*clients, refused, backend):
            sock.close()
