"""One proxied connection's life as a state machine, with no I/O (h11 style).

The epoll engine (tcpproxy/engine/) does the syscalls and feeds what
happened in as events (a method call each); the flow answers with the one
`Action` the engine must take next. What to do is decided here, so it is
tested without sockets: the try order and its failover, the redispatch rule,
half-close, and why the connection ended (the splice.EndReason values, as
logs and metrics name them). The flow holds no reference to anything shared:
the try order comes in as data, and what a connection counts against is the
engine's to record (admission.Ticket).

Rules:
1. Routing: accepted -> ROUTE: the engine asks the port's router which app
   the connection is for, admits it to that app (its limits) and hands the
   app's facts in (`routed`), or its refusal (`route_failed`: "no-route" is
   closed, a limit's refusal reset). A port one app owns routes at once, at
   accept. A router that must see the client's first bytes (`route_late`:
   apps sharing a port, told apart by what the client sends) routes after
   the PROXY header of rule 2 instead, from bytes peeked, not taken: while
   they do not tell the app yet, the engine says `inspecting` (INSPECTING,
   under the port's InspectTimeout), then `routed` or `route_failed` as
   the bytes, or the timeout, decide (the engine's choice: a client that
   said nothing goes to the port's default app). There, FirstByteTimeout
   is the routed app's, from its routing on (`routed(first_byte=...)`).
2. The preamble: READ_HEADER if the port accepts PROXY headers, then
   WAIT_FIRST_BYTE if it has a FirstByteTimeout, then (routed) CHOOSE: the
   engine asks the app's balancer for the try order at once and hands it in
   (`order_chosen`), and the flow CONNECTs its first target (an empty order:
   "no-target"). The order is asked for only then, not at accept: a client
   silent behind a PROXY header or a FirstByteTimeout neither counts against
   a target nor gets one chosen long before it speaks. A bad or late header
   ends with "client-error (PROXY header)", a silent client with
   "first-byte-timeout" (both: close the client, no target was touched).
3. Connecting: success -> SEND_HEADER if the app sends PROXY headers, else
   RELAY. A failure (refused, unresolvable, timeout) -> CONNECT the next target
   of the order, each tried once; none left -> "no-target". A failure of ours
   (out of descriptors) -> "no-resources" at once, blaming no target.
4. Relay: an EOF from one side -> SHUTDOWN_WRITE the other side, unless the
   other direction has already ended: then CLOSE both (no shutdown where
   both sides close anyway). The end reason is then "done".
5. An error on one side -> abort the OTHER side (RST) and end with
   "client-error"/"target-error". Except the redispatch rule: a target that
   fails before a single byte moved either way (or refuses our PROXY header)
   is "target-early-error": the client never knew it, so the next target is
   tried (REDISPATCH); with none left, the client is aborted.
6. An idle timeout ends with "idle-timeout" (close both); a cancel (shutdown
   cut) ends with "cancelled" (abort both: neither peer takes it for complete).
7. A bug in the engine while serving the connection (`crashed`, in any state,
   even closed: the teardown may be what failed) ends it with "internal-error":
   abort both, as a cut does.
8. An event a state does not expect is a bug (FlowError), never ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from tcpproxy.config import Target
from tcpproxy.splice import EndReason

__all__ = ["TRANSITIONS", "Action", "Flow", "FlowError", "Side", "State", "Timeout"]


class State(enum.Enum):
    NEW = "new"
    ROUTING = "routing"  # waiting for the app (the engine routes and admits at once)
    INSPECTING = "inspecting"  # waiting for the client's first bytes to tell its app
    HEADER_IN = "header-in"  # reading the balancer's PROXY header
    FIRST_BYTE = "first-byte"  # waiting for the client to say something
    CHOOSING = "choosing"  # waiting for the try order (the engine hands it in at once)
    CONNECTING = "connecting"  # connecting to `Flow.target` (resolution included)
    HEADER_OUT = "header-out"  # sending our PROXY header to the target
    RELAY = "relay"  # bytes both ways, half-close forwarded
    CLOSED = "closed"


class Action(enum.Enum):
    ROUTE = "route"  # choose the app and admit to it: `routed` or `route_failed`
    INSPECT = "inspect"  # wait for more of the client's bytes (InspectTimeout) to route
    READ_HEADER = "read-header"
    WAIT_FIRST_BYTE = "wait-first-byte"
    CHOOSE = "choose"  # ask the app's balancer for the try order: `order_chosen`
    CONNECT = "connect"  # connect to Flow.target
    SEND_HEADER = "send-header"
    RELAY = "relay"
    REDISPATCH = "redispatch"  # close the target socket, then connect to Flow.target
    SHUTDOWN_CLIENT = "shutdown-client"  # shutdown(SHUT_WR) towards the client
    SHUTDOWN_TARGET = "shutdown-target"  # shutdown(SHUT_WR) towards the target
    CLOSE = "close"  # close both sockets (orderly)
    ABORT_CLIENT = "abort-client"  # RST the client, close the target
    ABORT_TARGET = "abort-target"  # RST the target, close the client
    ABORT_BOTH = "abort-both"  # RST both: the proxy cut the connection short


class Side(enum.Enum):
    CLIENT = "client"
    TARGET = "target"


class Timeout(enum.Enum):
    HEADER_IN = "header-in"
    INSPECT = "inspect"
    FIRST_BYTE = "first-byte"
    CONNECT = "connect"
    HEADER_OUT = "header-out"
    IDLE = "idle"


# Python 3.11 reads an enum member through its class (`State.RELAY`) by way of
# EnumType.__getattr__, about 80 ns a read; every event of every connection reads
# several, so the flow and the engine read these module globals instead (10 ns).
S_NEW, S_HEADER_IN, S_FIRST_BYTE = State.NEW, State.HEADER_IN, State.FIRST_BYTE
S_ROUTING, S_INSPECTING, S_CHOOSING = State.ROUTING, State.INSPECTING, State.CHOOSING
S_CONNECTING, S_HEADER_OUT, S_RELAY, S_CLOSED = (
    State.CONNECTING, State.HEADER_OUT, State.RELAY, State.CLOSED
)  # fmt: skip
A_ROUTE, A_INSPECT, A_READ_HEADER, A_WAIT_FIRST_BYTE, A_CHOOSE = (
    Action.ROUTE, Action.INSPECT, Action.READ_HEADER, Action.WAIT_FIRST_BYTE, Action.CHOOSE
)  # fmt: skip
A_CONNECT, A_SEND_HEADER, A_RELAY = Action.CONNECT, Action.SEND_HEADER, Action.RELAY
A_REDISPATCH, A_CLOSE = Action.REDISPATCH, Action.CLOSE
A_SHUTDOWN_CLIENT, A_SHUTDOWN_TARGET = Action.SHUTDOWN_CLIENT, Action.SHUTDOWN_TARGET
A_ABORT_CLIENT, A_ABORT_TARGET, A_ABORT_BOTH = (
    Action.ABORT_CLIENT, Action.ABORT_TARGET, Action.ABORT_BOTH
)  # fmt: skip
SIDE_CLIENT, SIDE_TARGET = Side.CLIENT, Side.TARGET


class FlowError(Exception):
    """An event the flow's state does not expect: a bug in the engine."""


# The transition table: (state, event) -> the states it may lead to. Events are
# the Flow's methods; where an event has more than one outcome, the method's
# docstring says which rule picks it. Anything not listed is a FlowError.
_ANY_LIVE = (
    State.ROUTING, State.INSPECTING, State.HEADER_IN, State.FIRST_BYTE, State.CHOOSING,
    State.CONNECTING, State.HEADER_OUT, State.RELAY,
)  # fmt: skip
TRANSITIONS: dict[tuple[State, str], tuple[State, ...]] = {
    (State.NEW, "accepted"): (State.ROUTING, State.HEADER_IN, State.FIRST_BYTE),
    (State.ROUTING, "routed"): (State.HEADER_IN, State.FIRST_BYTE, State.CHOOSING),
    (State.ROUTING, "route_failed"): (State.CLOSED,),
    (State.ROUTING, "inspecting"): (State.INSPECTING,),
    (State.INSPECTING, "routed"): (State.FIRST_BYTE, State.CHOOSING),
    (State.INSPECTING, "route_failed"): (State.CLOSED,),
    (State.HEADER_IN, "header_read"): (State.FIRST_BYTE, State.ROUTING, State.CHOOSING),
    (State.HEADER_IN, "header_failed"): (State.CLOSED,),
    (State.HEADER_IN, "timeout"): (State.CLOSED,),
    (State.FIRST_BYTE, "first_byte"): (State.ROUTING, State.CHOOSING),
    (State.FIRST_BYTE, "timeout"): (State.CLOSED,),
    (State.CHOOSING, "order_chosen"): (State.CONNECTING, State.CLOSED),
    (State.CONNECTING, "connected"): (State.HEADER_OUT, State.RELAY),
    (State.CONNECTING, "connect_failed"): (State.CONNECTING, State.CLOSED),
    (State.CONNECTING, "timeout"): (State.CONNECTING, State.CLOSED),
    (State.HEADER_OUT, "header_sent"): (State.RELAY,),
    (State.HEADER_OUT, "error"): (State.CONNECTING, State.CLOSED),
    (State.HEADER_OUT, "timeout"): (State.CONNECTING, State.CLOSED),
    (State.RELAY, "eof"): (State.RELAY, State.CLOSED),
    (State.RELAY, "error"): (State.CONNECTING, State.CLOSED),
    (State.RELAY, "timeout"): (State.CLOSED,),
    **{(state, "cancel"): (State.CLOSED,) for state in (State.NEW, *_ANY_LIVE)},
    # a bug may strike after the flow closed, before the engine's teardown
    **{(state, "crashed"): (State.CLOSED,) for state in (State.NEW, *_ANY_LIVE, State.CLOSED)},
}
# Each event's allowed states, from the table: a check by identity per event (a
# (state, event) key would hash the enum in Python on every event of every connection).
_FROM: dict[str, tuple[State, ...]] = {}
for _state, _event in TRANSITIONS:
    _FROM[_event] = (*_FROM.get(_event, ()), _state)
_ON_ACCEPTED = _FROM["accepted"]
_ON_ROUTED = _FROM["routed"]
_ON_ROUTE_FAILED = _FROM["route_failed"]
_ON_INSPECTING = _FROM["inspecting"]
_ON_HEADER_READ = _FROM["header_read"]
_ON_HEADER_FAILED = _FROM["header_failed"]
_ON_FIRST_BYTE = _FROM["first_byte"]
_ON_ORDER_CHOSEN = _FROM["order_chosen"]
_ON_CONNECTED = _FROM["connected"]
_ON_CONNECT_FAILED = _FROM["connect_failed"]
_ON_HEADER_SENT = _FROM["header_sent"]
_ON_EOF = _FROM["eof"]
_ON_ERROR = _FROM["error"]
_ON_TIMEOUT = _FROM["timeout"]
_ON_CANCEL = _FROM["cancel"]
_ON_CRASHED = _FROM["crashed"]
# End reasons as plain strings (an enum's .value is a Python-level property)
_DONE, _CANCELLED, _IDLE = EndReason.DONE.value, EndReason.CANCELLED.value, EndReason.IDLE.value
_CLIENT_ERROR, _TARGET_ERROR = EndReason.CLIENT_ERROR.value, EndReason.TARGET_ERROR.value
_TARGET_EARLY_ERROR = EndReason.TARGET_EARLY_ERROR.value

# the timeout each state arms (the engine keeps one phase timer per connection); ROUTING
# and CHOOSING have none: the engine answers them at once
_TIMEOUTS = {
    State.INSPECTING: Timeout.INSPECT,  # the engine decides its outcome (rule 1)
    State.HEADER_IN: Timeout.HEADER_IN,
    State.FIRST_BYTE: Timeout.FIRST_BYTE,
    State.CONNECTING: Timeout.CONNECT,
    State.HEADER_OUT: Timeout.HEADER_OUT,
    State.RELAY: Timeout.IDLE,
}


class Flow:
    """One connection's state: where it is, which targets are left, how it ended.

    Args:
      accept_header: the port's AcceptProxyProtocol (its apps agree on it).
      first_byte: whether the port's apps have a FirstByteTimeout.
      route_late: route after the preamble (rule 1), not at accept.
    """

    __slots__ = (
        "_accept_header",
        "_first_byte",
        "_next",
        "_order",
        "_route_late",
        "_routed",
        "_send_header",
        "client_done",
        "dropped",
        "failed",
        "failures",
        "reason",
        "state",
        "target",
        "target_done",
        "why",
    )

    def __init__(
        self,
        *,
        accept_header: bool = False,
        first_byte: bool = False,
        route_late: bool = False,
    ) -> None:
        self._order: Sequence[Target] = ()  # handed in by `order_chosen` (rule 2)
        self._next = 0  # index in order of the next target to try
        self._accept_header = accept_header
        self._send_header = False  # the app's SendProxyProtocol: known once routed
        self._first_byte = first_byte
        self._route_late = route_late
        self._routed = False
        self.state = S_NEW
        self.target: Target | None = None  # being connected, or connected
        self.failures: list[tuple[Target, str]] = []  # failed connects: (target, why)
        self.failed: list[str] = []  # targets given up before the one used, for the log line
        self.dropped: Target | None = None  # the target the last REDISPATCH gave up
        self.reason = _CANCELLED  # the end reason, once CLOSED
        self.why = ""  # the detail of an error end
        self.client_done = False  # the client sent EOF (client -> target direction ended)
        self.target_done = False  # the target sent EOF

    # -- helpers --------------------------------------------------------------

    def _refuse(self, event: str) -> FlowError:
        return FlowError(f"event {event!r} in state {self.state.value}")

    def _end(self, reason: str, error: str = "") -> None:
        self.state, self.reason, self.why = S_CLOSED, reason, error

    def _connect_next(self) -> Action | None:
        """Rule 3: CONNECT the next untried target; None when none is left."""
        if self._next >= len(self._order):
            return None
        self.target = self._order[self._next]
        self._next += 1
        self.state = S_CONNECTING
        self.client_done = self.target_done = False
        return A_CONNECT

    def _preamble(self) -> Action:
        """Rule 2, from its start."""
        if self._accept_header:
            self.state = S_HEADER_IN
            return A_READ_HEADER
        return self._after_header()

    def _after_header(self) -> Action:
        if self._first_byte:
            self.state = S_FIRST_BYTE
            return A_WAIT_FIRST_BYTE
        return self._ready()

    def _ready(self) -> Action:
        """The preamble is over: ROUTE (if not routed yet: rule 1), else CHOOSE."""
        if not self._routed:
            self.state = S_ROUTING
            return A_ROUTE
        self.state = S_CHOOSING
        return A_CHOOSE

    @property
    def timeout(self) -> Timeout | None:
        """The timeout the current state runs under (None once closed)."""
        return _TIMEOUTS.get(self.state)

    @property
    def end_label(self) -> str:
        """The end as logged: the reason, with the error's detail if any."""
        return f"{self.reason} ({self.why})" if self.why else self.reason

    # -- events ---------------------------------------------------------------

    def accepted(self) -> Action:
        """Rule 1."""
        if self.state not in _ON_ACCEPTED:
            raise self._refuse("accepted")
        if not self._route_late:
            self.state = S_ROUTING
            return A_ROUTE
        return self._preamble()

    def routed(self, *, send_header: bool, first_byte: bool = False) -> Action:
        """Rule 1: the app is chosen and admitted; `send_header`: its SendProxyProtocol;
        `first_byte` (after INSPECTING): wait for the client under the app's
        FirstByteTimeout first (it was routed without a byte)."""
        if self.state not in _ON_ROUTED:
            raise self._refuse("routed")
        self._routed = True
        self._send_header = send_header
        if self.state is S_INSPECTING:
            self._first_byte = first_byte
            return self._after_header()
        return self._ready() if self._route_late else self._preamble()

    def inspecting(self) -> Action:
        """Rule 1: the client's bytes so far do not tell its app: INSPECT (wait for
        more, under InspectTimeout)."""
        if self.state not in _ON_INSPECTING:
            raise self._refuse("inspecting")
        self.state = S_INSPECTING
        return A_INSPECT

    def route_failed(self, reason: str, *, reset: bool) -> Action:
        """Rule 1: no app for the connection, or its app refused it (`reason`, as
        admission names it); `reset`: the client is reset, else closed."""
        if self.state not in _ON_ROUTE_FAILED:
            raise self._refuse("route_failed")
        self._end(reason)
        return A_ABORT_CLIENT if reset else A_CLOSE

    def header_read(self) -> Action:
        """Rule 2: the balancer's header is consumed."""
        if self.state not in _ON_HEADER_READ:
            raise self._refuse("header_read")
        return self._after_header()

    def header_failed(self, why: str) -> Action:
        """Rule 2: a bad header, or the client closed before one."""
        if self.state not in _ON_HEADER_FAILED:
            raise self._refuse("header_failed")
        self._end(_CLIENT_ERROR, "PROXY header")
        return A_CLOSE

    def first_byte(self) -> Action:
        """Rule 2: the client sent something (or closed): route or choose, then connect."""
        if self.state not in _ON_FIRST_BYTE:
            raise self._refuse("first_byte")
        return self._ready()

    def order_chosen(self, order: Sequence[Target]) -> Action:
        """Rule 2: the try order, every target once, the balancer's choice first
        (`Balancer.order`); CONNECT its first target."""
        if self.state not in _ON_ORDER_CHOSEN:
            raise self._refuse("order_chosen")
        self._order = order
        action = self._connect_next()
        if action is None:
            self._end("no-target")
            return A_CLOSE
        return action

    def connected(self) -> Action:
        """Rule 3: the target answered."""
        if self.state not in _ON_CONNECTED:
            raise self._refuse("connected")
        if self.failures:
            self.failed.extend(f"{t}({why})" for t, why in self.failures)
            self.failures = []
        if self._send_header:
            self.state = S_HEADER_OUT
            return A_SEND_HEADER
        self.state = S_RELAY
        return A_RELAY

    def connect_failed(self, why: str, *, ours: bool = False) -> Action:
        """Rule 3: the target failed (`ours`: the failure is this process's, not its)."""
        if self.state not in _ON_CONNECT_FAILED:
            raise self._refuse("connect_failed")
        if ours:
            self._end("no-resources")
            return A_CLOSE
        assert self.target is not None
        self.failures.append((self.target, why))
        action = self._connect_next()
        if action is None:
            self._end("no-target")
            return A_CLOSE
        return action

    def header_sent(self) -> Action:
        if self.state not in _ON_HEADER_SENT:
            raise self._refuse("header_sent")
        self.state = S_RELAY
        return A_RELAY

    def eof(self, side: Side) -> Action:
        """Rule 4: `side` ended its stream cleanly."""
        if self.state not in _ON_EOF:
            raise self._refuse("eof")
        if side is SIDE_CLIENT:
            self.client_done = True
            other_done, action = self.target_done, A_SHUTDOWN_TARGET
        else:
            self.target_done = True
            other_done, action = self.client_done, A_SHUTDOWN_CLIENT
        if other_done:
            self._end(_DONE)
            return A_CLOSE
        return action

    def error(self, side: Side, why: str, *, moved: bool = True) -> Action:
        """Rule 5: `side` failed; `moved`: a byte was taken from either side already.

        In HEADER_OUT the target refusing our header is early by definition.
        """
        if self.state not in _ON_ERROR:
            raise self._refuse("error")
        if side is SIDE_TARGET and (not moved or self.state is S_HEADER_OUT):
            return self._early(why)
        if side is SIDE_CLIENT:
            self._end(_CLIENT_ERROR, why)
            return A_ABORT_TARGET
        self._end(_TARGET_ERROR, why)
        return A_ABORT_CLIENT

    def _early(self, why: str) -> Action:
        """Rule 5's exception: redispatch to the next target, or abort the client."""
        dropped = self.target
        if self._connect_next() is None:  # the last target's failure is the end reason
            self._end(_TARGET_EARLY_ERROR, why)
            return A_ABORT_CLIENT
        self.failed.append(f"{dropped}({why.lower()})")
        self.dropped = dropped
        return A_REDISPATCH

    def timed_out(self, kind: Timeout, detail: str = "") -> Action:
        """The current state's timeout (`kind` must be it) ran out; `detail` says how long."""
        if self.state not in _ON_TIMEOUT:
            raise self._refuse("timeout")
        if kind is not self.timeout or kind is Timeout.INSPECT:  # INSPECT: the engine's
            raise FlowError(f"timeout {kind.value} in state {self.state.value}")
        if kind is Timeout.HEADER_IN:
            self._end(_CLIENT_ERROR, "PROXY header")
            return A_CLOSE
        if kind is Timeout.FIRST_BYTE:
            self._end("first-byte-timeout")
            return A_CLOSE
        if kind is Timeout.CONNECT:
            return self.connect_failed(detail)
        if kind is Timeout.HEADER_OUT:
            return self._early(detail)
        self._end(_IDLE)
        return A_CLOSE

    def cancel(self) -> Action:
        """Rule 6: the proxy cuts the connection (shutdown): both peers see a reset,
        so neither takes a cut-off stream for a complete one."""
        if self.state not in _ON_CANCEL:
            raise self._refuse("cancel")
        self._end(_CANCELLED)
        return A_ABORT_BOTH

    def crashed(self) -> Action:
        """Rule 7: the engine failed while serving this connection (a bug)."""
        if self.state not in _ON_CRASHED:
            raise self._refuse("crashed")
        self._end("internal-error")
        return A_ABORT_BOTH
