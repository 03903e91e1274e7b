"""Target choice: which of an app's targets a new connection tries, in order.

Pure logic, no I/O: a `Balancer` turns a strategy and the current load into a
try order. The first target is the choice; the rest are the failover order
when it cannot be connected, so every target is tried at most once.

Rules:
1. round-robin: a rotating start; the order after it is the config order.
2. random: a uniformly random start, then the config order (so failover does
   not pile onto one neighbour more than round-robin would).
3. least-connections: fewest active connections first, ties broken by the
   round-robin rotation so equal targets still share the load. A connection
   counts from the moment its target is chosen (admission.Ticket.claim), not
   once connected: a burst of clients all still connecting spreads over the
   targets instead of all seeing the same counts and picking the same one.
4. Targets marked down (by health state) go to the end, in the same relative
   order: they are still tried when nothing else works (fail open).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from tcpproxy.config import Strategy, Target

__all__ = ["Balancer"]


def _never_down(target: Target) -> bool:
    return False


class Balancer:
    """Try order for one app's targets.

    Args:
      targets: the app's targets, in config order (non-empty).
      strategy: how to pick the first target.
      active: live count of open connections per target, owned by the caller
        and shared across reloads (least-connections reads it; others ignore it).
      rng: source of randomness, injectable for tests.
    """

    __slots__ = ("_active", "_next", "_rng", "strategy", "targets")

    def __init__(
        self,
        targets: Sequence[Target],
        strategy: Strategy = Strategy.ROUND_ROBIN,
        *,
        active: Mapping[Target, int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not targets:
            raise ValueError("a balancer needs at least one target")
        self.targets: tuple[Target, ...] = tuple(targets)
        self.strategy = strategy
        self._active: Mapping[Target, int] = active if active is not None else {}
        self._rng = rng or random.Random()
        self._next = 0

    def order(self, is_down: Callable[[Target], bool] = _never_down) -> list[Target]:
        """Return every target once, the chosen one first."""
        targets = self.targets
        n = len(targets)
        if n == 1:  # every rule gives the one target (the common case: no work per connection)
            return [targets[0]]
        if self.strategy is Strategy.RANDOM:
            start = self._rng.randrange(n)
        else:
            start = self._next
            self._next = (start + 1) % n
        rotated = list(targets[start:] + targets[:start])
        if self.strategy is Strategy.LEAST_CONNECTIONS:
            active = self._active
            rotated.sort(key=lambda t: active.get(t, 0))  # stable: ties keep the rotation
        up = [t for t in rotated if not is_down(t)]
        if len(up) == n:
            return rotated
        return up + [t for t in rotated if is_down(t)]
