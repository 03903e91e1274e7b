"""The splice core in-process, on real loopback TCP sockets."""

from __future__ import annotations

import os
import socket
import struct
from functools import partial

import pytest
import trio

from tcpproxy.splice import EndReason, RelayStats, relay

MODES = pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])


async def tcp_pair() -> tuple[trio.socket.SocketType, socket.socket]:
    """A connected loopback pair: the test's end (trio) and the proxy's end (raw)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    await trio.lowlevel.checkpoint()
    return trio.socket.from_stdlib_socket(a), b


async def recv_all(sock: trio.socket.SocketType) -> bytes:
    chunks = []
    while chunk := await sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@MODES
async def test_bytes_flow_both_ways_with_half_close(use_splice: bool) -> None:
    client, proxy_client = await tcp_pair()
    target, proxy_target = await tcp_pair()
    stats = RelayStats()
    payload = os.urandom(300_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(relay, proxy_client, proxy_target, stats, use_splice=use_splice))

        async def target_side() -> None:
            data = await recv_all(target)  # returns only once the client's EOF is forwarded
            await target.send(b"ok:" + str(len(data)).encode())
            target.shutdown(socket.SHUT_WR)

        nursery.start_soon(target_side)
        await client.send(payload[:100_000])
        for i in range(100_000, len(payload), 50_000):
            await client.send(payload[i : i + 50_000])
        client.shutdown(socket.SHUT_WR)
        assert await recv_all(client) == b"ok:300000"
    assert (stats.up, stats.down, stats.reason) == (300_000, 9, EndReason.DONE)
    for s in (client, proxy_client, proxy_target, target):
        s.close()


@MODES
async def test_target_reset_aborts_the_client(use_splice: bool) -> None:
    client, proxy_client = await tcp_pair()
    target, proxy_target = await tcp_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            stats = RelayStats()
            nursery.start_soon(
                partial(relay, proxy_client, proxy_target, stats, use_splice=use_splice)
            )
            await client.send(b"x")
            assert await target.recv(1) == b"x"
            target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            target.close()
            with pytest.raises(ConnectionResetError):
                await recv_all(client)
    assert stats.reason is EndReason.TARGET_ERROR
    client.close()
    proxy_client.close()
    proxy_target.close()


@pytest.mark.slow
@MODES
async def test_backpressure_bounds_what_the_proxy_takes(use_splice: bool) -> None:
    """A target that never reads stops the client: the proxy does not buffer it all."""
    client, proxy_client = await tcp_pair()
    target, proxy_target = await tcp_pair()
    block = b"z" * 65536
    sent = 0
    async with trio.open_nursery() as nursery:
        stats = RelayStats()
        nursery.start_soon(partial(relay, proxy_client, proxy_target, stats, use_splice=use_splice))
        while sent < 256 * 1024 * 1024:
            with trio.move_on_after(1.0) as blocked:
                sent += await client.send(block)
            if blocked.cancelled_caught:
                break
        # what left the client sits in kernel buffers and at most one chunk in the proxy
        assert sent < 64 * 1024 * 1024
        nursery.cancel_scope.cancel()
    for s in (client, proxy_client, proxy_target, target):
        s.close()


@MODES
async def test_cancel_releases_every_descriptor(use_splice: bool) -> None:
    before = open_fds()
    client, proxy_client = await tcp_pair()
    target, proxy_target = await tcp_pair()
    with trio.move_on_after(0.2):
        await relay(proxy_client, proxy_target, use_splice=use_splice)
    for s in (client, proxy_client, proxy_target, target):
        s.close()
    assert open_fds() == before


@MODES
async def test_target_failing_before_any_byte_leaves_the_client_open(use_splice: bool) -> None:
    client, proxy_client = await tcp_pair()
    target, proxy_target = await tcp_pair()
    target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    target.close()
    with trio.fail_after(5):
        stats = await relay(proxy_client, proxy_target, use_splice=use_splice)
    assert stats.reason is EndReason.TARGET_EARLY_ERROR
    await client.send(b"still usable")  # the proxy may hand it to another target
    await trio.lowlevel.wait_readable(proxy_client)
    assert proxy_client.recv(100) == b"still usable"
    for s in (client, proxy_client, proxy_target):
        s.close()
