"""The engine's loop: the epoll set, its descriptor table, the clock, the bridge to trio.

Owns the private level-triggered epoll object (closed with the process), the
table fd -> (handler, obj) that dispatches its events, the timer heap, the
clock read once per round (`now`) and the nursery of the engine's helper
tasks (DNS lookups). It knows nothing of connections: `run` is given what
to call for a due timer, after each round, and for a handler that raised.

Beside trio: `run` is one trio task. When nothing is ready it awaits
`wait_readable(epoll fd)` bounded by the next timer; while events keep
coming it polls again without going through trio's scheduler, and yields
every ROUNDS_BEFORE_YIELD rounds so the control plane (reloads, probes,
metrics, signals) still runs. A helper task that changes something outside
the loop's turn calls `wake()`.

Resources: registering and unregistering a descriptor is its owner's (through
`watch`); the table holds references only while the owner keeps them there.
Errors: a handler or timer that raises costs its object (`on_error`), never
the loop; leaving `run` (drained, or cancelled) cancels the helper tasks.
"""

from __future__ import annotations

import gc
import logging
import select
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from tcpproxy.engine.timers import Timers

__all__ = ["HUP_BITS", "IN", "IN_BITS", "OUT", "OUT_BITS", "RDHUP", "Loop"]

log = logging.getLogger("tcpproxy")

MAX_EVENTS: Final = 256  # events taken per epoll_wait
ROUNDS_BEFORE_YIELD: Final = 8  # busy rounds (events every time) before trio's other tasks run

IN: Final = int(select.EPOLLIN)
OUT: Final = int(select.EPOLLOUT)
IN_BITS: Final = int(select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR)  # a read will tell
OUT_BITS: Final = int(select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR)  # a write will tell
RDHUP: Final = int(select.EPOLLRDHUP)  # the peer shut down its side (asked for while peeking)
HUP_BITS: Final = int(select.EPOLLHUP | select.EPOLLERR)  # no more bytes will come

Handler = Callable[[Any, int], None]


class Loop:
    """One epoll set and its dispatch, driven from a trio task (`run`).

    Args:
      conns: the live connections: the loop ends once drained and none is left.
      live: whether a timer's object is still served (for the heap's sweep).
    """

    def __init__(self, conns: set[Any], live: Callable[[Any], bool]) -> None:
        self.epoll = select.epoll()
        self.fds: dict[int, tuple[Handler, Any]] = {}
        self.timers = Timers(conns, live)
        self.now = time.monotonic()
        self.debug = log.isEnabledFor(logging.DEBUG)  # read once per round
        self.draining = False
        self.tasks: trio.Nursery | None = None  # while running: the helper tasks' nursery
        self._conns = conns
        self._wake: trio.CancelScope | None = None

    def watch(self, fd: int, old: int, new: int) -> None:
        """Change one descriptor's epoll interest from `old` to `new` (0: not registered)."""
        if not new:
            self.epoll.unregister(fd)
        elif not old:
            self.epoll.register(fd, new)
        else:
            self.epoll.modify(fd, new)

    def at(self, when: float, obj: Any, kind: int) -> None:
        """Arm a timer (timers.Timers.at)."""
        self.timers.at(when, obj, kind)
        # Armed outside the loop's turn (a lookup task) while it sleeps for longer:
        # wake it, or this timer would wait for whatever was due first.
        wake = self._wake
        if wake is not None and when < wake.deadline:
            wake.cancel()

    def wake(self) -> None:
        """Something changed outside the loop's turn: look again now, not after the sleep."""
        if self._wake is not None:
            self._wake.cancel()

    def drain(self) -> None:
        """End `run` once no connection is left."""
        self.draining = True
        self.wake()

    async def run(
        self,
        on_timer: Callable[[Any, int], None],
        after_round: Callable[[], None],
        on_error: Callable[[Any], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Dispatch events and due timers until drained and empty (or cancelled).

        `after_round` runs after every round (resume listeners, self-check);
        `on_error(obj)` is told of a handler or timer of `obj` that raised.
        """
        poll, fds = self.epoll.poll, self.fds
        epoll_fd = self.epoll.fileno()
        timers = self.timers
        conns = self._conns
        monotonic = time.monotonic
        is_debug = log.isEnabledFor
        # Every connection allocates a few dozen objects, and the idle timers keep ended
        # ones until the heap is swept, so they live long enough to reach the oldest
        # generation: its collections would walk every object of the process (modules,
        # trio, config) again and again. What exists before serving is never garbage.
        gc.freeze()
        try:
            async with trio.open_nursery() as self.tasks:
                task_status.started()
                busy = 0
                while not (self.draining and not conns):
                    events = poll(0, MAX_EVENTS)
                    self.now = now = monotonic()
                    self.debug = is_debug(logging.DEBUG)
                    for fd, ev in events:
                        entry = fds.get(fd)
                        if entry is not None:
                            handler, obj = entry
                            try:
                                handler(obj, ev)
                            except Exception:  # a bug must cost one connection, not the proxy
                                on_error(obj)
                    if timers.heap and timers.heap[0][0] <= now:
                        while (due := timers.pop_due(now)) is not None:
                            try:
                                on_timer(due[0], due[1])
                            except Exception:
                                on_error(due[0])
                    after_round()
                    if events:
                        busy += 1
                        if busy < ROUNDS_BEFORE_YIELD:
                            continue
                        busy = 0
                        await trio.lowlevel.checkpoint()
                        continue
                    busy = 0
                    delay = timers.next_due() - now
                    with trio.move_on_after(max(delay, 0.0)) as self._wake:
                        await trio.lowlevel.wait_readable(epoll_fd)
                    self._wake = None
                self.tasks.cancel_scope.cancel()
        finally:
            self.tasks = None
            self._wake = None
