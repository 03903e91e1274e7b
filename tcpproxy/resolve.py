"""Host name resolution at connect time, off the event loop, with a short cache.

Targets may name hosts whose addresses change (DNS-based service discovery),
so names are resolved when a connection needs them, not at config load. A
short cache keeps a burst of connections from queueing one lookup each in the
thread pool; failures are cached more briefly so a fixed name recovers fast.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

__all__ = ["NEGATIVE_TTL", "POSITIVE_TTL", "Resolver"]

POSITIVE_TTL = 5.0  # seconds a successful lookup is reused
NEGATIVE_TTL = 1.0  # seconds a failed lookup is remembered

Address = tuple[int, tuple]  # (family, sockaddr)


class Resolver:
    """Resolves (host, port) to stream socket addresses, caching the answer.

    Numeric hosts skip the thread pool (trio's getaddrinfo answers them inline).
    Raises `socket.gaierror` (an OSError) when the name does not resolve.
    """

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or trio.current_time
        self._cache: dict[tuple[str, int], tuple[float, list[Address] | OSError]] = {}

    async def resolve(self, host: str, port: int) -> list[Address]:
        key = (host, port)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], OSError):
                raise hit[1]
            return hit[1]
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._cache[key] = (now + NEGATIVE_TTL, exc)
            raise
        addrs = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        self._cache[key] = (now + POSITIVE_TTL, addrs)
        return addrs

    def forget(self) -> None:
        """Drop every cached answer (on reload: names may now mean something else)."""
        self._cache.clear()
