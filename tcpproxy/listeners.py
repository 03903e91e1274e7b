"""Listening sockets: opening one, and the rules of accepting on it.

Kept apart from serving (as trio's `open_tcp_listeners` and
`serve_listeners` are) so both binaries compose them: a frontend opens its
sockets here and hands them to the engine, which accepts (tcpproxy/engine/).
"""

from __future__ import annotations

import errno
import socket
from typing import Protocol

from tcpproxy.errors import StartupError

__all__ = ["ACCEPT_CAPACITY_ERRNOS", "BACKLOG", "ListenerHost", "bind_hint", "open_listener"]

BACKLOG = 4096  # pending connections per listener; the kernel caps it at net.core.somaxconn
# accept() failures that mean "out of resources": back off and retry, never crash
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.100  # seconds to sleep after an accept capacity error
ACCEPT_BATCH = 64  # connections accepted in a row before serving the others
# accept() failures about one connection that died in the queue: skip it
ACCEPT_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class ListenerHost(Protocol):
    """Who accepts on the listening sockets a frontend hands it: the engine.

    The frontend keeps owning each socket: it closes it after `remove_listener`
    (at a reload that drops its port, at shutdown, after an upgrade).
    """

    def add_listener(self, sock: socket.socket, port: int | None) -> None:
        """Accept on `sock`; `port` None: each connection's own destination port."""

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop accepting on `sock` (a socket not added, or removed already: nothing)."""


def bind_hint(exc: OSError) -> str:
    """What to do about a bind error, for the startup message."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    return (exc.strerror or str(exc)).lower()


def open_listener(
    host: str | None, port: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A listening, non-blocking TCP socket on host:port; host None means every address.

    `listen=False` only binds: a check that the port can be had.

    Every address is `[::]` dual-stack where IPv6 exists, else `0.0.0.0`.

    Raises:
      StartupError: naming the address and port and what to do.
    """
    if host is None or host in ("", "*"):
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        candidates = [(family, host.strip("[]"))]
    last: OSError | None = None
    for family, address in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # no IPv6 on this machine
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted
            sock_addr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
            sock.bind(sock_addr)
            if listen:
                sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) and len(candidates) > 1:
                last = exc
                continue
            where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            hint = bind_hint(exc)
            raise StartupError(f"cannot listen on port {port} ({where}): {hint}") from None
        return sock
    raise StartupError(f"cannot listen on port {port}: {bind_hint(last) if last else 'no address'}")
