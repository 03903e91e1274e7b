"""systemd's notify protocol (sd_notify), without libsystemd.

`Type=notify` services tell systemd when they are ready, reloading or
stopping, a one-line status, and watchdog pings. The protocol is one
datagram per message to the unix socket named by $NOTIFY_SOCKET; with no
such variable (not under systemd) every call does nothing.

The socket is connected once, at start (`connect`), while the process is
still root: the permission to write to a socket's path is checked at
connect(2), so a notify socket only root may write keeps hearing from the
process after it dropped to --user. An upgrade hands the connected socket
to the new process (tcpproxy.upgrade's NOTIFY_FD), which starts unprivileged.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import trio

__all__ = ["Notifier"]

log = logging.getLogger("tcpproxy")

# a connected notify socket's peer is gone (systemd made its socket anew)
_GONE = frozenset({errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET})


class Notifier:
    """Sends sd_notify messages; a no-op outside systemd.

    Resource handling: owns its socket (`handed`, or the one `connect` or the
    first message makes) until `close` or `disable`.

    Error handling: a failed connect or send is logged once and otherwise
    ignored: the proxy must not stop serving because systemd's socket went away.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, handed: socket.socket | None = None
    ) -> None:
        """`handed`: a socket already connected to the notify socket (an upgrade's)."""
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):  # abstract namespace
            self._address = "\0" + path[1:]
        elif path.startswith("/"):
            self._address = path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and mine else None
        self._sock = handed
        self._connected = handed is not None
        self._enabled = self._address is not None or handed is not None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def connect(self) -> None:
        """Connect the socket now (at start, before dropping privileges); if that
        fails, each message is sent to the address instead, and may fail alike."""
        if self._address is None or self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self._address)
        except OSError as exc:
            self._warn(exc)
        else:
            self._connected = True
        self._sock = sock

    def fileno(self) -> int | None:
        """The connected socket's descriptor (still ours), for an upgrade to hand over."""
        return self._sock.fileno() if self._sock is not None and self._connected else None

    def send(self, *lines: str, fds: Sequence[int] = ()) -> bool:
        """One message; `fds` go with it (SCM_RIGHTS: FDSTORE=1). False if it failed."""
        if not self._enabled:
            return False
        data = ["\n".join(lines).encode()]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            if self._connected:
                try:
                    self._sock.sendmsg(data, ancillary)
                    return True
                except OSError as exc:
                    # Its socket was made anew: the kernel has disconnected ours (the next
                    # send would say ENOTCONN). Connect again (which may be refused to us
                    # now, unprivileged), else send to its path from now on.
                    if exc.errno not in _GONE or self._address is None:
                        raise
                    self._connected = False
                    try:
                        self._sock.connect(self._address)
                    except OSError:
                        pass
                    else:
                        self._connected = True
                        self._sock.sendmsg(data, ancillary)
                        return True
            assert self._address is not None  # else enabled only by a handed (connected) one
            self._sock.sendmsg(data, ancillary, 0, self._address)
        except OSError as exc:
            self._warn(exc)
            return False
        return True

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str, *, main_pid: bool = False) -> None:
        """READY=1; `main_pid`: also MAINPID= (a process started by an upgrade takes over)."""
        self.send("READY=1", *([f"MAINPID={os.getpid()}"] if main_pid else []), f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    async def watchdog(self, status: Callable[[], str] | None = None) -> None:
        """Ping at half of WATCHDOG_USEC, for as long as the event loop runs it."""
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.send("WATCHDOG=1", *([f"STATUS={status()}"] if status else []))
            await trio.sleep(self.watchdog_interval)

    def disable(self) -> None:
        """Send nothing more: another process (an upgrade's) speaks for the service now."""
        self._address = None
        self._enabled = False
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._connected = False


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: systemd talks to the supervisor only."""
    env = dict(os.environ if environ is None else environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    return env
