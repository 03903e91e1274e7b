"""bpfproxy's upgrade hand-over: its BPF descriptors by name, and a Dispatcher rebuilt from them.

On SIGUSR2 the old process (unprivileged by then) sends, besides its one
listening socket (tcpproxy.upgrade), the descriptors named here: the
sk_lookup and hold programs, every map, the netns link and, if the state is
pinned, the instance's locked directory. The new process needs no compile,
no capability and no bpffs access: descriptors it holds are enough to use
the program and maps (map updates need no capability on a descriptor one
holds), and the directory's flock is on the open file both share, so the
lock check of rule 1 in bpfproxy.pinning holds across the hand-over.

Rules:
1. What the old process sends stays valid in it until it exits; it stops
   touching the maps and the sockmap once the new one said "ready".
2. The new process puts the same listening socket in the sockmap (a no-op:
   it is already there), so the accept queue survives, and diffs the port
   map against what the map holds, not against what it was told.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING

from .loader import MAPS, Program

if TYPE_CHECKING:
    from .dispatcher import Dispatcher
    from .pinning import Instance

__all__ = ["adopt", "state_fds"]

PROG = "bpf.prog"
HOLD = "bpf.hold"
LINK = "bpf.link"
LOCK = "bpf.instance"
_MAP = "bpf.map."


def state_fds(dispatcher: Dispatcher, pins: Instance | None) -> dict[str, int]:
    """The descriptors to hand over, by name (still the caller's)."""
    program = dispatcher.program
    fds = {PROG: program.prog_fd, HOLD: program.hold_fd, LINK: dispatcher.link_fd}
    for name, fd in program.maps.items():
        fds[_MAP + name.decode()] = fd
    if pins is not None and pins.lock_fd >= 0:
        fds[LOCK] = pins.lock_fd
    return fds


def adopt(
    fds: dict[str, int], listener: socket.socket, bpffs: str, name: str
) -> tuple[Instance | None, Dispatcher]:
    """The instance (None: the old one ran unpinned) and a Dispatcher steering to
    ``listener``, from the descriptors an upgrade handed over. Takes ownership of
    every descriptor in ``fds`` (closed on failure too).

    Raises SteeringError if a descriptor is missing or the kernel refuses one.
    """
    from .dispatcher import Dispatcher
    from .errors import SteeringError
    from .pinning import Instance

    taken = dict(fds)
    try:
        wanted = [PROG, HOLD, LINK, *(_MAP + map_name.decode() for map_name in MAPS)]
        missing = [key for key in wanted if key not in taken]
        if missing:
            raise SteeringError(f"upgrade: the old process did not send {', '.join(missing)}")
        pins = Instance.adopt(bpffs, name, taken.pop(LOCK)) if LOCK in taken else None
        program = Program(
            taken.pop(PROG),
            taken.pop(HOLD),
            {map_name: taken.pop(_MAP + map_name.decode()) for map_name in MAPS},
        )
        link_fd = taken.pop(LINK)
    except BaseException:
        for fd in taken.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    try:
        dispatcher = Dispatcher(listener, program=program, link_fd=link_fd)
    except BaseException:
        if pins is not None:
            pins.close()
        raise
    return pins, dispatcher
