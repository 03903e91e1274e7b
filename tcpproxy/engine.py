"""The epoll engine: every proxied connection's I/O, driven from one trio task.

A trio task per connection (with its nursery and cancel scopes) cost more
CPU per connection than the syscalls; that path is gone. Here a connection
is a `flow.Flow` (what to do, pure) plus a `Conn` (its sockets and
buffers), and one loop over a private, level-triggered epoll
serves them all: many events per wake-up, no task, nursery, cancel scope or
timeout object per connection. Timeouts (PROXY header, first byte, connect,
happy-eyeballs stagger, idle) sit on one heap, invalidated lazily.

Beside trio: `Engine.run()` is one trio task. When nothing is ready it
awaits `wait_readable(epoll fd)` bounded by the next timer; while events
keep coming it polls again without going through trio's scheduler, and
yields every ROUNDS_BEFORE_YIELD rounds so the control plane (reloads,
probes, metrics, signals) still runs. Everything happens in the trio thread,
so admission, health, metrics, the balancer and the warning limiter are
called synchronously. Host names not in the resolver's cache are looked up
by a trio task the engine owns, whose answer comes back as an event.

Relay (as splice.py's rules): copy with recv/send; a read that fills
COPY_SIZE switches that direction to splice(2) through a pipe. A direction
whose destination is full stops reading its source (no EPOLLIN) and waits
for EPOLLOUT on its destination. EOF is forwarded with shutdown(SHUT_WR),
except when the other direction has ended too: then both are just closed.
An error on one side resets the other (SO_LINGER 0).
"""

from __future__ import annotations

import errno
import gc
import heapq
import itertools
import logging
import math
import os
import select
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from tcpproxy.admission import NO_ROUTE, Admission, Ticket
from tcpproxy.admission import format_peer as _peer
from tcpproxy.config import Target
from tcpproxy.connect import (
    HAPPY_EYEBALLS_DELAY,
    LOCAL_ERRNOS,
    AddressCheck,
    describe_error,
    interleave,
)
from tcpproxy.errors import ResourceExhausted, TargetUnavailable
from tcpproxy.flow import (
    A_ABORT_BOTH,
    A_ABORT_CLIENT,
    A_ABORT_TARGET,
    A_CHOOSE,
    A_CONNECT,
    A_READ_HEADER,
    A_REDISPATCH,
    A_RELAY,
    A_SEND_HEADER,
    A_SHUTDOWN_CLIENT,
    A_SHUTDOWN_TARGET,
    A_WAIT_FIRST_BYTE,
    S_CLOSED,
    S_CONNECTING,
    S_FIRST_BYTE,
    S_HEADER_IN,
    S_HEADER_OUT,
    S_RELAY,
    SIDE_CLIENT,
    SIDE_TARGET,
    Action,
    Flow,
    Side,
    Timeout,
)
from tcpproxy.listeners import (
    ACCEPT_BACKOFF,
    ACCEPT_BATCH,
    ACCEPT_CAPACITY_ERRNOS,
    ACCEPT_TRANSIENT_ERRNOS,
)
from tcpproxy.proxy_protocol import (
    HEADER_TIMEOUT,
    ProxyHeaderError,
    build_header,
    header_extent,
    parse_header,
)
from tcpproxy.splice import CHUNK_SIZE, COPY_SIZE, FAIRNESS_BYTES, abort
from tcpproxy.warnlimit import WarnLimiter

if TYPE_CHECKING:
    from tcpproxy.metrics import NullMetrics
    from tcpproxy.probes import HealthMonitor
    from tcpproxy.resolve import Resolver

__all__ = ["Engine"]

log = logging.getLogger("tcpproxy")

MAX_EVENTS = 256  # events taken per epoll_wait
ROUNDS_BEFORE_YIELD = 8  # busy rounds (events every time) before trio's other tasks run
TIMER_SLACK = 2  # the timer heap may hold this many entries per live connection...
TIMER_FLOOR = 1024  # ...plus this many, before stale ones are swept out
HEADER_PEEK = 16 + 65535  # bytes peeked at most while reading a PROXY header (v2's maximum)

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_IN_BITS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR  # a read will tell
_OUT_BITS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR  # a write will tell
# Connections' sockets are the C type under socket.socket: its Python layer (__init__,
# close() through _real_close, reference counting for makefile) costs 2 us a connection.
_Socket = socket.SocketType
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_ESTABLISHED = 1  # TCP_ESTABLISHED, the first byte of struct tcp_info
_SYN_SENT = 2  # TCP_SYN_SENT: a connect still waiting for its answer
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_HAVE_SPLICE = hasattr(os, "splice")
_PIPE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

# timer kinds
_PHASE, _STAGGER, _IDLE, _BACKOFF = 0, 1, 2, 3


class _Way:
    """One direction of a relay: bytes from `src` to `dst`."""

    __slots__ = (
        "done",
        "dst",
        "dst_fd",
        "pend",
        "pipe_r",
        "pipe_w",
        "piped",
        "splice",
        "src",
        "src_fd",
        "up",
    )  # fmt: skip

    def __init__(
        self, src: socket.SocketType, dst: socket.SocketType, src_fd: int, dst_fd: int, *, up: bool
    ) -> None:
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src_fd, dst_fd
        self.up = up  # client -> target
        self.done = False  # src reached EOF (and dst was told)
        self.pend: memoryview | None = None  # copied bytes dst has not taken yet
        self.splice = False  # bulk: moving through a pipe
        self.pipe_r = self.pipe_w = -1
        self.piped = 0  # bytes in the pipe dst has not taken yet

    @property
    def blocked(self) -> bool:
        return self.pend is not None or self.piped > 0

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class _Listener:
    __slots__ = ("backoff_pending", "failures", "fd", "gen", "kind", "port", "registered", "sock")

    def __init__(self, sock: socket.socket, port: int | None) -> None:
        self.sock, self.fd, self.port = sock, sock.fileno(), port
        # (family, type, proto) as plain ints for the accepted sockets: socket.accept()
        # converts them to enums for every connection (2 us each time)
        self.kind = (int(sock.family), int(sock.type), sock.proto)
        self.registered = False
        self.failures = 0  # capacity errors in a row
        self.backoff_pending = False  # unregistered until its backoff timer fires
        self.gen = 0  # timer validity (backoff)


class Conn:
    """One connection's I/O state; its decisions are `flow`'s."""

    __slots__ = (
        "addresses",
        "app",
        "attempt_errors",
        "attempts",
        "cfd",
        "cid",
        "client",
        "cmask",
        "connecting",
        "down",
        "down_bytes",
        "flow",
        "gen",
        "hbuf",
        "header",
        "last",
        "moved",
        "peer",
        "port",
        "started",
        "target",
        "tfd",
        "ticket",
        "tmask",
        "up",
        "up_bytes",
    )  # fmt: skip

    def __init__(
        self,
        client: socket.SocketType,
        port: int,
        peer: tuple,
        ticket: Ticket,
        flow: Flow,
        now: float,
    ) -> None:
        self.client, self.cfd, self.port, self.peer = client, client.fileno(), port, peer
        self.ticket, self.flow = ticket, flow  # its slot and counts: admission.Ticket
        self.app, self.cid = ticket.app, ticket.cid
        self.started = self.last = self.connecting = now
        self.target: socket.SocketType | None = None
        self.tfd = -1
        self.cmask = self.tmask = 0  # registered epoll interest (0: not registered)
        self.gen = 0  # bumped on every phase change: older timers and lookups are stale
        self.up: _Way | None = None
        self.down: _Way | None = None
        self.moved = False  # a byte was taken from either side of the current target
        self.up_bytes = self.down_bytes = 0
        self.hbuf = b""  # PROXY header bytes read so far
        self.header: memoryview | None = None  # our PROXY header, still to send
        self.attempts: list[socket.SocketType] = []  # connects in flight to the current target
        self.addresses: list[tuple[int, tuple]] = []  # the target's addresses not tried yet
        self.attempt_errors: list[OSError] = []


def _no_check(target: Target, family: int, sockaddr: tuple) -> None:
    pass


class Engine:
    """The data path of one process: its listeners' accepts and every connection.

    Args:
      admission: routes, limits and counts: asked before each accept
        (`has_slot`) and after it (`admit`); each connection's `Ticket` is
        released when it ends, whatever the path.
      resolver: target names to addresses (its cache at once, else a lookup task).
      health: told of each connect's outcome (`connect_ok`, `connect_failed_now`).
      metrics: counts connects and ends.
      warn: the limiter every client-triggered warning goes through.
      check: vetoes a target's address before it is connected (the self-loop
        guard: tcpproxy.selfloop).
      use_splice: splice bulk transfers (else always copy).
    """

    def __init__(
        self,
        admission: Admission,
        *,
        resolver: Resolver,
        health: HealthMonitor,
        metrics: NullMetrics,
        warn: WarnLimiter,
        check: AddressCheck = _no_check,
        use_splice: bool = True,
    ) -> None:
        self._admission = admission
        self._resolver = resolver
        self._health = health
        self._metrics = metrics
        self._warn = warn
        self._check = check
        self._use_splice = use_splice and _HAVE_SPLICE
        self._epoll = select.epoll()
        self._fds: dict[int, tuple[Callable[[Any, int], None], Any]] = {}
        self._conns: set[Conn] = set()
        self._listeners: dict[int, _Listener] = {}
        self._paused = False  # listeners unregistered: at the connection limit
        self._timers: list[tuple[float, int, int, Any, int]] = []  # (when, seq, gen, obj, kind)
        self._seq = itertools.count()
        self._now = time.monotonic()
        self._debug = log.isEnabledFor(logging.DEBUG)  # read once per round of the loop
        self._draining = False
        self._wake: trio.CancelScope | None = None
        self._tasks: trio.Nursery | None = None
        # self-check every round (tests, soak): slow, see check()
        self._checks = os.environ.get("TCPPROXY_ENGINE_CHECKS") == "1"

    # -- the loop ---------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained (see `drain`) or cancelled; cancelled, reset what is left."""
        poll, fds = self._epoll.poll, self._fds
        epoll_fd = self._epoll.fileno()
        monotonic = time.monotonic
        has_slot = self._admission.has_slot
        debug = partial(log.isEnabledFor, logging.DEBUG)
        # Every connection allocates a few dozen objects, and the idle timers keep ended
        # ones until the heap is swept, so they live long enough to reach the oldest
        # generation: its collections would walk every object of the process (modules,
        # trio, config) again and again. What exists before serving is never garbage.
        gc.freeze()
        try:
            async with trio.open_nursery() as self._tasks:
                task_status.started()
                busy = 0
                while not (self._draining and not self._conns):
                    events = poll(0, MAX_EVENTS)
                    self._now = now = monotonic()
                    self._debug = debug()
                    for fd, ev in events:
                        entry = fds.get(fd)
                        if entry is not None:
                            handler, obj = entry
                            try:
                                handler(obj, ev)
                            except Exception:  # a bug must cost one connection, not the proxy
                                self._internal_error(obj)
                    timers = self._timers
                    if timers and timers[0][0] <= now:
                        self._run_timers(now)
                    if self._paused and has_slot():
                        self._resume()
                    if self._checks:
                        self._report(self.check())
                    if events:
                        busy += 1
                        if busy < ROUNDS_BEFORE_YIELD:
                            continue
                        busy = 0
                        await trio.lowlevel.checkpoint()
                        continue
                    busy = 0
                    timers = self._timers
                    delay = timers[0][0] - now if timers else math.inf
                    with trio.move_on_after(max(delay, 0.0)) as self._wake:
                        await trio.lowlevel.wait_readable(epoll_fd)
                    self._wake = None
                self._tasks.cancel_scope.cancel()
        finally:
            self._tasks = None
            left = len(self._conns)
            for conn in list(self._conns):
                self._end(conn, conn.flow.cancel())
            if left:
                log.warning("closed %d connections still open at shutdown", left)
            for lst in list(self._listeners.values()):
                self.remove_listener(lst.sock)

    def drain(self) -> None:
        """Stop once no connection is left (listeners are removed by their owners)."""
        self._draining = True
        if self._wake is not None:
            self._wake.cancel()

    def _internal_error(self, obj: Any) -> None:
        if isinstance(obj, tuple):  # a connect attempt: (conn, socket)
            obj = obj[0]
        if isinstance(obj, Conn) and obj in self._conns:
            log.exception("conn %s client=%s port=%d: internal error", obj.cid,
                          _peer(obj.peer), obj.port, extra={"conn": obj.cid})  # fmt: skip
            obj.flow.reason, obj.flow.why = "internal-error", ""
            obj.flow.state = S_CLOSED
            self._finish(obj, A_ABORT_BOTH)
        else:
            log.exception("engine: internal error")

    # -- self-check ---------------------------------------------------------------

    def check(self) -> list[str]:
        """What is wrong with the engine's bookkeeping (empty: nothing), for tests.

        A connection must never wait for nothing: each live one is watched in
        epoll for what its state waits for (under its own descriptor, not a
        closed one's number), and its state's timer is pending. Reads
        /proc/self/fdinfo of the epoll descriptor: O(connections), so only
        with TCPPROXY_ENGINE_CHECKS=1 (between the loop's rounds) or from a test.
        """
        try:
            registered = _epoll_interest(self._epoll.fileno())
        except OSError as exc:  # out of descriptors itself: look next round
            return [] if exc.errno in ACCEPT_CAPACITY_ERRNOS else [f"fdinfo: {exc}"]
        problems: list[str] = []
        timers = {(id(t[3]), t[4]) for t in self._timers if t[3].gen == t[2]}
        owned: set[int] = set()

        def watched(fd: int, mask: int, handler: Callable[[Any, int], None], obj: Any) -> str:
            owned.add(fd)
            entry = self._fds.get(fd)
            if entry is None or entry[0] != handler or entry[1] is not obj:
                return f"fd {fd} is not mapped to its handler"
            got = registered.get(fd)
            if mask and got is None:
                return f"fd {fd} not in epoll, want {mask:#x}"
            if got is not None and got[1] != os.fstat(fd).st_ino:
                return f"fd {fd} in epoll under another (closed) file"
            if got is not None and got[0] & (_IN | _OUT) != mask:
                return f"fd {fd} in epoll with {got[0]:#x}, want {mask:#x}"
            return ""

        for lst in self._listeners.values():
            why = watched(lst.fd, _IN if lst.registered else 0, self._accept, lst)
            if why:
                problems.append(f"listener {lst.port}: {why}")
            if (
                not lst.registered
                and not self._paused
                and not (lst.backoff_pending and (id(lst), _BACKOFF) in timers)
            ):
                problems.append(f"listener {lst.port}: off, neither paused nor backing off")
        for conn in self._conns:
            state = conn.flow.state
            whys = [watched(conn.cfd, conn.cmask, self._on_client, conn)]
            if conn.target is not None:
                whys.append(watched(conn.tfd, conn.tmask, self._on_target, conn))
            for sock in conn.attempts:
                fd = sock.fileno()
                entry = self._fds.get(fd)
                if entry is None or entry[1] != (conn, sock):
                    whys.append(f"attempt fd {fd} is not mapped to it")
                owned.add(fd)
                if (got := registered.get(fd)) is None or got[0] & (_IN | _OUT) != _OUT:
                    whys.append(f"attempt fd {fd} not waiting for its answer")
            phase = (id(conn), _PHASE) in timers
            if state is S_RELAY:
                up, down = conn.up, conn.down
                if up is None or down is None:
                    whys.append("relaying without directions")
                else:
                    want_c = (0 if up.done or up.blocked else _IN) | (_OUT if down.blocked else 0)
                    want_t = (0 if down.done or down.blocked else _IN) | (_OUT if up.blocked else 0)
                    if (conn.cmask, conn.tmask) != (want_c, want_t):
                        whys.append(f"interest {conn.cmask:#x}/{conn.tmask:#x}, "
                                    f"the directions want {want_c:#x}/{want_t:#x}")  # fmt: skip
                if not conn.cmask and not conn.tmask:
                    whys.append("relaying, watching neither socket")
                if (id(conn), _IDLE) not in timers:
                    whys.append("relaying without an idle timer")
            elif state in (S_HEADER_IN, S_FIRST_BYTE):
                if not conn.cmask & _IN or not phase:
                    whys.append("not waiting for the client, or without its timer")
            elif state is S_CONNECTING:
                if not phase:
                    whys.append("connecting without a connect timer")
            elif state is S_HEADER_OUT:
                if not conn.tmask & _OUT or not phase:
                    whys.append("not waiting to send the header, or without its timer")
            else:
                whys.append("a live connection in a state it never waits in")
            problems.extend(f"conn {conn.cid} ({state.value}): {why}" for why in whys if why)
        for fd in registered.keys() - owned:
            problems.append(f"fd {fd} in epoll, owned by no listener or connection")
        return problems

    def _report(self, problems: list[str]) -> None:
        """A failed self-check stops the engine (as an assert would), after saying why."""
        for problem in problems:
            log.error("engine check: %s", problem)
        if problems:
            raise AssertionError(f"engine check: {len(problems)} problems")

    # -- timers -----------------------------------------------------------------

    def _at(self, when: float, obj: Any, kind: int) -> None:
        if len(self._timers) > TIMER_SLACK * len(self._conns) + TIMER_FLOOR:
            self._compact()
        heapq.heappush(self._timers, (when, next(self._seq), obj.gen, obj, kind))
        # Armed outside the loop's turn (a lookup task) while it sleeps for longer:
        # wake it, or this timer would wait for whatever was due first.
        wake = self._wake
        if wake is not None and when < wake.deadline:
            wake.cancel()

    def _compact(self) -> None:
        """Drop stale timers (ended connections, past phases) from the heap.

        Timers are invalidated lazily, and an idle timer is due an hour later:
        without this, every ended connection would stay referenced that long.
        Run when the heap outgrows the live connections, so amortized O(1).
        """
        conns, listeners = self._conns, self._listeners

        def live(obj: Conn | _Listener) -> bool:
            if isinstance(obj, Conn):
                return obj in conns
            return listeners.get(obj.fd) is obj

        self._timers = [t for t in self._timers if t[3].gen == t[2] and live(t[3])]
        heapq.heapify(self._timers)

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, gen, obj, kind = heapq.heappop(self._timers)
            if obj.gen != gen:
                continue  # stale: the phase it was for is over
            try:
                if kind == _BACKOFF:
                    self._backoff_over(obj)
                elif obj in self._conns:
                    self._on_timer(obj, kind, now)
            except Exception:
                self._internal_error(obj)

    def _on_timer(self, conn: Conn, kind: int, now: float) -> None:
        flow = conn.flow
        cfg = conn.app.config
        if kind == _STAGGER:
            if flow.state is S_CONNECTING and conn.addresses:
                self._next_attempt(conn)
            return
        if kind == _IDLE:
            if flow.state is not S_RELAY:
                return
            due = conn.last + cfg.idle_timeout
            if due > now:  # activity since: re-arm lazily
                self._at(due, conn, _IDLE)
                return
            self._end(conn, flow.timed_out(Timeout.IDLE))
            return
        timeout = flow.timeout
        if timeout is Timeout.HEADER_IN:
            self._warn_header(conn, f"no complete PROXY header within {HEADER_TIMEOUT:g} s")
            self._end(conn, flow.timed_out(timeout))
        elif timeout is Timeout.FIRST_BYTE:
            self._warn(
                f"first-byte {cfg.name}",
                "conn %s client=%s port=%d app=%s: nothing received within "
                "FirstByteTimeout (%g s); closing", conn.cid, _peer(conn.peer), conn.port,
                cfg.name, cfg.first_byte_timeout, extra={"conn": conn.cid},
            )  # fmt: skip
            self._end(conn, flow.timed_out(timeout))
        elif timeout is Timeout.CONNECT:
            self._target_failed(conn, f"no answer within {cfg.connect_timeout:g}s", timeout=True)
        elif timeout is Timeout.HEADER_OUT:
            why = f"PROXY header not taken within {cfg.connect_timeout:g}s"
            self._act(conn, flow.timed_out(timeout, why))

    def _phase(self, conn: Conn, seconds: float | None) -> None:
        """A new phase: older timers and lookups go stale; arm this one's timeout."""
        conn.gen += 1
        if seconds is not None:
            self._at(self._now + seconds, conn, _PHASE)

    # -- listeners --------------------------------------------------------------

    def add_listener(self, sock: socket.socket, port: int | None) -> None:
        """Accept on `sock` (port None: each connection's own destination port)."""
        lst = _Listener(sock, port)
        self._listeners[lst.fd] = lst
        self._fds[lst.fd] = (self._accept, lst)
        if not self._paused:
            self._epoll.register(lst.fd, _IN)
            lst.registered = True

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop accepting on `sock` (its owner closes it); its connections go on."""
        lst = self._listeners.pop(sock.fileno(), None)
        if lst is None:
            return
        lst.gen += 1
        del self._fds[lst.fd]
        if lst.registered:
            self._epoll.unregister(lst.fd)
            lst.registered = False

    def _pause(self) -> None:
        self._paused = True
        for lst in self._listeners.values():
            if lst.registered:
                self._epoll.unregister(lst.fd)
                lst.registered = False

    def _resume(self) -> None:
        self._paused = False
        for lst in self._listeners.values():
            if not lst.registered and not lst.backoff_pending:
                self._epoll.register(lst.fd, _IN)
                lst.registered = True

    def _backoff_over(self, lst: _Listener) -> None:
        # Paused meanwhile: `_resume` registers it (`failures` may stay > 0 until an
        # accept succeeds, so it cannot be what keeps a listener off).
        lst.backoff_pending = False
        if self._listeners.get(lst.fd) is lst and not lst.registered and not self._paused:
            self._epoll.register(lst.fd, _IN)
            lst.registered = True

    def _accept(self, lst: _Listener, ev: int) -> None:
        """Accept a burst, up to ACCEPT_BATCH without waiting for readiness again.

        A slot is needed before each accept: at the limit the listeners are
        paused and new connections wait in the kernel's listen queue rather
        than fail. Out-of-resource errors (ACCEPT_CAPACITY_ERRNOS) are logged
        once per episode and the listener is off for ACCEPT_BACKOFF, so
        running out of descriptors never kills the proxy; errors about one
        connection that died in the queue are skipped; anything else is a bug
        (`_internal_error`).
        """
        admission = self._admission
        has_slot, admit, accept = admission.has_slot, admission.admit, lst.sock._accept  # type: ignore[attr-defined]
        family, kind, proto = lst.kind
        for _ in range(ACCEPT_BATCH):
            if not has_slot():  # at the limit: the rest wait in the listen queue
                self._pause()
                return
            try:
                fd, peer = accept()  # the C method under socket.accept(): (fd, address)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    if not lst.failures:
                        log.error(
                            "port %s: accept failed: %s; retrying every %.0f ms",
                            lst.port or "*", exc.strerror, ACCEPT_BACKOFF * 1000,
                        )  # fmt: skip
                    lst.failures += 1
                    lst.backoff_pending = True
                    if lst.registered:
                        self._epoll.unregister(lst.fd)
                        lst.registered = False
                    self._at(self._now + ACCEPT_BACKOFF, lst, _BACKOFF)
                    return
                if exc.errno in ACCEPT_TRANSIENT_ERRNOS:
                    continue
                raise
            try:
                sock = _Socket(family, kind, proto, fd)
            except OSError:  # cannot happen to an accepted descriptor; do not leak it
                os.close(fd)
                continue
            try:
                sock.setblocking(False)
                port = lst.port if lst.port is not None else sock.getsockname()[1]
            except OSError:  # already reset by the peer
                sock.close()
                continue
            if lst.failures:
                log.warning("port %s: accepting again after %d failed tries", lst.port or "*",
                            lst.failures)  # fmt: skip
                lst.failures = 0
            ticket = admit(port, peer)
            if isinstance(ticket, str):  # refused (why is counted and warned about)
                if ticket == NO_ROUTE:
                    sock.close()
                else:
                    abort(sock)
                continue
            self.start(sock, port, peer, ticket)

    # -- connections ------------------------------------------------------------

    def start(self, client: socket.SocketType, port: int, peer: tuple, ticket: Ticket) -> None:
        """Serve a connection accepted on `port` from `peer` and admitted (`ticket`:
        released when it ends)."""
        app = ticket.app
        cfg = app.config
        flow = Flow(
            accept_header=cfg.accept_proxy_protocol, send_header=bool(cfg.send_proxy_protocol),
            first_byte=cfg.first_byte_timeout is not None,
        )  # fmt: skip
        conn = Conn(client, port, peer, ticket, flow, self._now)
        self._conns.add(conn)
        self._fds[conn.cfd] = (self._on_client, conn)
        try:
            self._act(conn, flow.accepted())
        except Exception:
            self._internal_error(conn)

    def _act(self, conn: Conn, action: Action) -> None:
        """Carry out what the flow decided."""
        if action is A_CHOOSE:  # the client is ready: the app's balancer chooses now
            action = conn.flow.order_chosen(conn.app.choose())
        if action is A_CONNECT:
            self._connect(conn)
        elif action is A_RELAY:
            self._relay(conn)
        elif action is A_SHUTDOWN_TARGET or action is A_SHUTDOWN_CLIENT:
            sock = conn.target if action is A_SHUTDOWN_TARGET else conn.client
            try:
                sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
            except OSError:  # peer already gone: the other direction will report it
                pass
        elif action is A_READ_HEADER:
            self._phase(conn, HEADER_TIMEOUT)
            self._interest(conn, _IN, conn.tmask)
        elif action is A_WAIT_FIRST_BYTE:
            self._phase(conn, conn.app.config.first_byte_timeout)
            self._interest(conn, _IN, conn.tmask)
        elif action is A_SEND_HEADER:
            self._send_header(conn)
        elif action is A_REDISPATCH:
            self._redispatch(conn)
        else:
            self._end(conn, action)

    def _interest(self, conn: Conn, cmask: int, tmask: int) -> None:
        """Make the registered epoll interest of both sockets `cmask` and `tmask`."""
        if cmask != conn.cmask:
            self._watch(conn.cfd, conn.cmask, cmask)
            conn.cmask = cmask
        if tmask != conn.tmask:
            self._watch(conn.tfd, conn.tmask, tmask)
            conn.tmask = tmask

    def _watch(self, fd: int, old: int, new: int) -> None:
        """Change one socket's epoll interest from `old` to `new` (0: not registered)."""
        if not new:
            self._epoll.unregister(fd)
        elif not old:
            self._epoll.register(fd, new)
        else:
            self._epoll.modify(fd, new)

    def _update(self, conn: Conn) -> None:
        """Relay interest: read where the way is open and unblocked, write where blocked."""
        up, down = conn.up, conn.down
        assert up is not None and down is not None
        up_blocked = up.pend is not None or up.piped > 0
        down_blocked = down.pend is not None or down.piped > 0
        cmask = (0 if up.done or up_blocked else _IN) | (_OUT if down_blocked else 0)
        tmask = (0 if down.done or down_blocked else _IN) | (_OUT if up_blocked else 0)
        if cmask != conn.cmask or tmask != conn.tmask:
            self._interest(conn, cmask, tmask)

    # -- header in, first byte ---------------------------------------------------

    def _on_client(self, conn: Conn, ev: int) -> None:
        state = conn.flow.state
        if state is S_RELAY:
            self._relay_event(conn, ev, conn.up, conn.down)  # type: ignore[arg-type]
        elif state is S_HEADER_IN:
            self._read_header(conn)
        elif state is S_FIRST_BYTE:
            try:
                conn.client.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return  # a stale event
            except OSError:
                pass  # an error is the relay's to report
            self._interest(conn, 0, conn.tmask)
            self._act(conn, conn.flow.first_byte())

    def _warn_header(self, conn: Conn, why: str) -> None:
        cfg = conn.app.config
        self._warn(f"proxy-header {cfg.name}", "conn %s client=%s port=%d app=%s: %s",
                   conn.cid, _peer(conn.peer), conn.port, cfg.name, why,
                   extra={"conn": conn.cid})  # fmt: skip

    def _read_header(self, conn: Conn) -> None:
        """Take the balancer's PROXY header as it arrives, not one byte past its end."""
        client = conn.client
        try:
            peeked = client.recv(HEADER_PEEK - len(conn.hbuf), socket.MSG_PEEK)
            if not peeked:
                raise ProxyHeaderError("closed before a PROXY header")
            data = conn.hbuf + peeked
            extent = header_extent(data)
            take = len(peeked) if extent is None else min(len(peeked), extent - len(conn.hbuf))
            conn.hbuf += client.recv(take)
            if extent is None or len(conn.hbuf) < extent:
                return
            source = parse_header(conn.hbuf)
        except BlockingIOError:
            return
        except (ProxyHeaderError, OSError) as exc:
            self._warn_header(conn, describe_error(exc))
            self._end(conn, conn.flow.header_failed(str(exc)))
            return
        conn.hbuf = b""
        if source is not None:
            conn.peer = source
        self._interest(conn, 0, conn.tmask)
        self._act(conn, conn.flow.header_read())

    # -- connecting ---------------------------------------------------------------

    def _connect(self, conn: Conn) -> None:
        """Connect to flow.target: resolve (from the cache, else a lookup task), then
        happy eyeballs over its addresses; the connect timeout bounds it all."""
        target = conn.flow.target
        assert target is not None
        conn.ticket.claim(target)  # counted from the choice on, and moved on failover
        cfg = conn.app.config
        conn.connecting = self._now
        if conn.attempt_errors:
            conn.attempt_errors = []
        conn.gen += 1  # a new phase: older timers and lookups are stale
        try:
            addresses = self._resolver.cached(target.host, target.port)
        except OSError as exc:
            self._target_failed(conn, describe_error(exc), exc=exc)
            return
        if addresses is None:
            self._at(self._now + cfg.connect_timeout, conn, _PHASE)
            assert self._tasks is not None
            self._tasks.start_soon(self._lookup, conn, conn.gen, name="resolve")
            return
        self._try_addresses(conn, addresses, arm=True)

    async def _lookup(self, conn: Conn, gen: int) -> None:
        """Resolve the conn's target on a trio task; feed the answer back unless stale."""
        target = conn.flow.target
        assert target is not None
        left = conn.connecting + conn.app.config.connect_timeout - time.monotonic()
        answer: list[tuple[int, tuple]] | OSError | None = None
        with trio.move_on_after(left):  # the resolver gives up just before: says "DNS"
            try:
                answer = await self._resolver.resolve(target.host, target.port)
            except OSError as exc:
                answer = exc
        if answer is None or conn.gen != gen or conn not in self._conns:
            return  # the connect timeout (or the connection's end) came first
        self._now = time.monotonic()
        try:
            if isinstance(answer, OSError):
                self._target_failed(conn, describe_error(answer), exc=answer)
            else:
                self._try_addresses(conn, answer, arm=False)
        except Exception:
            self._internal_error(conn)
        finally:
            # Outside the loop's turn: what it did (a slot freed, new descriptors,
            # timers) must be seen now, not after the loop's current sleep.
            if self._wake is not None:
                self._wake.cancel()

    def _try_addresses(self, conn: Conn, addresses: list[tuple[int, tuple]], *, arm: bool) -> None:
        """Happy eyeballs over `addresses`; `arm`: the connect timeout is not armed yet."""
        if not addresses:
            target = conn.flow.target
            assert target is not None
            self._target_failed(conn, describe_error(OSError(f"{target.host} has no address")))
            return
        conn.addresses = interleave(addresses) if len(addresses) > 1 else list(addresses)
        self._next_attempt(conn, arm=arm)

    def _next_attempt(self, conn: Conn, *, arm: bool = False) -> None:
        """Start the next address; a loopback connect is done at once (no wait)."""
        flow = conn.flow
        target = flow.target
        check = self._check
        while conn.addresses:
            family, sockaddr = conn.addresses.pop(0)
            sock: socket.SocketType | None = None
            try:
                check(target, family, sockaddr)  # type: ignore[arg-type]
                sock = _Socket(family, _STREAM_NONBLOCK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = sock.connect_ex(sockaddr)
                # On loopback the handshake is done by now; one getsockopt spares a wait.
                if (
                    err == errno.EINPROGRESS
                    and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _ESTABLISHED
                ):
                    err = 0
                if err and err != errno.EINPROGRESS:
                    raise OSError(err, os.strerror(err))
            except OSError as exc:
                if sock is not None:
                    sock.close()
                conn.attempt_errors.append(exc)
                if exc.errno in LOCAL_ERRNOS:
                    break
                continue
            if not err:
                self._won(conn, sock)
                return
            fd = sock.fileno()
            conn.attempts.append(sock)
            self._fds[fd] = (self._on_attempt, (conn, sock))
            self._epoll.register(fd, _OUT)
            if arm:
                arm = False
                self._at(self._now + conn.app.config.connect_timeout, conn, _PHASE)
            if conn.addresses:
                self._at(self._now + HAPPY_EYEBALLS_DELAY, conn, _STAGGER)
            return
        if conn.attempts:
            return  # others still in flight
        errors = conn.attempt_errors
        first = next((e for e in errors if e.errno in LOCAL_ERRNOS), errors[0])
        self._target_failed(conn, describe_error(first), exc=first)

    def _on_attempt(self, attempt: tuple[Conn, socket.SocketType], ev: int) -> None:
        """A connect in flight answered: won, or failed (then the next address)."""
        conn, sock = attempt
        try:
            # The state first: read after SO_ERROR, it could show a refusal that came
            # in between (CLOSE, its error still pending) and pass it for a success.
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _SYN_SENT:
                return  # still connecting: a stale event (its descriptor number was reused)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if not err:
            conn.attempts.remove(sock)
            self._won(conn, sock, registered=True)
            return
        conn.attempts.remove(sock)
        self._close_attempt(sock)
        conn.attempt_errors.append(OSError(err, os.strerror(err)))
        if not conn.attempts:
            self._next_attempt(conn)

    def _close_attempt(self, sock: socket.SocketType) -> None:
        self._fds.pop(sock.fileno(), None)
        sock.close()  # leaves the epoll set with its last descriptor

    def _drop_attempts(self, conn: Conn) -> None:
        for sock in conn.attempts:
            self._close_attempt(sock)
        conn.attempts.clear()
        if conn.addresses:
            conn.addresses = []

    def _won(self, conn: Conn, sock: socket.SocketType, *, registered: bool = False) -> None:
        flow = conn.flow
        target = flow.target
        assert target is not None
        if conn.attempts or conn.addresses:
            self._drop_attempts(conn)
        conn.target, conn.tfd = sock, sock.fileno()
        conn.tmask = _OUT if registered else 0
        conn.moved = False
        self._fds[conn.tfd] = (self._on_target, conn)
        cfg = conn.app.config
        if self._debug:
            log.debug("conn %s client=%s port=%d app=%s: connected to %s", conn.cid,
                      _peer(conn.peer), conn.port, cfg.name, target,
                      extra={"conn": conn.cid})  # fmt: skip
        self._health.connect_ok(target)
        self._metrics.connected(cfg.name, target, self._now - conn.connecting)
        self._act(conn, flow.connected())

    def _target_failed(
        self, conn: Conn, why: str, *, exc: OSError | None = None, timeout: bool = False
    ) -> None:
        """The current target could not be connected: the flow picks the next one."""
        self._drop_attempts(conn)
        flow = conn.flow
        target = flow.target
        assert target is not None
        ours = exc is not None and exc.errno in LOCAL_ERRNOS
        if not ours:
            self._health.connect_failed_now(target, why)
        action = (
            flow.timed_out(Timeout.CONNECT, why) if timeout else flow.connect_failed(why, ours=ours)
        )
        if flow.state is S_CLOSED:
            cfg = conn.app.config
            if ours:
                message: Exception = ResourceExhausted(f"cannot connect to {target}: {why}")
                key = "resources"
            else:
                failures = [(str(t), w) for t, w in flow.failures]
                message, key = TargetUnavailable(cfg.name, failures), f"no-target {cfg.name}"
            self._warn(key, "conn %s client=%s port=%d: %s", conn.cid, _peer(conn.peer),
                       conn.port, message, extra={"conn": conn.cid})  # fmt: skip
        self._act(conn, action)

    def _redispatch(self, conn: Conn) -> None:
        """The target failed before any byte moved: close it, try the next (flow's rule 5)."""
        flow = conn.flow
        cfg = conn.app.config
        self._metrics.ended(cfg.name, flow.dropped, "target-early-error", 0, 0)
        self._interest(conn, 0, conn.tmask)
        self._close_target(conn)
        self._connect(conn)

    def _close_target(self, conn: Conn) -> None:
        if conn.target is not None:
            self._fds.pop(conn.tfd, None)
            conn.target.close()
            conn.target, conn.tfd, conn.tmask = None, -1, 0
        for way in (conn.up, conn.down):
            if way is not None:
                way.close_pipe()
        conn.up = conn.down = None
        conn.header = None

    # -- header out -----------------------------------------------------------------

    def _send_header(self, conn: Conn) -> None:
        cfg = conn.app.config
        if conn.header is None:
            destination = conn.client.getsockname()
            conn.header = memoryview(
                build_header(cfg.send_proxy_protocol, conn.peer, destination)  # type: ignore[arg-type]
            )
            self._phase(conn, cfg.connect_timeout)
        try:
            sent = conn.target.send(conn.header)  # type: ignore[union-attr]
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._interest(conn, conn.cmask, 0)
            self._act(conn, conn.flow.error(SIDE_TARGET, describe_error(exc), moved=False))
            return
        conn.header = conn.header[sent:]
        if conn.header:
            self._interest(conn, conn.cmask, _OUT)
            return
        conn.header = None
        self._act(conn, conn.flow.header_sent())

    def _on_target(self, conn: Conn, ev: int) -> None:
        state = conn.flow.state
        if state is S_RELAY:
            self._relay_event(conn, ev, conn.down, conn.up)  # type: ignore[arg-type]
        elif state is S_HEADER_OUT:
            self._send_header(conn)

    def _relay_event(self, conn: Conn, ev: int, reading: _Way, writing: _Way) -> None:
        """An event on one socket while relaying: first flush what waits to be written
        to it (`writing`), then read from it (`reading`) if that direction is free."""
        if ev & _OUT_BITS and (writing.pend is not None or writing.piped):
            self._flush(conn, writing)
        if (
            ev & _IN_BITS and conn.flow.state is S_RELAY
            and not reading.done and reading.pend is None and not reading.piped
        ):  # fmt: skip
            self._pump(conn, reading)
        if conn.flow.state is S_RELAY:
            self._update(conn)

    # -- relay ------------------------------------------------------------------------

    def _relay(self, conn: Conn) -> None:
        client, target = conn.client, conn.target
        assert target is not None
        conn.up = _Way(client, target, conn.cfd, conn.tfd, up=True)
        conn.down = _Way(target, client, conn.tfd, conn.cfd, up=False)
        conn.moved = False
        conn.last = self._now
        conn.gen += 1  # a new phase (`_phase`), whose timer is the idle one
        self._at(self._now + conn.app.config.idle_timeout, conn, _IDLE)
        self._interest(conn, _IN, _IN)

    def _fail(self, conn: Conn, side: Side, exc: OSError) -> None:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        self._act(conn, conn.flow.error(side, why, moved=conn.moved))

    def _pump(self, conn: Conn, way: _Way) -> None:
        """`way.src` is readable: move what it has to `way.dst`, as far as dst takes it."""
        if way.splice:
            self._pump_splice(conn, way)
            return
        try:
            data = way.src.recv(COPY_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, SIDE_CLIENT if way.up else SIDE_TARGET, exc)
            return
        if not data:
            way.done = True
            if way.pipe_r >= 0:
                way.close_pipe()
            self._act(conn, conn.flow.eof(SIDE_CLIENT if way.up else SIDE_TARGET))
            return
        conn.moved = True
        conn.last = self._now
        n = len(data)
        try:
            sent = way.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(conn, SIDE_TARGET if way.up else SIDE_CLIENT, exc)
            return
        if way.up:
            conn.up_bytes += sent
        else:
            conn.down_bytes += sent
        if sent < n:
            way.pend = memoryview(data)[sent:]
        elif n == COPY_SIZE and self._use_splice:
            way.splice = True  # a bulk transfer: the next read splices

    def _count(self, conn: Conn, way: _Way, n: int) -> None:
        if way.up:
            conn.up_bytes += n
        else:
            conn.down_bytes += n

    def _pump_splice(self, conn: Conn, way: _Way) -> None:
        src_side, dst_side = (SIDE_CLIENT, SIDE_TARGET) if way.up else (SIDE_TARGET, SIDE_CLIENT)
        if way.pipe_r < 0:
            try:
                way.pipe_r, way.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _PIPE_ERRNOS:
                    raise
                way.splice = False  # out of descriptors for a pipe: copy
                self._pump(conn, way)
                return
        splice = os.splice
        moved = 0
        while moved < FAIRNESS_BYTES:
            try:
                n = splice(way.src_fd, way.pipe_w, CHUNK_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(conn, src_side, exc)
                return
            if n == 0:
                way.done = True
                way.close_pipe()
                self._act(conn, conn.flow.eof(src_side))
                return
            conn.last = self._now
            moved += n
            try:
                m = splice(way.pipe_r, way.dst_fd, n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as exc:
                self._fail(conn, dst_side, exc)
                return
            self._count(conn, way, m)
            if m < n:
                way.piped = n - m
                return
            if n < CHUNK_SIZE:
                return

    def _flush(self, conn: Conn, way: _Way) -> None:
        """`way.dst` is writable: hand it what it did not take before."""
        dst_side = SIDE_TARGET if way.up else SIDE_CLIENT
        conn.last = self._now
        try:
            if way.pend is not None:
                sent = way.dst.send(way.pend)
                self._count(conn, way, sent)
                way.pend = way.pend[sent:] if sent < len(way.pend) else None
            else:
                m = os.splice(way.pipe_r, way.dst_fd, way.piped, flags=_SPLICE_FLAGS)
                self._count(conn, way, m)
                way.piped -= m
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, dst_side, exc)

    # -- the end ------------------------------------------------------------------------

    def _end(self, conn: Conn, action: Action) -> None:
        """The flow is CLOSED: close (or reset, as `action` says) and account."""
        self._finish(conn, action)

    def _finish(self, conn: Conn, action: Action) -> None:
        try:
            self._conns.remove(conn)
        except KeyError:  # ended already
            return
        conn.gen += 1
        flow = conn.flow
        fds = self._fds
        fds.pop(conn.cfd, None)
        if conn.attempts or conn.addresses:
            self._drop_attempts(conn)
        if action is A_ABORT_CLIENT or action is A_ABORT_BOTH:
            abort(conn.client)
        else:
            conn.client.close()
        if conn.target is not None:
            fds.pop(conn.tfd, None)
            if action is A_ABORT_TARGET or action is A_ABORT_BOTH:
                abort(conn.target)
            else:
                conn.target.close()
        for way in (conn.up, conn.down):
            if way is not None and way.pipe_r >= 0:
                way.close_pipe()
        # A stale timer (the idle one is due an hour later) keeps this Conn until the
        # heap is swept: let go now of what can be large, the bytes a peer never took.
        conn.up = conn.down = conn.header = None
        conn.hbuf = b""
        if conn.attempt_errors:
            conn.attempt_errors = []
        conn.ticket.release()  # the slot and every count, here only
        name = conn.app.config.name
        connected = conn.target is not None
        used = flow.target if connected else None
        self._metrics.ended(name, used, flow.reason, conn.up_bytes, conn.down_bytes)
        if self._debug:
            log.debug(
                "conn %s client=%s port=%d app=%s target=%s up=%d down=%d duration=%.3fs "
                "end=%s%s", conn.cid, _peer(conn.peer), conn.port, name, used or "-",
                conn.up_bytes, conn.down_bytes, time.monotonic() - conn.started, flow.end_label,
                f" failed-first={','.join(flow.failed)}" if flow.failed else "",
                extra={"conn": conn.cid},
            )  # fmt: skip
        conn.target = None


def _epoll_interest(epfd: int) -> dict[int, tuple[int, int]]:
    """The descriptors in an epoll set: fd -> (events, inode of the file registered)."""
    interest: dict[int, tuple[int, int]] = {}
    with open(f"/proc/self/fdinfo/{epfd}") as info:
        for line in info:
            # tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x
            if line.startswith("tfd:"):
                f = line.split()
                interest[int(f[1])] = (int(f[3], 16), int(f[7].removeprefix("ino:"), 16))
    return interest
