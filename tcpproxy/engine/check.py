"""The engine's self-check: no connection may wait for nothing.

Reads, never changes: the epoll set as the kernel has it (/proc/self/fdinfo
of the epoll descriptor), the descriptor table, the timer heap, the
listeners and the connections. O(connections), so only run with
TCPPROXY_ENGINE_CHECKS=1 (between the loop's rounds: tests, soak) or from a
test. Errors: none raised; the problems found are returned as text (out of
descriptors to read fdinfo with: nothing found, look next round).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from tcpproxy.engine.accept import Acceptor
from tcpproxy.engine.conn import Conn
from tcpproxy.engine.loop import IN, OUT, Loop
from tcpproxy.engine.timers import BACKOFF, IDLE, PHASE
from tcpproxy.flow import S_CONNECTING, S_FIRST_BYTE, S_HEADER_IN, S_HEADER_OUT, S_RELAY
from tcpproxy.listeners import ACCEPT_CAPACITY_ERRNOS

__all__ = ["check", "epoll_interest"]

Handler = Callable[[Any, int], None]


def check(
    loop: Loop,
    acceptor: Acceptor,
    conns: Iterable[Conn],
    on_client: Handler,
    on_target: Handler,
    on_attempt: Handler,
) -> list[str]:
    """What is wrong with the engine's bookkeeping (empty: nothing).

    Each live connection must be watched in epoll for what its state waits for
    (under its own descriptor, not a closed one's number), and its state's
    timer must be pending; each listener is watched, or paused, or backing off.
    """
    try:
        registered = epoll_interest(loop.epoll.fileno())
    except OSError as exc:  # out of descriptors itself: look next round
        return [] if exc.errno in ACCEPT_CAPACITY_ERRNOS else [f"fdinfo: {exc}"]
    problems: list[str] = []
    timers = {(id(t[3]), t[4]) for t in loop.timers.heap if t[3].gen == t[2]}
    owned: set[int] = set()
    fds = loop.fds

    def watched(fd: int, mask: int, handler: Handler, obj: Any) -> str:
        owned.add(fd)
        entry = fds.get(fd)
        if entry is None or entry[0] != handler or entry[1] is not obj:
            return f"fd {fd} is not mapped to its handler"
        got = registered.get(fd)
        if mask and got is None:
            return f"fd {fd} not in epoll, want {mask:#x}"
        if got is not None and got[1] != os.fstat(fd).st_ino:
            return f"fd {fd} in epoll under another (closed) file"
        if got is not None and got[0] & (IN | OUT) != mask:
            return f"fd {fd} in epoll with {got[0]:#x}, want {mask:#x}"
        return ""

    for lst in acceptor.listeners.values():
        why = watched(lst.fd, IN if lst.registered else 0, acceptor.accept, lst)
        if why:
            problems.append(f"listener {lst.port}: {why}")
        if (
            not lst.registered
            and not acceptor.paused
            and not (lst.backoff_pending and (id(lst), BACKOFF) in timers)
        ):
            problems.append(f"listener {lst.port}: off, neither paused nor backing off")
    for conn in conns:
        state = conn.flow.state
        whys = [watched(conn.cfd, conn.cmask, on_client, conn)]
        if conn.target is not None:
            whys.append(watched(conn.tfd, conn.tmask, on_target, conn))
        for sock in conn.attempts:
            fd = sock.fileno()
            entry = fds.get(fd)
            if entry is None or entry[0] != on_attempt or entry[1] != (conn, sock):
                whys.append(f"attempt fd {fd} is not mapped to it")
            owned.add(fd)
            if (got := registered.get(fd)) is None or got[0] & (IN | OUT) != OUT:
                whys.append(f"attempt fd {fd} not waiting for its answer")
        phase = (id(conn), PHASE) in timers
        if state is S_RELAY:
            up, down = conn.up, conn.down
            if up is None or down is None:
                whys.append("relaying without directions")
            else:
                want_c = (0 if up.done or up.blocked else IN) | (OUT if down.blocked else 0)
                want_t = (0 if down.done or down.blocked else IN) | (OUT if up.blocked else 0)
                if (conn.cmask, conn.tmask) != (want_c, want_t):
                    whys.append(f"interest {conn.cmask:#x}/{conn.tmask:#x}, "
                                f"the directions want {want_c:#x}/{want_t:#x}")  # fmt: skip
            if not conn.cmask and not conn.tmask:
                whys.append("relaying, watching neither socket")
            if (id(conn), IDLE) not in timers:
                whys.append("relaying without an idle timer")
        elif state is S_HEADER_IN or state is S_FIRST_BYTE:
            if not conn.cmask & IN or not phase:
                whys.append("not waiting for the client, or without its timer")
        elif state is S_CONNECTING:
            if not phase:
                whys.append("connecting without a connect timer")
        elif state is S_HEADER_OUT:
            if not conn.tmask & OUT or not phase:
                whys.append("not waiting to send the header, or without its timer")
        else:
            whys.append("a live connection in a state it never waits in")
        problems.extend(f"conn {conn.cid} ({state.value}): {why}" for why in whys if why)
    for fd in registered.keys() - owned:
        problems.append(f"fd {fd} in epoll, owned by no listener or connection")
    return problems


def epoll_interest(epfd: int) -> dict[int, tuple[int, int]]:
    """The descriptors in an epoll set: fd -> (events, inode of the file registered)."""
    interest: dict[int, tuple[int, int]] = {}
    with open(f"/proc/self/fdinfo/{epfd}") as info:
        for line in info:
            # tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x
            if line.startswith("tfd:"):
                f = line.split()
                interest[int(f[1])] = (int(f[3], 16), int(f[7].removeprefix("ino:"), 16))
    return interest
