"""Target health as data: what connection outcomes and probes say about a target.

Pure logic, no I/O and no clock of its own (callers pass `now`), so every
transition is unit-tested without sockets or sleeping.

Rules:
1. A target starts up. Health is per target address, shared by every app
   that uses it (one dead host is dead for all of them).
2. Passive: a failed connect (refused, unresolvable, no answer) takes an up
   target down at once. While down, a background probe retries it after a
   back-off (BACKOFF_INITIAL, doubling on each failed probe up to
   BACKOFF_MAX), so a dead target costs clients one connect timeout, not one
   per connection, and a revived one is used again within BACKOFF_MAX.
3. Any success (a client's connect or a probe) brings a down target up and
   resets its back-off; with active checks, a probe needs `rise`
   consecutive successes.
4. Active (HealthCheck configured): `fall` consecutive probe failures take
   an up target down; `rise` consecutive successes bring it up.
5. Down targets are still tried, last, when no target is up (fail open:
   the balancer's rule 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from tcpproxy.config import Target

__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "HealthBook", "TargetHealth"]

BACKOFF_INITIAL = 1.0  # seconds before the first re-probe of a target that just failed
BACKOFF_MAX = 8.0  # seconds at most between re-probes: "back within seconds"


@dataclass(slots=True)
class TargetHealth:
    down: bool = False
    reason: str = ""  # why it went down, for logs and status
    backoff: float = BACKOFF_INITIAL
    retry_at: float = 0.0  # when a down target is next probed (passive recovery)
    successes: int = 0  # consecutive probe successes
    failures: int = 0  # consecutive probe failures


class HealthBook:
    """The health of every target; methods return a log message when state changes."""

    def __init__(self) -> None:
        self._targets: dict[Target, TargetHealth] = {}
        # the targets down now: while none is, a connection's questions (is_down per
        # target, connect_ok) are answered without hashing a target
        self._down_now: set[Target] = set()

    def get(self, target: Target) -> TargetHealth:
        health = self._targets.get(target)
        if health is None:
            health = self._targets[target] = TargetHealth()
        return health

    def is_down(self, target: Target) -> bool:
        return bool(self._down_now) and target in self._down_now

    def down_targets(self) -> list[Target]:
        return [t for t, h in self._targets.items() if h.down]

    def connect_ok(self, target: Target) -> str | None:
        if not self._down_now or target not in self._down_now:
            return None
        return self._up(target, self._targets[target], "a connection succeeded")

    def connect_failed(self, target: Target, why: str, now: float) -> str | None:
        health = self.get(target)
        if health.down:
            return None
        return self._down(target, health, why, now)

    def probe_result(
        self, target: Target, ok: bool, now: float, *, why: str = "", rise: int = 1, fall: int = 1
    ) -> str | None:
        """Record a probe. Passive recovery probes use rise=fall=1."""
        health = self.get(target)
        if ok:
            health.successes += 1
            health.failures = 0
            if health.down and health.successes >= rise:
                return self._up(target, health, f"{health.successes} probe(s) succeeded")
            return None
        health.failures += 1
        health.successes = 0
        if health.down:
            health.backoff = min(health.backoff * 2, BACKOFF_MAX)
            health.retry_at = now + health.backoff
            return None
        if health.failures >= fall:
            return self._down(target, health, why, now)
        return None

    def retain(self, targets: set[Target]) -> None:
        """Forget targets no longer in the config (bounded state across reloads)."""
        for target in list(self._targets):
            if target not in targets:
                del self._targets[target]
                self._down_now.discard(target)

    def _down(self, target: Target, health: TargetHealth, why: str, now: float) -> str:
        health.down = True
        self._down_now.add(target)
        health.reason = why
        health.backoff = BACKOFF_INITIAL
        health.retry_at = now + BACKOFF_INITIAL
        health.successes = 0
        return f"target {target} is down: {why}"

    def _up(self, target: Target, health: TargetHealth, why: str) -> str:
        health.down = False
        self._down_now.discard(target)
        health.reason = ""
        health.backoff = BACKOFF_INITIAL
        health.failures = 0
        return f"target {target} is up again: {why}"
