"""Connecting to an app's targets, with failover.

A target that refuses, does not resolve, or does not answer within the app's
connect timeout costs the client nothing but time: the next target in the
balancer's order is tried, until each has been tried once.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence

import trio

from tcpproxy.config import Target
from tcpproxy.errors import ResourceExhausted, TargetUnavailable
from tcpproxy.resolve import Resolver

__all__ = [
    "LOCAL_ERRNOS",
    "NO_FAILURES",
    "connect_target",
    "describe_error",
    "open_target",
]

_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_ESTABLISHED = 1  # TCP_ESTABLISHED, the first byte of struct tcp_info

# Failures that are ours (out of descriptors or memory), not the target's: they end the
# attempt without blaming the target or trying the others. Everything else is the
# target's, including EADDRNOTAVAIL and EAFNOSUPPORT: an address family this host cannot
# reach ([::1] with IPv6 disabled) or no free local port towards that one address; both
# are about that target, and another may well work.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def describe_error(exc: BaseException) -> str:
    """Short lowercase reason for logs: 'connection refused', 'no answer within 2s'."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror or exc}".lower()
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def connect_target(target: Target, resolver: Resolver) -> socket.socket:
    """Connect to one target, trying each address its host resolves to.

    Returns a connected, non-blocking socket with TCP_NODELAY (the proxy
    forwards what it reads at once; Nagle would hold back small answers).

    Resource handling: the returned socket is the caller's; a socket that did
    not connect (error or cancellation) is closed here.
    """
    last: OSError | None = None
    for family, sockaddr in await resolver.resolve(target.host, target.port):
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
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last or OSError(f"{target.host} has no address")


NO_FAILURES: tuple[tuple[Target, str], ...] = ()


async def open_target(
    name: str,
    order: list[Target],
    resolver: Resolver,
    connect_timeout: float,
    *,
    on_failure: Callable[[Target, str], None] | None = None,
) -> tuple[socket.socket, Target, Sequence[tuple[Target, str]]]:
    """Connect to the first target of `order` that answers.

    Args:
      name: the app's name, for the error.
      order: every target once, the preferred first (see `Balancer.order`).
      connect_timeout: seconds allowed per target, resolution included.
      on_failure: told at once of each target that failed (health tracking).

    Returns:
      The socket, its target, and the (target, why) of those that failed
      first (an empty constant in the common case: no list per connection).

    Raises:
      TargetUnavailable: every target failed; it lists why for each.
      ResourceExhausted: this process is out of descriptors or memory.
    """
    failures: list[tuple[Target, str]] = []
    for target in order:
        try:
            with trio.fail_after(connect_timeout):
                sock = await connect_target(target, resolver)
            return sock, target, failures or NO_FAILURES
        except trio.TooSlowError:
            why = f"no answer within {connect_timeout:g}s"
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                raise ResourceExhausted(
                    f"cannot connect to {target}: {describe_error(exc)}"
                ) from None
            why = describe_error(exc)
        failures.append((target, why))
        if on_failure is not None:
            on_failure(target, why)
    raise TargetUnavailable(name, [(str(target), why) for target, why in failures])
