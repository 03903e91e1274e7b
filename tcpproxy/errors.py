"""The error hierarchy: ours (configuration, startup) versus theirs (peers, targets).

`ConfigError` lives in `tcpproxy.config` with the code that raises it; it is
re-exported here so callers find every error type in one place.
"""

from __future__ import annotations

from tcpproxy.config import ConfigError

__all__ = ["ConfigError", "ProxyError", "ResourceExhausted", "StartupError", "TargetUnavailable"]


class ProxyError(Exception):
    """Base of the proxy's own errors."""


class StartupError(ProxyError):
    """Ours: the proxy cannot start as configured (a port cannot be bound, ...).

    The message names the problem and its location; the CLI prints it and exits 2.
    `app`: the app it is about, when one is (a fleet node sets that app aside).
    """

    def __init__(self, message: str, *, app: str | None = None) -> None:
        super().__init__(message)
        self.app = app


class TargetUnavailable(ProxyError):
    """Theirs: no target of an app could be connected; `failures` says why for each."""

    def __init__(self, app: str, failures: list[tuple[str, str]]) -> None:
        self.app = app
        self.failures = failures
        detail = "; ".join(f"{target}: {why}" for target, why in failures)
        super().__init__(f"app {app!r}: no target could be connected ({detail})")


class ResourceExhausted(ProxyError):
    """Ours, transient: out of descriptors or memory for this connection."""
