"""Listening sockets: opening one, and the accept loop that both frontends run.

Kept apart (as trio's `open_tcp_listeners` and `serve_listeners` are) so
both binaries compose them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from tcpproxy.errors import StartupError

__all__ = ["ACCEPT_CAPACITY_ERRNOS", "BACKLOG", "accept_loop", "bind_hint", "open_listener"]

log = logging.getLogger("tcpproxy")

BACKLOG = 4096  # pending connections per listener; the kernel caps it at net.core.somaxconn
# accept() failures that mean "out of resources": back off and retry, never crash
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.100  # seconds to sleep after an accept capacity error
ACCEPT_BATCH = 64  # connections accepted in a row before yielding to other tasks
# accept() failures about one connection that died in the queue: skip it
ACCEPT_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

Dispatch = Callable[[socket.socket, int, tuple], None]


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


async def accept_loop(
    listener: socket.socket,
    port: int | None,
    dispatch: Dispatch,
    slots: trio.Semaphore,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until cancelled, handing each to `dispatch(sock, port, peer)`.

    `dispatch` is synchronous and starts the connection's task elsewhere (so
    connections outlive this loop: a listener can stop while they drain).
    `port` None means "the connection's own destination port" (getsockname),
    as for bpfproxy's one steered socket.

    A slot of `slots` is taken before each accept and handed to `dispatch`
    with the connection (it gives the slot back when the connection ends):
    at the connection limit this loop waits, and new connections queue in
    the kernel's listen backlog rather than fail. A burst is accepted
    without waiting for readiness again (up to ACCEPT_BATCH in a row).

    Resource handling: closes `listener` when it ends (cancellation included).

    Error handling: out-of-resource errors (EMFILE...) are logged once per
    episode and retried after ACCEPT_BACKOFF, so running out of descriptors
    never kills the proxy; errors about a single aborted connection are
    skipped; anything else propagates.
    """
    with listener:
        task_status.started()
        accept, wait_readable = listener.accept, trio.lowlevel.wait_readable
        batch = 0
        failures = 0  # capacity errors in a row: logged at the first and at the end
        drained = False  # the last accept found the queue empty
        while True:
            if drained:  # wait holding no slot: an idle port must not hold one
                batch = 0
                await wait_readable(listener)
                drained = False
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await slots.acquire()
            try:
                sock, peer = accept()
            except BlockingIOError:
                slots.release()
                drained = True
                continue
            except OSError as exc:
                slots.release()
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    if not failures:
                        log.error(
                            "port %s: accept failed: %s; retrying every %.0f ms",
                            port or "*", exc.strerror, ACCEPT_BACKOFF * 1000,
                        )  # fmt: skip
                    failures += 1
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if exc.errno in ACCEPT_TRANSIENT_ERRNOS:
                    continue
                raise
            try:
                sock.setblocking(False)
                local_port = port if port is not None else sock.getsockname()[1]
            except OSError:  # already reset by the peer
                sock.close()
                slots.release()
                continue
            if failures:
                log.warning("port %s: accepting again after %d failed tries", port or "*", failures)
                failures = 0
            dispatch(sock, local_port, peer)
            batch += 1
            if batch >= ACCEPT_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()  # a long burst must not starve the others
