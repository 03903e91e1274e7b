"""The service manager's file descriptor store: listeners kept there, and taken back at start.

systemd keeps the descriptors a service sends it (sd_notify's ``FDSTORE=1``
with ``FDNAME=``, the descriptors in SCM_RIGHTS) until the service is stopped
for good, and hands them back when it starts the service again: descriptors
from 3 on, ``$LISTEN_FDS`` of them, named by ``$LISTEN_FDNAMES``, for the
pid in ``$LISTEN_PID`` (sd_listen_fds(3)). A listening socket kept there
outlives the process: after a crash (SIGKILL, an OOM kill) it stays open,
its accept queue keeps what clients send meanwhile, and the restarted
process accepts it all. Only connections the dead process had accepted are
lost.

Rules:
1. Stored only when the manager asks for it: ``$FDSTORE`` (the unit's
   ``FileDescriptorStoreMax=``, set by systemd 254 and later; the units set
   it themselves for older ones) is a positive number, and ``$NOTIFY_SOCKET``
   is set. At most that many names are stored; a warning names the rest.
2. What is stored is what serves: `sync` makes the store hold exactly the
   listeners `wanted` names, each sent once for its socket's life (a manager
   keeps every descriptor it is sent) and removed (``FDSTOREREMOVE=1``) when
   it closes for good (a port a reload dropped). `sync` runs from the moment
   the process serves (READY=1), never before: a process that fails to start
   stores nothing.
3. A clean stop empties the store (`clear`) before the listeners close: kept
   there, they would queue connections nobody accepts until the manager
   closes them. An upgrade does not: the new process serves on the same
   sockets and is told which names are stored (`stored`); from then on this
   process leaves the store alone (`hand_over`).
4. At start (`take`), what the manager handed back is checked against what
   is wanted: a descriptor of another name, a duplicate name, or a socket
   other than the name says (not a listening TCP socket, another address or
   port) is removed from the store at once, and closed; a listener among
   them is shut down first (shutdown(2) acts on the socket, not on one
   descriptor), so that its port can be bound now, without waiting for the
   manager to close its copy. No live process of ours accepts on what is
   handed back: the one that stored it is dead (its workers, if any, stop
   accepting as soon as their supervisor is gone).
5. The ``$LISTEN_*`` variables are removed from the environment at once,
   so that workers and an upgrade's new process do not take them for theirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass

from tcpproxy.notify import Notifier

__all__ = [
    "FDNAME_MAX",
    "LISTEN_FDS_START",
    "FdStore",
    "Wanted",
    "check_listener",
    "fdname_is_valid",
    "listen_fds",
    "store_limit",
]

log = logging.getLogger("tcpproxy")

LISTEN_FDS_START = 3  # the first descriptor a manager hands over (SD_LISTEN_FDS_START)
FDNAME_MAX = 255  # characters in a name (systemd's FDNAME_MAX)
LEFT_OUT_NAMED = 5  # listeners named in the warning that some are not kept
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


def fdname_is_valid(name: str) -> bool:
    """A name systemd accepts: printable ASCII but ':' ($LISTEN_FDNAMES' separator),
    at most FDNAME_MAX characters."""
    return (
        0 < len(name) <= FDNAME_MAX and all(" " <= char <= "~" for char in name) and ":" not in name
    )


def store_limit(environ: Mapping[str, str]) -> int:
    """How many descriptors the manager keeps for us (rule 1): 0 for none."""
    if not environ.get("NOTIFY_SOCKET"):
        return 0
    value = environ.get("FDSTORE", "")
    return int(value) if value.isdigit() else 0


def listen_fds(environ: MutableMapping[str, str], pid: int) -> list[tuple[str, int]]:
    """The descriptors the manager handed this process, as (name, fd), in order.

    Empty unless ``$LISTEN_PID`` is ``pid``. Removes the ``$LISTEN_*`` variables
    from ``environ`` (rule 5) and makes the descriptors close-on-exec. A missing
    or short ``$LISTEN_FDNAMES`` names the rest "unknown", as sd_listen_fds does.
    """
    values = {key: environ.pop(key, None) for key in _LISTEN_VARIABLES}
    count = values["LISTEN_FDS"] or ""
    if values["LISTEN_PID"] != str(pid) or not count.isdigit():
        return []
    names = (values["LISTEN_FDNAMES"] or "").split(":") if values["LISTEN_FDNAMES"] else []
    received = []
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:  # not open: the manager's count is wrong
            continue
        received.append((names[index] if index < len(names) else "unknown", fd))
    return received


def check_listener(
    sock: socket.socket, host: str | None, port: int, *, reuse_port: bool
) -> str | None:
    """Why `sock` is not the listener `tcpproxy.listeners.open_listener(host, port,
    reuse_port=...)` makes (None: it is): a listening TCP socket on that port and
    address (`host` None: every address, dual-stack ``::`` or ``0.0.0.0``)."""
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return "not an IP socket"
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        protocol = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        if kind != socket.SOCK_STREAM or protocol != socket.IPPROTO_TCP:
            return "not a TCP socket"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
        address, bound = sock.getsockname()[:2]
        if bound != port:
            return f"bound to port {bound}, not {port}"
        if bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) != reuse_port:
            return "SO_REUSEPORT is " + ("off" if reuse_port else "on")
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if host is None or host in ("", "*"):
            dual = sock.family == socket.AF_INET6 and not sock.getsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
            )
            if not ip.is_unspecified or (sock.family == socket.AF_INET6 and not dual):
                return f"bound to {address}, not every address"
        elif ip != ipaddress.ip_address(host.strip("[]")):
            return f"bound to {address}, not {host}"
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Wanted:
    """A listener wanted back from the store: where `open_listener` would bind it."""

    host: str | None
    port: int
    reuse_port: bool = False


class FdStore:
    """What this process keeps in the manager's store, by name.

    Resource handling: the descriptors handed back at start are ours until
    `take` (which returns the wanted ones as sockets, the caller's, and closes
    the rest); the store itself holds duplicates, made by the kernel when a
    message carries them.

    Error handling: a message that cannot be sent is logged once (the
    Notifier's warning) and tried again at the next `sync`.
    """

    def __init__(
        self,
        notifier: Notifier,
        limit: int,
        *,
        received: Iterable[tuple[str, int]] = (),
        stored: Iterable[str] = (),
    ) -> None:
        """`limit`: how many names the manager keeps (0: none, rule 1).
        `received`: (name, fd) handed back at start (`listen_fds`): in the store.
        `stored`: names an upgrade's old process stored (their sockets were handed
        over with the listeners)."""
        self._notifier = notifier
        self.limit = limit
        self._received: list[tuple[str, int]] = list(received)
        self._stored: set[str] = set(stored)  # in the store, each the socket we serve on
        self._stale: set[str] = set()  # in the store, to remove (rule 4)
        self._serving = False  # sync does something (rule 2)
        self._wanted: Callable[[], Mapping[str, int]] = dict
        self._left_out: frozenset[str] = frozenset()  # over the limit, said once

    @classmethod
    def at_start(cls, notifier: Notifier, stored: Iterable[str] | None) -> FdStore:
        """From the environment: the limit and what was handed back; `stored`: the
        names an upgrade's old process says it stored (None: a normal start)."""
        received = listen_fds(os.environ, os.getpid())  # (none for an upgrade's process)
        limit = store_limit(os.environ) if notifier.enabled else 0
        store = cls(notifier, limit, received=received, stored=stored or ())
        if received:
            log.info("the service manager handed back %d descriptors: %s", len(received),
                     ", ".join(name for name, _ in received))  # fmt: skip
        return store

    @property
    def stored(self) -> list[str]:
        """The names in the store now, for an upgrade's new process."""
        return sorted(self._stored)

    def keep(self, wanted: Callable[[], Mapping[str, int]]) -> None:
        """What `sync` keeps in the store: name -> descriptor (still the caller's)."""
        self._wanted = wanted

    def take(self, wanted: Mapping[str, Wanted]) -> dict[str, socket.socket]:
        """The listeners handed back that are `wanted` (rule 4): name -> socket (the
        caller's, non-blocking). Everything else handed back is closed and removed
        from the store now; a listener among them is shut down first, so that its
        port is free at once, whenever the manager closes its copy."""
        taken: dict[str, socket.socket] = {}
        received, self._received = self._received, []
        for name, fd in received:
            why = None
            if name not in wanted:
                why = "not wanted here"
            elif name in taken:  # another socket (a manager keeps one open file once)
                why = "a second descriptor of that name"
                self._stored.discard(name)  # every copy is removed; sync stores ours again
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.close(fd)
                why = why or f"not a socket ({exc.strerror})"
            else:
                if why is None:
                    want = wanted[name]
                    why = check_listener(sock, want.host, want.port, reuse_port=want.reuse_port)
                    if why is None:
                        sock.setblocking(False)
                        taken[name] = sock
                        self._stored.add(name)
                        continue
                _shut(sock)
            log.info("stored descriptor %s: %s: closed and removed from the store", name, why)
            self._stale.add(name)
        for name in sorted(self._stale):
            self._remove(name)
        return taken

    def serve(self) -> None:
        """This process serves (READY=1 was sent): keep the store in step from now on."""
        self._serving = True
        self.sync()

    def sync(self) -> None:
        """Make the store hold exactly what `keep`'s function names (rule 2)."""
        if not self._serving:
            return
        wanted = self._wanted()
        for name in sorted(self._stale | (self._stored - wanted.keys())):
            self._remove(name)
        left_out = []
        for name, fd in wanted.items():
            if name in self._stored:
                continue
            if not fdname_is_valid(name):
                raise ValueError(f"not a name the service manager takes: {name!r}")
            if len(self._stored) >= self.limit:
                left_out.append(name)
            elif self._notifier.send("FDSTORE=1", f"FDNAME={name}", fds=[fd]):
                self._stored.add(name)
        if left_out and self.limit and frozenset(left_out) != self._left_out:
            more = ", ..." if len(left_out) > LEFT_OUT_NAMED else ""
            named = ", ".join(left_out[:LEFT_OUT_NAMED]) + more
            log.warning(
                "the service manager keeps %d descriptors ($FDSTORE): %d listeners are not "
                "kept (%s): a crash resets what they queue; raise FileDescriptorStoreMax=",
                self.limit, len(left_out), named,
            )  # fmt: skip
        self._left_out = frozenset(left_out)

    def clear(self) -> None:
        """A clean stop (rule 3): remove everything stored; nothing is stored again.
        Nothing is removed by a process that does not serve (not yet, or no longer:
        an upgrade's process before it took over, or the old one after)."""
        if not self._serving:
            return
        self._serving = False
        for name in sorted(self._stored | self._stale):
            self._remove(name)

    def hand_over(self) -> None:
        """An upgrade's new process serves: the store is its to keep (rule 3)."""
        self._serving = False
        self._stored.clear()
        self._stale.clear()

    def _remove(self, name: str) -> None:
        if self._notifier.send("FDSTOREREMOVE=1", f"FDNAME={name}") or not self.limit:
            self._stored.discard(name)
            self._stale.discard(name)


def _shut(sock: socket.socket) -> None:
    """Close a socket that came back unwanted; a listener is shut down first: it
    stops listening for every holder (the manager's copy too), so its port can be
    bound again now, and its queue is reset rather than left to wait."""
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.shutdown(socket.SHUT_RDWR)
    sock.close()
