"""The engine: composes the rooms and carries out each connection's flow.

Owns the set of live connections and THE one teardown (`finish`): every
path that ends a connection (the flow closing it, a bug, the engine's own
end) goes through it exactly once, and it unregisters and closes (or resets)
the sockets, closes the pipes, releases the admission ticket (the slot and
every count, admission's one give-back), tells the metrics and writes the
debug line. The rooms below it (loop, accept, preamble, dial, relay, check)
do the I/O and report back through the callbacks given here, so the flow's
events are fed in one place and its actions carried out in one (`act`).

Errors: an exception in a handler or timer is a bug: it is logged and costs
its connection (reset both ways), never the proxy (`internal_error`). A
failed self-check stops the engine as an assert would.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import trio

from tcpproxy.admission import (
    CLIENT_CLOSED,
    INSPECT_TIMEOUT,
    MALFORMED,
    NO_ROUTE,
    OVERSIZE,
    Admission,
    AppRuntime,
    Ticket,
)
from tcpproxy.admission import format_peer as _peer
from tcpproxy.config import Target
from tcpproxy.connect import LOCAL_ERRNOS, AddressCheck, describe_error
from tcpproxy.engine.accept import Acceptor, Listener
from tcpproxy.engine.check import check
from tcpproxy.engine.conn import Conn
from tcpproxy.engine.dial import Dialer
from tcpproxy.engine.loop import HUP_BITS, IN, OUT, RDHUP, Loop
from tcpproxy.engine.preamble import (
    discard_peeked,
    end_inspection,
    inspect,
    peek_first_byte,
    read_header_in,
    send_header_out,
)
from tcpproxy.engine.relay import Relay
from tcpproxy.engine.timers import BACKOFF, IDLE, PHASE, STAGGER
from tcpproxy.errors import ResourceExhausted, TargetUnavailable
from tcpproxy.flow import (
    A_ABORT_BOTH,
    A_ABORT_CLIENT,
    A_ABORT_TARGET,
    A_CHOOSE,
    A_CONNECT,
    A_INSPECT,
    A_READ_HEADER,
    A_REDISPATCH,
    A_RELAY,
    A_ROUTE,
    A_SEND_HEADER,
    A_SHUTDOWN_CLIENT,
    A_SHUTDOWN_TARGET,
    A_WAIT_FIRST_BYTE,
    S_CLOSED,
    S_CONNECTING,
    S_FIRST_BYTE,
    S_HEADER_IN,
    S_HEADER_OUT,
    S_INSPECTING,
    S_RELAY,
    SIDE_TARGET,
    Action,
    Flow,
    Side,
    Timeout,
)
from tcpproxy.proxy_protocol import HEADER_TIMEOUT, ProxyHeaderError
from tcpproxy.sniff import BAD, MORE, NAME
from tcpproxy.splice import abort
from tcpproxy.warnlimit import WarnLimiter

if TYPE_CHECKING:
    from tcpproxy.metrics import NullMetrics
    from tcpproxy.probes import HealthMonitor
    from tcpproxy.resolve import Resolver

__all__ = ["Engine"]

log = logging.getLogger("tcpproxy")


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
        self._health = health
        self._metrics = metrics
        self._warn = warn
        self.conns: set[Conn] = set()
        self.loop = Loop(self.conns, self._live)
        self.acceptor = Acceptor(self.loop, admission.has_slot, self._accepted)
        self.dialer = Dialer(
            self.loop, self.conns, resolver, check, self._won, self._target_failed,
            self.internal_error,
        )  # fmt: skip
        self.relay = Relay(self.loop, use_splice, self._eof, self._relay_error)
        # self-check every round (tests, soak): slow, see check()
        self._checks = os.environ.get("TCPPROXY_ENGINE_CHECKS") == "1"

    # -- the face ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self.conns)

    def add_listener(self, sock: socket.socket, port: int | None) -> None:
        """Accept on `sock` (port None: each connection's own destination port)."""
        self.acceptor.add(sock, port)

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop accepting on `sock` (its owner closes it); its connections go on."""
        self.acceptor.remove(sock)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained (see `drain`) or cancelled; cancelled, reset what is left."""
        try:
            await self.loop.run(
                self._on_timer, self._after_round, self.internal_error, task_status=task_status
            )
        finally:
            left = len(self.conns)
            for conn in list(self.conns):
                self.finish(conn, conn.flow.cancel())
            if left:
                log.warning("closed %d connections still open at shutdown", left)
            self._metrics.flush()
            self.acceptor.remove_all()

    def drain(self) -> None:
        """Stop once no connection is left (listeners are removed by their owners)."""
        self.loop.drain()

    def check(self) -> list[str]:
        """What is wrong with the engine's bookkeeping (empty: nothing), for tests:
        check.check, over this engine."""
        return check(self.loop, self.acceptor, self.conns, self._on_client, self._on_target,
                     self.dialer.on_attempt)  # fmt: skip

    def _after_round(self) -> None:
        self._metrics.flush()  # what this round's connections counted (metrics.py)
        if self.acceptor.paused and self._admission.has_slot():
            self.acceptor.resume()
        if self._checks:
            problems = self.check()
            for problem in problems:
                log.error("engine check: %s", problem)
            if problems:  # as an assert would: stops the engine, after saying why
                raise AssertionError(f"engine check: {len(problems)} problems")

    def _live(self, obj: Any) -> bool:
        if isinstance(obj, Listener):
            return self.acceptor.live(obj)
        return obj in self.conns

    def internal_error(self, obj: Any) -> None:
        """A handler or timer of `obj` raised: a bug; it costs that connection only."""
        if isinstance(obj, tuple):  # a connect attempt: (conn, socket)
            obj = obj[0]
        if isinstance(obj, Conn) and obj in self.conns:
            log.exception("conn %s client=%s port=%d: internal error", obj.cid,
                          _peer(obj.peer), obj.port, extra={"conn": obj.cid})  # fmt: skip
            self.finish(obj, obj.flow.crashed())
        else:
            log.exception("engine: internal error")

    # -- a connection's start ------------------------------------------------------

    def _accepted(self, sock: socket.SocketType, port: int, peer: tuple) -> None:
        ticket = self._admission.arrive(port, peer)
        if isinstance(ticket, str):  # refused (why is counted and warned about)
            if ticket == NO_ROUTE:
                sock.close()
            else:
                abort(sock)
            return
        self.start(sock, port, peer, ticket)

    def start(self, client: socket.SocketType, port: int, peer: tuple, ticket: Ticket) -> None:
        """Serve a connection accepted on `port` from `peer` (`ticket`: its slot and
        router, from `Admission.arrive`; released when it ends)."""
        router = ticket.router
        cfg = router.preamble
        late = router.needs_bytes  # its FirstByteTimeout is the routed app's (flow rule 1)
        flow = Flow(
            accept_header=cfg.accept_proxy_protocol,
            first_byte=cfg.first_byte_timeout is not None and not late, route_late=late,
        )  # fmt: skip
        conn = Conn(client, port, peer, ticket, flow, self.loop.now)
        self.conns.add(conn)
        self.loop.fds[conn.cfd] = (self._on_client, conn)
        try:
            self.act(conn, flow.accepted())
        except Exception:
            self.internal_error(conn)

    # -- the flow's actions ------------------------------------------------------------

    def act(self, conn: Conn, action: Action) -> None:
        """Carry out what the flow decided."""
        if action is A_ROUTE:  # at accept (a port one app owns), or after the preamble
            action = self._route(conn)
        if action is A_CHOOSE:  # the client is ready: the app's balancer chooses now
            action = conn.flow.order_chosen(conn.app.choose())
        if action is A_CONNECT:
            self._connect(conn)
        elif action is A_RELAY:
            self.relay.start(conn)
        elif action is A_SHUTDOWN_TARGET or action is A_SHUTDOWN_CLIENT:
            sock = conn.target if action is A_SHUTDOWN_TARGET else conn.client
            try:
                sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
            except OSError:  # peer already gone: the other direction will report it
                pass
        elif action is A_INSPECT:
            self._phase(conn, conn.ticket.router.preamble.inspect_timeout)
            conn.interest(self.loop, IN | RDHUP, conn.tmask)
        elif action is A_READ_HEADER:
            self._phase(conn, HEADER_TIMEOUT)
            conn.interest(self.loop, IN, conn.tmask)
        elif action is A_WAIT_FIRST_BYTE:
            self._phase(conn, conn.app.config.first_byte_timeout)
            conn.interest(self.loop, IN, conn.tmask)
        elif action is A_SEND_HEADER:
            self._send_header(conn)
        elif action is A_REDISPATCH:
            self._redispatch(conn)
        else:
            self.finish(conn, action)

    def _route(self, conn: Conn) -> Action:
        """Choose the connection's app (its port's router) and admit it to that app."""
        router = conn.ticket.router
        if router.needs_bytes:  # apps told apart by the name the client asks for
            action = self._inspect(conn, 0)
            assert action is not None  # ROUTING: at worst, start INSPECTING
            return action
        return self._admit(conn, router.choose(), "")

    def _admit(self, conn: Conn, app: AppRuntime | None, how: str) -> Action:
        """Admit the connection to `app` (None: no app for it); `how` it was routed
        ("name", "default", "silent"; "": its port's one app)."""
        ticket = conn.ticket
        admission = self._admission
        if app is None:
            why = admission.no_route(ticket, conn.port, conn.name)
        else:
            why = admission.admit_to(ticket, app)
        if why:  # counted and warned about by admission; the slot goes back at the end
            # a port's removal closes; a name no app has resets, as limits do
            return conn.flow.route_failed(why, reset=why != NO_ROUTE or bool(how))
        assert app is not None
        conn.app = app
        cfg = app.config
        if how:
            self._metrics.routed(cfg.name, how)
        return conn.flow.routed(
            send_header=bool(cfg.send_proxy_protocol),
            first_byte=how == "silent" and cfg.first_byte_timeout is not None,
        )

    def _inspect(self, conn: Conn, ev: int) -> Action | None:
        """Route by the name the client asks for, once its bytes tell (peeked: they stay
        for the target); None: wait for more (INSPECTING, under InspectTimeout)."""
        try:
            verdict = inspect(conn)
        except OSError as exc:
            return self._not_inspected(conn, CLIENT_CLOSED, describe_error(exc))
        kind = MORE if verdict is None else verdict.kind
        if kind == MORE:
            if ev & (RDHUP | HUP_BITS):  # it closed (or failed) before naming its app
                return self._not_inspected(conn, CLIENT_CLOSED, "closed before its name")
            if conn.flow.state is S_INSPECTING:
                return None
            return conn.flow.inspecting()
        assert verdict is not None
        end_inspection(conn)
        if kind == BAD:  # malformed, oversize: counted and closed, never a default's
            reason = OVERSIZE if verdict.oversize else MALFORMED
            return self._not_inspected(conn, reason, verdict.why)
        router = conn.ticket.router
        if kind == NAME:
            conn.name = verdict.name
            app = router.choose(verdict.name)
            how = "default" if app is router.default else "name"
        else:  # not TLS or HTTP, or no name in it
            app, how = router.default, "default"
        return self._admit(conn, app, how)

    def _inspect_timed_out(self, conn: Conn) -> Action:
        """InspectTimeout ran out: a client that sent nothing goes to the default app (it
        may wait for the server to speak); one that sent part of its hello is closed.

        Its socket is peeked once more first: bytes can be there unseen (they came after
        the round's epoll_wait, or in a round with more than MAX_EVENTS events, whose
        timers still run), and a partial hello must not pass for silence."""
        action = self._inspect(conn, 0)
        if action is not None:  # they completed the hello (or broke it): decided by them
            return action
        end_inspection(conn)
        if conn.peeked:
            seconds = conn.ticket.router.preamble.inspect_timeout
            return self._not_inspected(
                conn, INSPECT_TIMEOUT, f"no complete hello or request within {seconds:g} s"
            )
        router = conn.ticket.router
        return self._admit(conn, router.default, "silent")

    def _not_inspected(self, conn: Conn, reason: str, why: str) -> Action:
        """The client cannot be routed by name: counted, warned about, closed."""
        end_inspection(conn)
        discard_peeked(conn)
        self._admission.not_inspected(conn.ticket, conn.port, reason, why)
        return conn.flow.route_failed(reason, reset=False)

    def _phase(self, conn: Conn, seconds: float | None) -> None:
        """A new phase: older timers and lookups go stale; arm this one's timeout."""
        conn.gen += 1
        if seconds is not None:
            self.loop.at(self.loop.now + seconds, conn, PHASE)

    # -- events: the client's and the target's sockets, timers -----------------------

    def _on_client(self, conn: Conn, ev: int) -> None:
        state = conn.flow.state
        if state is S_RELAY:
            self.relay.event(conn, ev, conn.up, conn.down)  # type: ignore[arg-type]
        elif state is S_HEADER_IN:
            self._read_header(conn)
        elif state is S_INSPECTING:
            action = self._inspect(conn, ev)
            if action is not None:
                conn.interest(self.loop, 0, conn.tmask)
                self.act(conn, action)
        elif state is S_FIRST_BYTE and peek_first_byte(conn):  # else a stale event
            conn.interest(self.loop, 0, conn.tmask)
            self.act(conn, conn.flow.first_byte())

    def _on_target(self, conn: Conn, ev: int) -> None:
        state = conn.flow.state
        if state is S_RELAY:
            self.relay.event(conn, ev, conn.down, conn.up)  # type: ignore[arg-type]
        elif state is S_HEADER_OUT:
            self._send_header(conn)

    def _on_timer(self, obj: Any, kind: int) -> None:
        if kind == BACKOFF:
            self.acceptor.backoff_over(obj)
            return
        if obj not in self.conns:
            return
        conn: Conn = obj
        flow = conn.flow
        cfg = conn.app.config
        if kind == STAGGER:
            if flow.state is S_CONNECTING and conn.addresses:
                self.dialer.next_attempt(conn)
            return
        if kind == IDLE:
            if flow.state is not S_RELAY:
                return
            due = conn.last + cfg.idle_timeout
            if due > self.loop.now:  # activity since: re-arm lazily
                self.loop.at(due, conn, IDLE)
                return
            self.finish(conn, flow.timed_out(Timeout.IDLE))
            return
        timeout = flow.timeout
        if timeout is Timeout.INSPECT:
            conn.interest(self.loop, 0, conn.tmask)
            self.act(conn, self._inspect_timed_out(conn))
        elif timeout is Timeout.HEADER_IN:
            self._warn_header(conn, f"no complete PROXY header within {HEADER_TIMEOUT:g} s")
            self.finish(conn, flow.timed_out(timeout))
        elif timeout is Timeout.FIRST_BYTE:
            self._warn(
                f"first-byte {cfg.name}",
                "conn %s client=%s port=%d app=%s: nothing received within "
                "FirstByteTimeout (%g s); closing", conn.cid, _peer(conn.peer), conn.port,
                cfg.name, cfg.first_byte_timeout, extra={"conn": conn.cid},
            )  # fmt: skip
            self.finish(conn, flow.timed_out(timeout))
        elif timeout is Timeout.CONNECT:
            self._target_failed(conn, f"no answer within {cfg.connect_timeout:g}s", None, True)
        elif timeout is Timeout.HEADER_OUT:
            why = f"PROXY header not taken within {cfg.connect_timeout:g}s"
            self.act(conn, flow.timed_out(timeout, why))

    # -- header in, header out (preamble) ---------------------------------------------

    def _warn_header(self, conn: Conn, why: str) -> None:
        cfg = conn.app.config
        self._warn(f"proxy-header {cfg.name}", "conn %s client=%s port=%d app=%s: %s",
                   conn.cid, _peer(conn.peer), conn.port, cfg.name, why,
                   extra={"conn": conn.cid})  # fmt: skip

    def _read_header(self, conn: Conn) -> None:
        try:
            if not read_header_in(conn):
                return
        except (ProxyHeaderError, OSError) as exc:
            self._warn_header(conn, describe_error(exc))
            self.finish(conn, conn.flow.header_failed(str(exc)))
            return
        conn.interest(self.loop, 0, conn.tmask)
        self.act(conn, conn.flow.header_read())

    def _send_header(self, conn: Conn) -> None:
        cfg = conn.app.config
        if conn.header is None:  # the first try: the phase's timeout starts
            self._phase(conn, cfg.connect_timeout)
        try:
            done = send_header_out(conn, cfg.send_proxy_protocol)  # type: ignore[arg-type]
        except OSError as exc:
            conn.interest(self.loop, conn.cmask, 0)
            self.act(conn, conn.flow.error(SIDE_TARGET, describe_error(exc), moved=False))
            return
        if not done:
            conn.interest(self.loop, conn.cmask, OUT)
            return
        self.act(conn, conn.flow.header_sent())

    # -- connecting (dial) ------------------------------------------------------------

    def _connect(self, conn: Conn) -> None:
        target = conn.flow.target
        assert target is not None
        conn.ticket.claim(target)  # counted from the choice on, and moved on failover
        self.dialer.connect(conn)

    def _won(self, conn: Conn, sock: socket.SocketType, registered: bool) -> None:
        flow = conn.flow
        target = flow.target
        assert target is not None
        if conn.attempts or conn.addresses:
            self.dialer.drop_attempts(conn)
        conn.target, conn.tfd = sock, sock.fileno()
        conn.tmask = OUT if registered else 0
        conn.moved = False
        loop = self.loop
        loop.fds[conn.tfd] = (self._on_target, conn)
        cfg = conn.app.config
        if loop.debug:
            log.debug("conn %s client=%s port=%d app=%s: connected to %s", conn.cid,
                      _peer(conn.peer), conn.port, cfg.name, target,
                      extra={"conn": conn.cid})  # fmt: skip
        self._health.connect_ok(target)
        self._metrics.connected(cfg.name, target, loop.now - conn.connecting)
        self.act(conn, flow.connected())

    def _target_failed(
        self, conn: Conn, why: str, exc: OSError | None, timeout: bool = False
    ) -> None:
        """The current target could not be connected: the flow picks the next one."""
        self.dialer.drop_attempts(conn)
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
        self.act(conn, action)

    def _redispatch(self, conn: Conn) -> None:
        """The target failed before any byte moved: close it, try the next (flow's rule 5)."""
        flow = conn.flow
        self._metrics.ended(conn.app.config.name, flow.dropped, "target-early-error", 0, 0)
        conn.interest(self.loop, 0, conn.tmask)
        self._close_target(conn)
        self._connect(conn)

    def _close_target(self, conn: Conn) -> None:
        if conn.target is not None:
            self.loop.fds.pop(conn.tfd, None)
            conn.target.close()
            conn.target, conn.tfd, conn.tmask = None, -1, 0
        for way in (conn.up, conn.down):
            if way is not None:
                way.close_pipe()
        conn.up = conn.down = None
        conn.header = None

    # -- relay's reports ----------------------------------------------------------------

    def _eof(self, conn: Conn, side: Side) -> None:
        self.act(conn, conn.flow.eof(side))

    def _relay_error(self, conn: Conn, side: Side, exc: OSError) -> None:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        self.act(conn, conn.flow.error(side, why, moved=conn.moved))

    # -- the end --------------------------------------------------------------------------

    def finish(self, conn: Conn, action: Action) -> None:
        """The one teardown: the flow is CLOSED; close (or reset, as `action` says) and
        account. A second call for the same connection does nothing."""
        try:
            self.conns.remove(conn)
        except KeyError:  # ended already
            return
        conn.gen += 1
        flow = conn.flow
        fds = self.loop.fds
        fds.pop(conn.cfd, None)
        if conn.attempts or conn.addresses:
            self.dialer.drop_attempts(conn)
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
        conn.up = conn.down = conn.header = conn.sniffer = None
        conn.hbuf = b""
        if conn.attempt_errors:
            conn.attempt_errors = []
        ticket = conn.ticket
        ticket.release()  # the slot and every count, here only
        if ticket.app is None:  # refused at routing: counted as rejected, not ended
            conn.target = None
            return
        name = conn.app.config.name
        connected = conn.target is not None
        used = flow.target if connected else None
        self._metrics.ended(name, used, flow.reason, conn.up_bytes, conn.down_bytes)
        if self.loop.debug:
            log.debug(
                "conn %s client=%s port=%d app=%s target=%s up=%d down=%d duration=%.3fs "
                "end=%s%s%s", conn.cid, _peer(conn.peer), conn.port, name, used or "-",
                conn.up_bytes, conn.down_bytes, time.monotonic() - conn.started, flow.end_label,
                f" failed-first={','.join(flow.failed)}" if flow.failed else "",
                f" name={conn.name}" if conn.name else "",
                extra={"conn": conn.cid},
            )  # fmt: skip
        conn.target = None
