"""Warnings a client can trigger, logged at most once per interval per kind.

Every warning a client can cause (a refused connection, a bad PROXY header,
a silent client, no target) goes through one `WarnLimiter`, so 2000 bad
clients cost a few lines, not 2000. Admission and the engine share one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LIMIT_LOG_INTERVAL", "WarnLimiter"]

log = logging.getLogger("tcpproxy")

LIMIT_LOG_INTERVAL = 10.0  # seconds between warnings of one kind (per app) a client can trigger
LIMIT_LOG_KEYS = 1024  # kinds of warning remembered at once; stale ones are then forgotten


class WarnLimiter:
    """Logs a warning at most once per `interval` per key, and says how many it held back.

    The key is the kind of warning and its app (never a client address: that
    would let clients choose the keys).
    """

    def __init__(
        self, interval: float = LIMIT_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed since)

    def __call__(
        self, key: str, message: str, *args: object, extra: dict[str, Any] | None = None
    ) -> bool:
        """Log `message % args` unless `key` was logged within the interval; True if logged.

        `extra` is the log record's structured fields (a connection's id).
        """
        now = self._clock()
        last, suppressed = self._seen.get(key, (-math.inf, 0))
        if now - last < self._interval:
            self._seen[key] = (last, suppressed + 1)
            return False
        if len(self._seen) >= LIMIT_LOG_KEYS:  # bounded: forget the kinds gone quiet
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
        self._seen[key] = (now, 0)
        if suppressed:
            message += " (%d more like this in the last %.0f s not logged)"
            args = (*args, suppressed, now - last)
        log.warning(message, *args, extra=extra)
        return True
