"""Connecting to a target: the order of its addresses, and failures in words.

The engine connects connections (tcpproxy/engine/, with failover across an
app's targets: tcpproxy/flow.py); `connect_target` here is the probes' one
connect, on trio. Both try a name's addresses in the same order (happy
eyeballs) and describe a failure in the same words.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Callable, Sequence

import trio

from tcpproxy.config import Target
from tcpproxy.resolve import LookupTimeout, Resolver

__all__ = [
    "HAPPY_EYEBALLS_DELAY",
    "LOCAL_ERRNOS",
    "connect_target",
    "describe_error",
    "interleave",
]

_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_ESTABLISHED = 1  # TCP_ESTABLISHED, the first byte of struct tcp_info

# Failures that are ours (out of descriptors or memory), not the target's: they end the
# attempt without blaming the target or trying the others. Everything else is the
# target's, including EADDRNOTAVAIL and EAFNOSUPPORT: an address family this host cannot
# reach ([::1] with IPv6 disabled) or no free local port towards that one address; both
# are about that target, and another may well work.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# seconds before the next address of a name is tried while the previous attempt has not
# answered: RFC 8305's recommended "Connection Attempt Delay" (happy eyeballs)
HAPPY_EYEBALLS_DELAY = 0.25


def describe_error(exc: BaseException, timeout: float | None = None) -> str:
    """Short lowercase reason for logs: 'connection refused', 'no answer within 2s'.

    `timeout`: the seconds a trio.TooSlowError waited (its text is empty, and
    its type name means nothing to a reader).
    """
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout:g}s" if timeout is not None else "timed out"
    if isinstance(exc, LookupTimeout):
        return str(exc)  # "DNS lookup for NAME timed out": says itself who failed
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror or exc}".lower()
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


Address = tuple[int, tuple]  # (family, sockaddr), as `Resolver.resolve` gives them
AddressCheck = Callable[[Target, int, tuple], None]  # (target, family, sockaddr); raises OSError


def interleave(addresses: Sequence[Address]) -> list[Address]:
    """RFC 8305 section 4: alternate address families, the resolver's first family
    first, so one broken family (an IPv6 path that drops everything) costs one stagger,
    not one per address of it."""
    if not addresses:
        return []
    first = addresses[0][0]
    ours = [a for a in addresses if a[0] == first]
    others = [a for a in addresses if a[0] != first]
    return [a for pair in itertools.zip_longest(ours, others) for a in pair if a is not None]


async def _connect_address(family: int, sockaddr: tuple) -> socket.socket:
    """One non-blocking connect; the socket is closed here unless returned."""
    sock = socket.socket(family, _STREAM_NONBLOCK)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            # On loopback (a sidecar's target) the handshake is done by now;
            # one getsockopt spares a wait on the event loop.
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _ESTABLISHED:
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_target(
    target: Target,
    resolver: Resolver,
    *,
    stagger: float = HAPPY_EYEBALLS_DELAY,
    check: AddressCheck | None = None,
) -> socket.socket:
    """Connect to one target, trying the addresses its host resolves to.

    Happy eyeballs (RFC 8305): addresses are tried in `interleave` order; the
    next one starts when the previous attempt failed or has not answered within
    `stagger` seconds; the first to connect wins and the others are closed. So a
    dead first address costs one stagger, not the caller's whole timeout (which
    bounds the whole attempt at the target, all addresses together).

    `check(target, family, sockaddr)` may veto an address before it is tried
    by raising an OSError, a failure of that address (see tcpproxy.selfloop).

    Returns a connected, non-blocking socket with TCP_NODELAY (the proxy
    forwards what it reads at once; Nagle would hold back small answers).

    Resource handling: the returned socket is the caller's; every socket that
    lost, failed or was cancelled is closed here.
    """
    addresses = interleave(await resolver.resolve(target.host, target.port))
    if not addresses:
        raise OSError(f"{target.host} has no address")
    if len(addresses) == 1:  # the common case (a literal address): no tasks
        if check is not None:
            check(target, *addresses[0])
        return await _connect_address(*addresses[0])
    won: list[socket.socket] = []
    errors: list[OSError] = []

    async def attempt(family: int, sockaddr: tuple, failed: trio.Event) -> None:
        try:
            if check is not None:
                check(target, family, sockaddr)
            sock = await _connect_address(family, sockaddr)
        except OSError as exc:
            errors.append(exc)
            failed.set()
            return
        if won:  # another finished in the same turn: keep the first
            sock.close()
            return
        won.append(sock)
        nursery.cancel_scope.cancel()  # stop the others (their sockets close)

    try:
        async with trio.open_nursery() as nursery:
            for family, sockaddr in addresses:
                failed = trio.Event()
                nursery.start_soon(attempt, family, sockaddr, failed)
                with trio.move_on_after(stagger):
                    await failed.wait()
    except BaseException:
        for sock in won:  # cancelled from outside just as one connected
            sock.close()
        raise
    if won:
        return won[0]
    # ours first (out of descriptors: say so, not blame the target), else the first failure
    raise next((e for e in errors if e.errno in LOCAL_ERRNOS), errors[0])
