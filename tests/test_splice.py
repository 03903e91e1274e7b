"""The relay in-process, through the engine, on real loopback TCP sockets
(tcpproxy/splice.py's rules), copying and splicing."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from tcpproxy.config import AppConfig, Target
from tests.inproc import PORT, Ended, arrive, serve

MODES = pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])


def backend() -> socket.socket:
    """A loopback listener standing for a target; the test accepts on it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    return listener


def target_of(listener: socket.socket) -> Target:
    return Target("127.0.0.1", listener.getsockname()[1])


async def accept(listener: socket.socket) -> trio.socket.SocketType:
    """The engine's connection to `listener`, as a trio socket."""
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(listener)
    sock, _ = listener.accept()
    return trio.socket.from_stdlib_socket(sock)


async def recv_all(sock: trio.socket.SocketType) -> bytes:
    chunks = []
    while chunk := await sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@MODES
async def test_bytes_flow_both_ways_with_half_close(use_splice: bool) -> None:
    listener = backend()
    metrics = Ended()
    payload = os.urandom(300_000)
    with listener:
        app = AppConfig("A", (PORT,), (target_of(listener),))
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, use_splice=use_splice, metrics=metrics)
            client = trio.socket.from_stdlib_socket(arrive(proxy, tcp=True))
            target = await accept(listener)

            async def target_side() -> None:
                data = await recv_all(target)  # returns only once the client's EOF is forwarded
                await target.send(b"ok:" + str(len(data)).encode())
                target.shutdown(socket.SHUT_WR)

            nursery.start_soon(target_side)
            with client, target:
                await client.send(payload[:100_000])
                for i in range(100_000, len(payload), 50_000):
                    await client.send(payload[i : i + 50_000])
                client.shutdown(socket.SHUT_WR)
                assert await recv_all(client) == b"ok:300000"
                ((_, _, reason, up, down),) = await metrics.wait()
            nursery.cancel_scope.cancel()
    assert (up, down, reason) == (300_000, 9, "done")


@MODES
async def test_target_reset_aborts_the_client(use_splice: bool) -> None:
    listener = backend()
    metrics = Ended()
    with listener:
        app = AppConfig("A", (PORT,), (target_of(listener),))
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, use_splice=use_splice, metrics=metrics)
            client = trio.socket.from_stdlib_socket(arrive(proxy, tcp=True))
            target = await accept(listener)
            with client, target, trio.fail_after(5):
                await client.send(b"x")
                assert await target.recv(1) == b"x"
                target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                target.close()
                with pytest.raises(ConnectionResetError):
                    await recv_all(client)
                ((_, _, reason, _, _),) = await metrics.wait()
            nursery.cancel_scope.cancel()
    assert reason == "target-error"


@pytest.mark.slow
@MODES
async def test_backpressure_bounds_what_the_proxy_takes(use_splice: bool) -> None:
    """A target that never reads stops the client: the proxy does not buffer it all."""
    listener = backend()
    block = b"z" * 65536
    sent = 0
    with listener:
        app = AppConfig("A", (PORT,), (target_of(listener),))
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, use_splice=use_splice)
            client = trio.socket.from_stdlib_socket(arrive(proxy, tcp=True))
            target = await accept(listener)
            with client, target:
                while sent < 256 * 1024 * 1024:
                    with trio.move_on_after(1.0) as blocked:
                        sent += await client.send(block)
                    if blocked.cancelled_caught:
                        break
            nursery.cancel_scope.cancel()
    # what left the client sits in kernel buffers and at most one chunk in the proxy
    assert sent < 64 * 1024 * 1024


@MODES
async def test_cancel_releases_every_descriptor(use_splice: bool) -> None:
    """The engine cut mid-relay (a drain's deadline) closes every socket and pipe it made."""
    listener = backend()
    client = target = None
    with listener:
        try:
            app = AppConfig("A", (PORT,), (target_of(listener),))
            async with trio.open_nursery() as nursery:
                proxy, engine = await serve(nursery, app, use_splice=use_splice)
                before = open_fds()
                client = trio.socket.from_stdlib_socket(arrive(proxy, tcp=True))
                target = await accept(listener)
                await client.send(b"y" * 65536)  # full reads: splicing, with a pipe each way
                await target.send(b"z" * 65536)
                await trio.sleep(0.1)
                assert engine.connections == 1
                nursery.cancel_scope.cancel()
            with trio.fail_after(5), pytest.raises(ConnectionResetError):  # cut: no clean end
                await recv_all(client)
        finally:
            for sock in (client, target):
                if sock is not None:
                    sock.close()
        assert open_fds() == before


@MODES
async def test_target_failing_before_any_byte_leaves_the_client_to_the_next(
    use_splice: bool,
) -> None:
    """Rule 3's exception: a target reset before a byte moved is not the client's
    business; its bytes reach the next target."""
    first, second = backend(), backend()
    metrics = Ended()
    with first, second:
        dropping = target_of(first)
        app = AppConfig("A", (PORT,), (dropping, target_of(second)))
        async with trio.open_nursery() as nursery:
            proxy, _ = await serve(nursery, app, use_splice=use_splice, metrics=metrics)
            client = trio.socket.from_stdlib_socket(arrive(proxy, tcp=True))
            dropped = await accept(first)
            dropped.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            dropped.close()
            target = await accept(second)
            with client, target, trio.fail_after(5):
                await client.send(b"still usable")
                assert await target.recv(100) == b"still usable"
            nursery.cancel_scope.cancel()
    assert metrics.ended_connections[0][1:3] == (dropping, "target-early-error")
