"""What differs between the binaries' workers: the `Plan` a supervisor follows.

tcpproxy's plan (`TcpPlan`, tcpproxy/port_plan.py) has every worker bind
every port with SO_REUSEPORT; bpfproxy's (`BpfPlan`, bpfproxy/plan.py)
hands each worker a member of one reuseport group and keeps the BPF side
in the supervisor.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Protocol

from tcpproxy.config import Config

__all__ = ["Plan"]


class Plan(Protocol):
    """What differs between the binaries' workers."""

    name: str
    # An upgrade takes each worker's own listeners (asked over its socket pair):
    # tcpproxy's workers bind their own; bpfproxy's supervisor holds copies of its.
    worker_listeners: bool

    def check(self, old: Config, new: Config) -> None:
        """Raise StartupError if `new` cannot be served (before any worker sees it)."""

    def upgrade_fds(self, listeners: Mapping[int, Mapping[int, socket.socket]]) -> dict[str, int]:
        """Descriptors by name an upgrade hands the new supervisor: duplicates, which
        the caller closes once handed (a worker that dies meanwhile closes nothing
        under it). `listeners`: each live worker's listening sockets by port, when
        `worker_listeners` (still the caller's)."""

    def upgraded(self, succeeded: bool, config: Config) -> None:
        """An upgrade ended: True, the new supervisor serves and owns what was handed
        over (bpfproxy: leave the maps alone); False, it failed and `config` runs
        here still (bpfproxy: the new one may have diffed the port map)."""

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], Sequence[int]]:
        """The command line of worker `index`, and the descriptors it inherits."""

    def worker_started(self, index: int) -> None:
        """After worker `index` started."""

    def worker_died(self, index: int) -> None:
        """Worker `index` exited on its own (bpfproxy: steer to a live listener)."""

    def before_workers(self, old: Config, new: Config) -> None:
        """A reload's first step (bpfproxy: stop steering removed ports)."""

    def after_workers(self, old: Config, new: Config) -> None:
        """A reload's last step (bpfproxy: steer added ports)."""

    def restore(self, config: Config) -> None:
        """Undo a reload's steps: serve `config` again (bpfproxy: its ports)."""

    def stopping(self) -> None:
        """Stop accepting for good (bpfproxy: close the supervisor's listener copies)."""

    def stored(self) -> dict[str, int]:
        """The listeners to keep in the service manager's store (tcpproxy.fdstore), by
        name (bpfproxy: its group's; tcpproxy: none, its workers hold their own)."""
