"""The one error of bpfproxy's BPF side: this machine cannot steer, and what to do about it.

Both the loader (checks, compile, load) and the dispatcher (maps, link) raise
it; it lives apart so that callers catch it without importing either.
"""

from __future__ import annotations

__all__ = ["SteeringError"]


class SteeringError(Exception):
    """bpfproxy cannot steer on this machine; the message says what to do (one or two lines,
    no traceback needed)."""
