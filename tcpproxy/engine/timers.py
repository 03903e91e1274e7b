"""The engine's timer heap: when each connection's and listener's next timeout is due.

Owns the heap of (when, seq, gen, obj, kind) entries and nothing else: the
objects it points at are their owners'. Timers are never removed when their
reason goes away; an entry is stale when its object's `gen` moved on since it
was armed (the object's phase changed), and `pop_due` skips it. So that ended
connections are not kept alive by entries due an hour later, the heap is
swept (`compact`) when it outgrows the live connections, keeping only the
entries whose object `live` says is still served: amortized O(1) per timer.

Errors: none of its own; what a due timer does is the caller's.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Final

__all__ = ["BACKOFF", "IDLE", "PHASE", "STAGGER", "Timers"]

# kinds of timer (plain ints: compiled, they are C constants)
PHASE: Final = 0  # the flow state's timeout: PROXY header, first byte, connect, header out
STAGGER: Final = 1  # happy eyeballs: start the next address of the target
IDLE: Final = 2  # a relaying connection quiet for its IdleTimeout (re-armed lazily)
BACKOFF: Final = 3  # a listener off after an out-of-resources accept

TIMER_SLACK: Final = 2  # the heap may hold this many entries per live connection...
TIMER_FLOOR: Final = 1024  # ...plus this many, before stale ones are swept out


class Timers:
    """A heap of timers over objects with a `gen` (generation) attribute.

    Args:
      conns: the live connections (their number bounds the heap, see `compact`).
      live: whether an object (a connection or a listener) is still served.
    """

    def __init__(self, conns: set[Any], live: Callable[[Any], bool]) -> None:
        self.heap: list[tuple[float, int, int, Any, int]] = []
        self._seq = 0
        self._conns = conns
        self._live = live

    def at(self, when: float, obj: Any, kind: int) -> None:
        """Arm a timer of `kind` for `obj`, valid while `obj.gen` stays as it is now."""
        if len(self.heap) > TIMER_SLACK * len(self._conns) + TIMER_FLOOR:
            self.compact()
        self._seq += 1
        heapq.heappush(self.heap, (when, self._seq, obj.gen, obj, kind))

    def compact(self) -> None:
        """Drop stale entries (past phases, objects no longer served) from the heap."""
        live = self._live
        self.heap = [t for t in self.heap if t[3].gen == t[2] and live(t[3])]
        heapq.heapify(self.heap)

    def next_due(self) -> float:
        """When the earliest entry is due (stale or not); infinity if none."""
        heap = self.heap
        return heap[0][0] if heap else math.inf

    def pop_due(self, now: float) -> tuple[Any, int] | None:
        """The next timer due by `now` that is not stale, as (obj, kind); None if none."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, gen, obj, kind = heapq.heappop(heap)
            if obj.gen == gen:
                return obj, kind
        return None
