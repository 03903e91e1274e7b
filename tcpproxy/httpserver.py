"""A small HTTP/1.1 server on trio, bounded by construction (what --metrics serves on).

h11 parses (sans-IO: it is fed the bytes read, it never reads a socket); this
module reads, writes, and holds the limits:

1. At most MAX_CLIENTS connections are open at once. The accept loop takes a
   slot before it accepts, so a client beyond the cap waits in the listen
   queue (BACKLOG) and costs no descriptor: the cap is reserved in the
   data plane's descriptor budget (cli_common.FDS_RESERVED) and never eats
   into it.
2. Each request has REQUEST_DEADLINE seconds from its first awaited byte to
   its last response byte (headers, body, and the reply read back by the
   client). A client that trickles a header line every few seconds is cut at
   the deadline, not kept by a per-read timeout.
3. No thread per connection: every connection is a trio task. A handler may
   push slow work to a thread, behind a limiter of its own.
4. What a client can cause (a timeout, a bad request, a reset) is logged at
   debug level; the cap reached and a handler's failure are warnings through
   one WarnLimiter, with no traceback: a flood costs a few lines.

Resource handling: the server owns the accepted sockets (closed in one
`finally`), not the listening socket, which its caller opened (`listen`) and
closes once `serve` returned (an upgrade hands it on: see tcpproxy.upgrade).

Two ways to end: `stop()` cuts every connection (the service ends); `hand_over()`
stops accepting, since another process accepts on the same socket from then on,
and lets each open connection finish the request it is in or about to send
(within its deadline), answered with "Connection: close"; `serve` returns once
they all closed.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from tcpproxy.errors import StartupError
from tcpproxy.listeners import ACCEPT_CAPACITY_ERRNOS, bind_hint
from tcpproxy.warnlimit import WarnLimiter

__all__ = [
    "BACKLOG",
    "MAX_CLIENTS",
    "REQUEST_DEADLINE",
    "HttpServer",
    "Request",
    "Response",
    "listen",
]

log = logging.getLogger("tcpproxy")

MAX_CLIENTS = 64  # connections served at once; reserved in cli_common.FDS_RESERVED
REQUEST_DEADLINE = 10.0  # seconds for a whole request: headers, body and the response sent
BACKLOG = 128  # the listen queue: where clients beyond MAX_CLIENTS wait
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers larger than this get a 431
MAX_BODY_BYTES = 64 * 1024  # a GET has no business sending more; 413 beyond
READ_SIZE = 16 * 1024  # bytes read at a time
ACCEPT_PAUSE = 0.1  # seconds accepting pauses after EMFILE and kin (as trio's serve_listeners)
CAP_REACHED = "metrics: %d clients served at once (the cap): more wait in the listen queue"
# the client went away or never finished: not our error, logged at debug level
_CLIENT_ERRORS = (
    trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError, h11.LocalProtocolError,
)  # fmt: skip


@dataclass(frozen=True)
class Request:
    method: str  # GET or HEAD (others are refused before the handler)
    path: str  # without the query
    query: str  # after '?', "" if none
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def listen(host: str, port: int, handed: socket.socket | None = None) -> socket.socket:
    """The listening socket: `handed` (an upgrade's, if on `port`; else closed), or a new one.

    No SO_REUSEPORT: a port another process serves (a second proxy, or a
    --workers listener) is refused at bind. Non-blocking: with two processes on
    one queue during an upgrade, the other may take a connection first.

    Raises StartupError naming the address when it cannot be bound.
    """
    if handed is not None:
        if handed.getsockname()[1] == port:
            handed.setblocking(False)
            handed.listen(BACKLOG)  # an older process's queue may have been shorter
            return handed
        handed.close()  # the old process served another port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(f"--metrics {host}:{port}: {bind_hint(exc)}") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """Serves `handler` on a listening socket within the limits of the module docstring."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.socket = sock  # what an upgrade hands over; the caller closes it
        self._handler = handler
        self._warn = WarnLimiter()
        self._scope = trio.CancelScope()  # everything: stop()
        self._accepting = trio.CancelScope()  # the accept loop: hand_over()
        self.handed_over = False

    def stop(self) -> None:
        """Stop serving (`serve` returns; open connections are cut)."""
        self._scope.cancel()

    def hand_over(self) -> None:
        """Accept no more, and close each connection after its next response (`serve`
        returns once none is open): the clients in the listen queue, and those that
        come later, are the process's that took the socket over."""
        self.handed_over = True
        self._accepting.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve until `stop()` or cancelled; or after `hand_over()`, until
        the connections open then are done."""
        listener = trio.socket.from_stdlib_socket(
            socket.socket(fileno=self.socket.fileno(), family=self.socket.family)
        )
        slots = trio.Semaphore(MAX_CLIENTS)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    task_status.started()
                    with self._accepting:
                        await self._accept(listener, slots, nursery)
        finally:
            listener.detach()  # the fd is the caller's socket's, closed by the caller

    async def _accept(
        self, listener: trio.socket.SocketType, slots: trio.Semaphore, nursery: trio.Nursery
    ) -> None:
        """Accept for ever, a connection per free slot, each served in `nursery`."""
        while True:
            if slots.value == 0:
                self._warn("http-cap", CAP_REACHED, MAX_CLIENTS)
            await slots.acquire()
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    self._warn("http-accept", "metrics: accept failed: %s", exc)
                    await trio.sleep(ACCEPT_PAUSE)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    raise
                continue
            nursery.start_soon(self._serve_client, trio.SocketStream(sock), slots)

    async def _serve_client(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        """One connection, request after request (keep-alive), each within the deadline."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while conn.our_state is h11.IDLE and conn.their_state is h11.IDLE:
                with trio.move_on_after(REQUEST_DEADLINE) as deadline:
                    await self._exchange(conn, stream)
                if deadline.cancelled_caught:
                    log.debug("metrics: a client took over %gs for a request", REQUEST_DEADLINE)
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                # else MUST_CLOSE or closed (an error, "Connection: close", a hand-over)
        except _CLIENT_ERRORS as exc:
            log.debug("metrics: client gone: %r", exc)
        finally:
            slots.release()
            await trio.aclose_forcefully(stream)

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        """Read one request, answer it; leaves `conn` DONE, or closed on an error."""
        try:
            request, too_large = await _read_request(conn, stream)
        except h11.RemoteProtocolError as exc:
            log.debug("metrics: bad request: %s", exc)
            if conn.our_state is h11.SEND_RESPONSE or conn.our_state is h11.IDLE:
                status = exc.error_status_hint
                await _send(conn, stream, Response(status, f"{status} bad request\n".encode()))
            return
        if request is None:  # the client closed between requests
            return
        if too_large:
            response = Response(413, b"a request body is not expected here\n")
        elif request.method not in (b"GET", b"HEAD"):
            response = Response(405, b"only GET and HEAD\n", headers=(("Allow", "GET, HEAD"),))
        else:
            target = request.target.decode("ascii", "replace")
            path, _, query = target.partition("?")
            method = request.method.decode()
            try:
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
                response = await self._handler(Request(method, path, query, headers))
            except Exception as exc:  # a bug of ours: answered and logged, never a traceback
                self._warn("http-handler", "metrics: %s %s failed: %r", method, path, exc)
                response = Response(500, b"internal error, see the proxy's log\n")
        await _send(conn, stream, response, request.method == b"HEAD", self.handed_over)


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request | None, bool]:
    """The next request and whether its body was too large; None if the client closed."""
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            conn.receive_data(data)  # b"": end of stream, which h11 turns into an event
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None, False
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY_BYTES:
                return request, True
        elif isinstance(event, h11.EndOfMessage):
            return request, False


async def _send(
    conn: h11.Connection,
    stream: trio.SocketStream,
    response: Response,
    head_only: bool = False,
    last: bool = False,
) -> None:
    """Send `response`; close after it if it is an error, the `last` (a hand-over), or
    the client asked to."""
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        *response.headers,
    ]
    if response.status >= 400 or last:
        headers.append(("Connection", "close"))
    reason = HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if not head_only and response.body:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
