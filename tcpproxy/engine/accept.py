"""The engine's listeners: accepting, pausing at the slot limit, backing off on EMFILE.

Owns the listeners' registration in the epoll set, not their sockets: the
frontends hand them over (`add`) and take them back (`remove`), and close
them. Each accepted socket is handed to `on_accepted(sock, port, peer)`,
the composer's, which owns it from then on.

A slot is needed before each accept: at the limit every listener is
unregistered (`pause`) and new connections wait in the kernel's listen queue
rather than fail; the loop's round `resume`s them once a slot is free.
Errors: out-of-resource errors (listeners.ACCEPT_CAPACITY_ERRNOS) are logged
once per episode and take the listener off for ACCEPT_BACKOFF (a BACKOFF
timer), so running out of descriptors never kills the proxy; errors about
one connection that died in the queue are skipped; anything else propagates
to the loop (a bug: logged, the proxy goes on).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from tcpproxy.engine.loop import IN, Loop
from tcpproxy.engine.timers import BACKOFF
from tcpproxy.listeners import (
    ACCEPT_BACKOFF,
    ACCEPT_BATCH,
    ACCEPT_CAPACITY_ERRNOS,
    ACCEPT_TRANSIENT_ERRNOS,
)

__all__ = ["Acceptor", "Listener"]

log = logging.getLogger("tcpproxy")

# Connections' sockets are the C type under socket.socket: its Python layer (__init__,
# close() through _real_close, reference counting for makefile) costs 2 us a connection.
_Socket = socket.SocketType


class Listener:
    """One listening socket as the engine serves it."""

    __slots__ = ("backoff_pending", "failures", "fd", "gen", "kind", "port", "registered", "sock")

    def __init__(self, sock: socket.socket, port: int | None) -> None:
        self.sock, self.fd, self.port = sock, sock.fileno(), port
        # (family, type, proto) as plain ints for the accepted sockets: socket.accept()
        # converts them to enums for every connection (2 us each time)
        self.kind = (int(sock.family), int(sock.type), sock.proto)
        self.registered = False
        self.failures = 0  # capacity errors in a row
        self.backoff_pending = False  # unregistered until its backoff timer fires
        self.gen = 0  # timer validity (backoff)


class Acceptor:
    """The listeners of one engine.

    Args:
      loop: the engine's loop (epoll set, table, timers).
      has_slot: whether a connection accepted now could be admitted.
      on_accepted: takes each accepted socket (non-blocking) with its port and peer.
    """

    def __init__(
        self,
        loop: Loop,
        has_slot: Callable[[], bool],
        on_accepted: Callable[[socket.SocketType, int, tuple], None],
    ) -> None:
        self._loop = loop
        self._has_slot = has_slot
        self._on_accepted = on_accepted
        self.listeners: dict[int, Listener] = {}
        self.paused = False  # listeners unregistered: at the connection limit

    def add(self, sock: socket.socket, port: int | None) -> None:
        """Accept on `sock` (port None: each connection's own destination port)."""
        lst = Listener(sock, port)
        self.listeners[lst.fd] = lst
        self._loop.fds[lst.fd] = (self.accept, lst)
        if not self.paused:
            self._loop.epoll.register(lst.fd, IN)
            lst.registered = True

    def remove(self, sock: socket.socket) -> None:
        """Stop accepting on `sock` (its owner closes it); its connections go on."""
        lst = self.listeners.pop(sock.fileno(), None)
        if lst is None:
            return
        lst.gen += 1
        del self._loop.fds[lst.fd]
        if lst.registered:
            self._loop.epoll.unregister(lst.fd)
            lst.registered = False

    def remove_all(self) -> None:
        for lst in list(self.listeners.values()):
            self.remove(lst.sock)

    def live(self, lst: Listener) -> bool:
        """Whether `lst` is still served (for the timer heap's sweep)."""
        return self.listeners.get(lst.fd) is lst

    def pause(self) -> None:
        self.paused = True
        for lst in self.listeners.values():
            if lst.registered:
                self._loop.epoll.unregister(lst.fd)
                lst.registered = False

    def resume(self) -> None:
        self.paused = False
        for lst in self.listeners.values():
            if not lst.registered and not lst.backoff_pending:
                self._loop.epoll.register(lst.fd, IN)
                lst.registered = True

    def backoff_over(self, lst: Listener) -> None:
        """Its BACKOFF timer fired: accept on `lst` again."""
        # Paused meanwhile: `resume` registers it (`failures` may stay > 0 until an
        # accept succeeds, so it cannot be what keeps a listener off).
        lst.backoff_pending = False
        if self.listeners.get(lst.fd) is lst and not lst.registered and not self.paused:
            self._loop.epoll.register(lst.fd, IN)
            lst.registered = True

    def accept(self, lst: Listener, ev: int) -> None:
        """Accept a burst, up to ACCEPT_BATCH without waiting for readiness again."""
        has_slot, on_accepted = self._has_slot, self._on_accepted
        accept = lst.sock._accept  # type: ignore[attr-defined]
        family, kind, proto = lst.kind
        for _ in range(ACCEPT_BATCH):
            if not has_slot():  # at the limit: the rest wait in the listen queue
                self.pause()
                return
            try:
                fd, peer = accept()  # the C method under socket.accept(): (fd, address)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    self._back_off(lst, exc)
                    return
                if exc.errno in ACCEPT_TRANSIENT_ERRNOS:
                    continue
                raise
            try:
                sock = _Socket(family, kind, proto, fd)
            except OSError:  # cannot happen to an accepted descriptor; do not leak it
                os.close(fd)
                continue
            try:
                sock.setblocking(False)
                port = lst.port if lst.port is not None else sock.getsockname()[1]
            except OSError:  # already reset by the peer
                sock.close()
                continue
            if lst.failures:
                log.warning("port %s: accepting again after %d failed tries", lst.port or "*",
                            lst.failures)  # fmt: skip
                lst.failures = 0
            on_accepted(sock, port, peer)

    def _back_off(self, lst: Listener, exc: OSError) -> None:
        if not lst.failures:
            log.error(
                "port %s: accept failed: %s; retrying every %.0f ms",
                lst.port or "*", exc.strerror, ACCEPT_BACKOFF * 1000,
            )  # fmt: skip
        lst.failures += 1
        lst.backoff_pending = True
        if lst.registered:
            self._loop.epoll.unregister(lst.fd)
            lst.registered = False
        self._loop.at(self._loop.now + ACCEPT_BACKOFF, lst, BACKOFF)
