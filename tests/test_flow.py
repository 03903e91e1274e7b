"""The connection state machine (tcpproxy/flow.py), without sockets."""

from __future__ import annotations

import pytest

from tcpproxy.config import Target
from tcpproxy.flow import TRANSITIONS, Action, Flow, FlowError, Side, State, Timeout
from tcpproxy.proxy_protocol import ProxyHeaderError, header_extent

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

A, B, C = Target("10.0.0.1", 80), Target("10.0.0.2", 80), Target("10.0.0.3", 80)


ORDER = [A, B, C]  # the try order a balancer would choose


def started(send_header: bool = False, **options: bool) -> Flow:
    """A flow accepted and routed at once (a port one app owns: rule 1)."""
    flow = Flow(**options)
    assert flow.accepted() is Action.ROUTE
    assert flow.state is State.ROUTING and flow.timeout is None  # answered at once
    flow.routed(send_header=send_header)
    return flow


def connecting(send_header: bool = False) -> Flow:
    """A flow of a plain connection (no header in, no first byte) connecting to A."""
    flow = Flow()
    assert flow.accepted() is Action.ROUTE
    assert flow.routed(send_header=send_header) is Action.CHOOSE
    assert flow.order_chosen(ORDER) is Action.CONNECT
    return flow


def relaying(send_header: bool = False) -> Flow:
    flow = connecting(send_header)
    assert flow.connected() is Action.RELAY
    return flow


def test_plain_connection_chooses_and_connects_at_once() -> None:
    flow = Flow()
    assert flow.accepted() is Action.ROUTE  # the engine routes at once
    assert flow.routed(send_header=False) is Action.CHOOSE  # ...and asks the balancer
    assert (flow.state, flow.target, flow.timeout) == (State.CHOOSING, None, None)
    assert flow.order_chosen(ORDER) is Action.CONNECT
    assert (flow.state, flow.target) == (State.CONNECTING, A)
    assert flow.timeout is Timeout.CONNECT
    assert flow.connected() is Action.RELAY
    assert flow.timeout is Timeout.IDLE


def test_an_empty_try_order_is_no_target() -> None:
    flow = started()
    assert flow.order_chosen([]) is Action.CLOSE
    assert (flow.state, flow.end_label, flow.target) == (State.CLOSED, "no-target", None)


def test_header_then_first_byte_then_connect_then_header_out() -> None:
    flow = Flow(accept_header=True, first_byte=True)
    assert flow.accepted() is Action.ROUTE
    assert flow.routed(send_header=True) is Action.READ_HEADER
    assert flow.timeout is Timeout.HEADER_IN
    assert flow.header_read() is Action.WAIT_FIRST_BYTE
    assert flow.timeout is Timeout.FIRST_BYTE
    assert flow.first_byte() is Action.CHOOSE
    assert flow.order_chosen([B, A]) is Action.CONNECT
    assert flow.target == B
    assert flow.connected() is Action.SEND_HEADER
    assert flow.timeout is Timeout.HEADER_OUT
    assert flow.header_sent() is Action.RELAY


@pytest.mark.parametrize(
    ("options", "event", "label"),
    [
        ({"accept_header": True}, lambda f: f.header_failed("bad"), "client-error (PROXY header)"),
        (
            {"accept_header": True},
            lambda f: f.timed_out(Timeout.HEADER_IN),
            "client-error (PROXY header)",
        ),
        ({"first_byte": True}, lambda f: f.timed_out(Timeout.FIRST_BYTE), "first-byte-timeout"),
    ],
)
def test_client_side_failures_before_any_target_close_the_client(options, event, label) -> None:
    flow = started(**options)
    assert event(flow) is Action.CLOSE
    assert (flow.state, flow.end_label, flow.target) == (State.CLOSED, label, None)


def test_failover_tries_each_target_once_then_no_target() -> None:
    flow = connecting()
    assert flow.connect_failed("connection refused") is Action.CONNECT
    assert flow.target == B
    assert flow.timed_out(Timeout.CONNECT, "no answer within 2s") is Action.CONNECT
    assert flow.target == C
    assert flow.connect_failed("connection refused") is Action.CLOSE
    assert flow.end_label == "no-target"
    assert [why for _, why in flow.failures] == [
        "connection refused",
        "no answer within 2s",
        "connection refused",
    ]


def test_targets_that_failed_before_the_one_used_are_logged() -> None:
    flow = connecting()
    flow.connect_failed("connection refused")
    assert flow.connected() is Action.RELAY
    assert flow.failed == [f"{A}(connection refused)"]  # the log says why


def test_our_own_failure_blames_no_target_and_tries_no_other() -> None:
    flow = connecting()
    assert flow.connect_failed("too many open files", ours=True) is Action.CLOSE
    assert (flow.end_label, flow.failures) == ("no-resources", [])


def test_half_close_is_forwarded_then_both_close_without_a_second_shutdown() -> None:
    flow = relaying()
    assert flow.eof(Side.CLIENT) is Action.SHUTDOWN_TARGET
    assert flow.state is State.RELAY
    assert flow.eof(Side.TARGET) is Action.CLOSE
    assert flow.end_label == "done"
    flow2 = relaying()
    assert flow2.eof(Side.TARGET) is Action.SHUTDOWN_CLIENT
    assert flow2.eof(Side.CLIENT) is Action.CLOSE


def test_errors_reset_the_other_side() -> None:
    flow = relaying()
    assert flow.error(Side.CLIENT, "Connection reset by peer") is Action.ABORT_TARGET
    assert flow.end_label == "client-error (Connection reset by peer)"
    flow = relaying()
    assert flow.error(Side.TARGET, "Broken pipe") is Action.ABORT_CLIENT
    assert flow.end_label == "target-error (Broken pipe)"


def test_target_failing_before_any_byte_redispatches_then_aborts_the_client() -> None:
    flow = relaying()
    assert flow.error(Side.TARGET, "Connection reset by peer", moved=False) is Action.REDISPATCH
    assert (flow.state, flow.target, flow.dropped) == (State.CONNECTING, B, A)
    assert flow.connected() is Action.RELAY
    assert flow.error(Side.TARGET, "Connection reset by peer", moved=False) is Action.REDISPATCH
    flow.connected()
    assert flow.error(Side.TARGET, "Connection reset by peer", moved=False) is Action.ABORT_CLIENT
    assert flow.end_label == "target-early-error (Connection reset by peer)"
    assert flow.failed == [f"{A}(connection reset by peer)", f"{B}(connection reset by peer)"]


def test_a_target_refusing_our_header_is_early_even_if_the_client_spoke() -> None:
    flow = connecting(send_header=True)
    flow.connected()
    assert flow.timed_out(Timeout.HEADER_OUT, "PROXY header not taken within 2s") is (
        Action.REDISPATCH
    )
    flow.connected()
    assert flow.error(Side.TARGET, "broken pipe") is Action.REDISPATCH


def test_redispatch_forgets_the_half_close_of_the_dropped_target() -> None:
    flow = relaying()
    flow.eof(Side.TARGET)  # the target closed at once, cleanly: a "done" stream so far
    assert flow.error(Side.TARGET, "Connection reset by peer", moved=False) is Action.REDISPATCH
    flow.connected()
    assert flow.eof(Side.CLIENT) is Action.SHUTDOWN_TARGET


def test_idle_timeout_and_cancel() -> None:
    flow = relaying()
    assert flow.timed_out(Timeout.IDLE) is Action.CLOSE
    assert flow.end_label == "idle-timeout"
    flow = started(accept_header=True)
    assert flow.cancel() is Action.ABORT_BOTH
    assert flow.end_label == "cancelled"


# every (state, event) pair not in the table is refused
EVENTS = {
    "accepted": lambda f: f.accepted(),
    "routed": lambda f: f.routed(send_header=True),
    "route_failed": lambda f: f.route_failed("over-limit", reset=True),
    "inspecting": lambda f: f.inspecting(),
    "header_read": lambda f: f.header_read(),
    "header_failed": lambda f: f.header_failed("x"),
    "first_byte": lambda f: f.first_byte(),
    "order_chosen": lambda f: f.order_chosen(ORDER),
    "connected": lambda f: f.connected(),
    "connect_failed": lambda f: f.connect_failed("x"),
    "header_sent": lambda f: f.header_sent(),
    "eof": lambda f: f.eof(Side.CLIENT),
    "error": lambda f: f.error(Side.CLIENT, "x"),
    "timeout": lambda f: f.timed_out(f.timeout or Timeout.IDLE, "x"),
    "cancel": lambda f: f.cancel(),
    "crashed": lambda f: f.crashed(),
}
# how to bring a fresh flow into each state (with every option on, so all are reachable)
TO_CHOOSING = ["accepted", "routed", "header_read", "first_byte"]
TO_CONNECTING = [*TO_CHOOSING, "order_chosen"]
REACH = {
    State.NEW: [],
    State.ROUTING: ["accepted"],
    State.INSPECTING: ["accepted", "inspecting"],
    State.HEADER_IN: ["accepted", "routed"],
    State.FIRST_BYTE: ["accepted", "routed", "header_read"],
    State.CHOOSING: TO_CHOOSING,
    State.CONNECTING: TO_CONNECTING,
    State.HEADER_OUT: [*TO_CONNECTING, "connected"],
    State.RELAY: [*TO_CONNECTING, "connected", "header_sent"],
    State.CLOSED: ["accepted", "cancel"],
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(EVENTS))
def test_every_state_and_event_follows_the_table(state: State, event: str) -> None:
    flow = Flow(accept_header=True, first_byte=True)
    for step in REACH[state]:
        EVENTS[step](flow)
    assert flow.state is state
    allowed = TRANSITIONS.get((state, event))
    if allowed is None:
        with pytest.raises(FlowError):
            EVENTS[event](flow)
        assert flow.state is state  # a refused event changes nothing
    else:
        action = EVENTS[event](flow)
        assert isinstance(action, Action)
        assert flow.state in allowed


@pytest.mark.parametrize("state", list(State))
def test_a_crash_in_any_state_ends_it_as_an_internal_error(state: State) -> None:
    """Rule 7: what the engine did when a bug struck it, the flow's end says so (the
    engine used to write the flow's fields itself)."""
    flow = Flow(accept_header=True, first_byte=True)
    for step in REACH[state]:
        EVENTS[step](flow)
    assert flow.crashed() is Action.ABORT_BOTH
    assert (flow.state, flow.end_label) == (State.CLOSED, "internal-error")


@pytest.mark.parametrize(("reason", "reset"), [("no-route", False), ("over-limit", True)])
def test_a_refusal_at_routing_ends_before_any_target(reason: str, reset: bool) -> None:
    """Rule 1: no app, or the app's limit: closed or reset, no target touched."""
    flow = Flow(accept_header=True)
    assert flow.accepted() is Action.ROUTE
    action = flow.route_failed(reason, reset=reset)
    assert action is (Action.ABORT_CLIENT if reset else Action.CLOSE)
    assert (flow.state, flow.end_label, flow.target) == (State.CLOSED, reason, None)


@pytest.mark.parametrize("options", [{}, {"first_byte": True}, {"accept_header": True}])
def test_a_router_that_needs_bytes_routes_after_the_preamble(options) -> None:
    """Rule 1's later routers: the PROXY header and the first byte come first (what
    the client sends is what tells its app), then ROUTE, then the try order."""
    flow = Flow(route_late=True, **options)
    action = flow.accepted()
    if options.get("accept_header"):
        assert action is Action.READ_HEADER
        action = flow.header_read()
    if options.get("first_byte"):
        assert action is Action.WAIT_FIRST_BYTE
        action = flow.first_byte()
    assert (action, flow.state) == (Action.ROUTE, State.ROUTING)
    assert flow.routed(send_header=True) is Action.CHOOSE
    assert flow.order_chosen([A]) is Action.CONNECT
    assert flow.connected() is Action.SEND_HEADER


@pytest.mark.parametrize("first_byte", [False, True])
def test_inspecting_waits_for_the_name_then_routes(first_byte: bool) -> None:
    """Rule 1, a port told apart by name: after the PROXY header, INSPECTING (under
    InspectTimeout) until the engine routes; FirstByteTimeout is then the app's."""
    flow = Flow(route_late=True, accept_header=True, first_byte=True)
    assert flow.accepted() is Action.READ_HEADER
    assert flow.header_read() is Action.WAIT_FIRST_BYTE  # the port's, as before
    assert flow.first_byte() is Action.ROUTE
    assert flow.inspecting() is Action.INSPECT
    assert (flow.state, flow.timeout) == (State.INSPECTING, Timeout.INSPECT)
    with pytest.raises(FlowError):  # the engine decides what InspectTimeout means
        flow.timed_out(Timeout.INSPECT)
    action = flow.routed(send_header=False, first_byte=first_byte)
    assert action is (Action.WAIT_FIRST_BYTE if first_byte else Action.CHOOSE)


def test_a_refusal_while_inspecting_touches_no_target() -> None:
    flow = Flow(route_late=True)
    assert flow.accepted() is Action.ROUTE
    assert flow.inspecting() is Action.INSPECT
    assert flow.route_failed("inspect-timeout", reset=False) is Action.CLOSE
    assert (flow.state, flow.end_label, flow.target) == (State.CLOSED, "inspect-timeout", None)


def test_a_timeout_of_another_state_is_a_bug() -> None:
    flow = relaying()
    with pytest.raises(FlowError):
        flow.timed_out(Timeout.CONNECT)


V2 = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.mark.parametrize(
    ("data", "extent"),
    [
        (b"", None),
        (b"PRO", None),
        (b"PROXY TCP4 1.2.3.4", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET /", 32),
        (V2[:5], None),
        (V2 + b"\x21\x11", None),
        (V2 + b"\x21\x11\x00\x0c" + b"x" * 3, 28),
    ],
)
def test_header_extent_knows_where_the_header_ends(data: bytes, extent: int | None) -> None:
    assert header_extent(data) == extent


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"PROXY " + b"x" * 120, b"\r\n\r\nX"])
def test_header_extent_refuses_what_cannot_be_a_header(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        header_extent(data)


@pytest.mark.parametrize("options", [{"first_byte": True}, {"accept_header": True}])
def test_the_order_is_asked_for_only_when_the_client_is_ready(options) -> None:
    """A client silent behind a FirstByteTimeout or PROXY header holds no target:
    the flow asks for the try order (CHOOSE) once it may connect, not at accept."""
    flow = Flow(**options)
    assert flow.accepted() is Action.ROUTE
    assert flow.routed(send_header=False) in (Action.WAIT_FIRST_BYTE, Action.READ_HEADER)
    assert flow.target is None
    with pytest.raises(FlowError):  # no order taken before it is asked for
        flow.order_chosen(ORDER)
    action = flow.first_byte() if "first_byte" in options else flow.header_read()
    assert (action, flow.state, flow.target) == (Action.CHOOSE, State.CHOOSING, None)
    assert flow.order_chosen([B, A]) is Action.CONNECT
    assert flow.target == B
