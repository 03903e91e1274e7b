"""Host name resolution at connect time, off the event loop, with a short cache.

Targets may name hosts whose addresses change (DNS-based service discovery),
so names are resolved when a connection needs them, not at config load. A
short cache keeps a burst of connections from queueing one lookup each;
failures are cached more briefly so a fixed name recovers fast.

When DNS hangs, `getaddrinfo` threads cannot be interrupted: they are abandoned
and keep their thread until the C library gives up. So lookups run on threads
of their own (`DNS_THREADS`), never on trio's default limiter, which config
reading and file watching need; one lookup per name is in flight at a time,
every caller for that name waits on it; and a caller waits at most
`LOOKUP_TIMEOUT` (less when its own deadline is nearer), then gets an error
that says DNS timed out rather than blaming the target.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

__all__ = [
    "DNS_THREADS",
    "LOOKUP_TIMEOUT",
    "NEGATIVE_TTL",
    "POSITIVE_TTL",
    "LookupTimeout",
    "Resolver",
]

POSITIVE_TTL = 5.0  # seconds a successful lookup is reused
NEGATIVE_TTL = 1.0  # seconds a failed (or timed-out) lookup is remembered
LOOKUP_TIMEOUT = 5.0  # seconds a caller waits for a lookup (glibc's own per-try timeout)
DNS_THREADS = 8  # lookups of distinct names running at once; more wait for a thread
# Seconds before the caller's own deadline at which a lookup gives up, so that the
# caller sees "DNS lookup ... timed out" rather than its own generic timeout.
DEADLINE_MARGIN = 0.1

Address = tuple[int, tuple]  # (family, sockaddr)
Lookup = Callable[[str, int], list[Address]]  # blocking; runs on a DNS thread


class LookupTimeout(socket.gaierror):
    """A lookup that did not answer in time: DNS is slow or down, not the target."""

    def __init__(self, host: str) -> None:
        super().__init__(socket.EAI_AGAIN, f"DNS lookup for {host} timed out")

    def __str__(self) -> str:
        return self.strerror


def getaddrinfo(host: str, port: int) -> list[Address]:
    """The system resolver's stream addresses for (host, port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _numeric(host: str, port: int) -> list[Address] | None:
    """The address of an IP literal, at once (no DNS, no thread); None for a name."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


class _Flight:
    """One lookup in progress, that every caller for its name waits on."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: list[Address] | OSError | None = None  # None: cancelled


class Resolver:
    """Resolves (host, port) to stream socket addresses, caching the answer.

    Args:
      clock: seconds, for the cache (trio's clock by default; tests pass a fake).
      lookup: the blocking lookup (the system's getaddrinfo by default).
      lookup_timeout: seconds a caller waits for an answer.

    Raises `socket.gaierror` (an OSError) when the name does not resolve,
    `LookupTimeout` (one too) when it does not answer in time.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        lookup: Lookup = getaddrinfo,
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self._clock = clock or trio.current_time
        self._lookup = lookup
        self._lookup_timeout = lookup_timeout
        self._limiter = trio.CapacityLimiter(DNS_THREADS)
        self._cache: dict[tuple[str, int], tuple[float, list[Address] | OSError]] = {}
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._numeric: dict[tuple[str, int], list[Address]] = {}  # IP literals seen (cached())

    async def resolve(self, host: str, port: int) -> list[Address]:
        key = (host, port)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock():
            answer = hit[1]
        else:
            numeric = _numeric(host, port)
            if numeric is not None:
                return numeric
            answer = await self._wait(key)
        if isinstance(answer, OSError):
            raise answer
        return answer

    def cached(self, host: str, port: int) -> list[Address] | None:
        """The answer without waiting, if there is one: an IP literal's, or a fresh cached one.

        None means a lookup is needed (`resolve`). Raises the cached failure.
        For the epoll engine, which must not wait per connection.
        """
        key = (host, port)
        numeric = self._numeric.get(key)  # first: a literal is never in the cache
        if numeric is not None:
            return numeric
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock():
            if isinstance(hit[1], OSError):
                raise hit[1]
            return hit[1]
        numeric = _numeric(host, port)
        if numeric is not None:
            self._numeric[key] = numeric  # bounded: cleared with the cache on reload
        return numeric

    async def _wait(self, key: tuple[str, int]) -> list[Address] | OSError:
        """Join (or start) the lookup of `key` and wait for it, within our bounds."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            # Not any one caller's task: the lookup outlives a caller that gives up,
            # and its answer is still cached for the next one.
            trio.lowlevel.spawn_system_task(self._fly, key, flight, name=f"resolve {key[0]}")
        give_up = min(
            trio.current_time() + self._lookup_timeout,
            trio.current_effective_deadline() - DEADLINE_MARGIN,
        )
        with trio.move_on_at(give_up):
            await flight.done.wait()
        if flight.result is not None:
            return flight.result
        # Still in flight: remember the timeout briefly, so callers in the next
        # NEGATIVE_TTL fail at once instead of each waiting again.
        timeout = LookupTimeout(key[0])
        self._cache[key] = (self._clock() + NEGATIVE_TTL, timeout)
        return timeout

    async def _fly(self, key: tuple[str, int], flight: _Flight) -> None:
        """Run one lookup on a DNS thread; cache its answer, then wake the callers."""
        try:
            flight.result = await trio.to_thread.run_sync(
                self._lookup, *key, abandon_on_cancel=True, limiter=self._limiter
            )
        except OSError as exc:
            flight.result = exc
        except Exception as exc:  # e.g. UnicodeError for a name IDNA refuses
            flight.result = socket.gaierror(socket.EAI_NONAME, f"{key[0]!r}: {exc}")
        finally:  # also when cancelled (trio.run ending): the callers then time out
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()
        ttl = NEGATIVE_TTL if isinstance(flight.result, OSError) else POSITIVE_TTL
        self._cache[key] = (self._clock() + ttl, flight.result)

    def forget(self) -> None:
        """Drop every cached answer (on reload: names may now mean something else)."""
        self._cache.clear()
        self._numeric.clear()
