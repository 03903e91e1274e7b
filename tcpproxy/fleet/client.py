"""An etcd v3 client for trio, over the JSON gateway that every etcd member serves.

Why the gateway: no maintained etcd v3 client supports trio (the gRPC ones are
asyncio or threads), while the gateway (``POST /v3/kv/range`` and friends, keys and
values in base64, 64-bit numbers as strings) is part of etcd itself, served on the
client port, and httpx speaks it under trio through anyio. Only what the fleet needs
is here: range, put, delete, transactions, leases, watch, compaction, auth.

Error handling: every call tries the endpoints in turn, starting with the last one
that answered, and keeps going round them with a short back-off for at most
``retry_for`` seconds (a leader election makes every member refuse writes for about
a second); then it raises `EtcdUnavailable` naming each endpoint's last failure.
Errors etcd answers with (a bad request, auth refused, a compacted revision) are not
retried: they raise `EtcdError` subclasses at once.

Liveness: a member can hang without closing its sockets (its process stopped, a
partition that sends no RST, cut off from the quorum); TCP keepalive notices only
a vanished host, and etcd's progress notifications come every 10 minutes. So every
attempt of a call is bounded as a whole (``request_timeout``; a lease keep-alive
by `KEEPALIVE_TIMEOUT`), and a watch that has been silent for ``probe_every``
seconds has its member probed: one linearizable read of a single key, which a
member must answer within ``probe_timeout``; when it does not, the watch moves to
the next endpoint and resumes there. A hung member therefore delays a change by
at most ``probe_every + probe_timeout`` (8 s) and loses none.

Resource handling: `EtcdClient` owns one connection pool for unary calls, closed
on exit from ``async with``. Each `Watch` owns a pool of its own holding its one
streaming connection, closed when the watch is closed, cancelled or reconnects, so
no socket outlives it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from tcpproxy.fleet.url import EtcdTarget

__all__ = [
    "KV",
    "EtcdAuthFailed",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdConflict",
    "EtcdError",
    "EtcdLeaseExpired",
    "EtcdUnavailable",
    "Event",
    "Watch",
    "prefix_range_end",
]

log = logging.getLogger("tcpproxy")

CONNECT_TIMEOUT = 1.0  # seconds; a member on a live network answers a SYN in milliseconds
REQUEST_TIMEOUT = 5.0  # seconds for one attempt of a call: etcd's own request timeout is ~5 s
# A lease keep-alive's attempt gets less, so a hung member and the next one's answer
# fit well inside a lease's TTL (publish.py: a keep-alive every 3.3 s of a 10 s TTL).
KEEPALIVE_TIMEOUT = 2.0
# A silent watch's member is probed this often; the probe (a linearizable read, a
# round trip to the leader) must answer within PROBE_TIMEOUT, or the watch moves on.
PROBE_EVERY = 5.0
PROBE_TIMEOUT = 3.0
RETRY_FOR = 3.0  # seconds a call keeps going round the endpoints before EtcdUnavailable
BACKOFF_FIRST = 0.05  # seconds between rounds of endpoints, doubling ...
BACKOFF_MAX = 0.5  # ... up to this
# TCP keepalive on watch streams: a member whose host vanished (no FIN, no RST) is
# noticed after KEEPIDLE + KEEPCNT * KEEPINTVL = 11 s instead of never.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3

# gRPC status codes etcd's gateway reports (google.golang.org/grpc/codes).
_CANCELLED = 1  # e.g. "grpc: the client connection is closing" from a member shutting down
_DEADLINE_EXCEEDED = 4
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_FAILED_PRECONDITION = 9
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16
_COMPACTED_MESSAGE = "required revision has been compacted"
_CN_REFUSED = "CommonName of client sending a request against gateway"


class EtcdError(Exception):
    """etcd answered with an error, or could not be reached (`EtcdUnavailable`)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the retry budget; ``failures`` says why for each."""

    def __init__(self, endpoints: str, failures: dict[str, str]) -> None:
        self.endpoints = endpoints
        self.failures = dict(failures)
        detail = "; ".join(f"{ep}: {why}" for ep, why in failures.items()) or "no attempt"
        super().__init__(f"etcd unavailable at {endpoints} ({detail})")


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted away; read again from `compact_revision`."""

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"etcd revision compacted (compacted up to {compact_revision})")


class EtcdConflict(EtcdError):
    """A transaction's guard failed: the keys changed since they were read; nothing applied."""


class EtcdLeaseExpired(EtcdError):
    """The lease is gone (expired or revoked): grant a new one."""


class EtcdAuthFailed(EtcdError):
    """Authentication refused, not enabled on the server, or no password in the environment."""


@dataclass(frozen=True)
class KV:
    """One key as read: ``mod_revision`` is the revision that last changed it."""

    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Event:
    """One change seen by a watch; ``value`` is None for a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None
    mod_revision: int


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with ``prefix`` (etcd's ``range_end``)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


class _Unresponsive(Exception):
    """A member that stopped answering (hung, or cut off): its watch moves on."""


_NOTHING: Any = object()  # no message read (yet)


class _GatewayError(Exception):
    """An error response: ``code`` is the gRPC status, ``message`` etcd's text."""

    def __init__(self, status: int, code: int, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(message)

    @property
    def retry_elsewhere(self) -> bool:
        """Whether another member may answer: no leader, timeouts, shutting down."""
        retry_codes = (_CANCELLED, _DEADLINE_EXCEEDED, _UNAVAILABLE)
        return self.code in retry_codes or self.status in (502, 503, 504)


class EtcdClient:
    """A client of one etcd cluster. Use as ``async with EtcdClient(target) as client:``.

    All methods are async and cancellable; see the module docstring for failover.
    No I/O happens before the first call, so entering never fails on a down cluster.
    """

    def __init__(
        self,
        target: EtcdTarget,
        *,
        retry_for: float = RETRY_FOR,
        request_timeout: float = REQUEST_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        probe_every: float = PROBE_EVERY,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.target = target
        self._bases = target.base_urls()
        self._names = [ep.split("://", 1)[1] for ep in self._bases]
        self._retry_for = retry_for
        self._request_timeout = request_timeout
        self._probe_every, self._probe_timeout = probe_every, probe_timeout
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self._connect_timeout = connect_timeout
        self._current = 0  # index of the endpoint that answered last
        self._token: str | None = None
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> EtcdClient:
        self._http = self._new_http(self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- key-value -------------------------------------------------------------------

    async def range_prefix(self, prefix: str, revision: int = 0) -> tuple[int, list[KV]]:
        """Every key starting with ``prefix``, at ``revision`` (0: the latest), and that revision.

        Raises `EtcdCompacted` when ``revision`` was compacted away.
        """
        raw = prefix.encode()
        body: dict[str, Any] = {"key": _b64(raw), "range_end": _b64(prefix_range_end(raw))}
        if revision:
            body["revision"] = revision
        reply = await self._call("/v3/kv/range", body)
        kvs = [_kv(item) for item in reply.get("kvs", [])]
        return (revision or _revision(reply)), kvs

    async def get(self, key: str) -> KV | None:
        """The key's current value, or None when it does not exist."""
        reply = await self._call("/v3/kv/range", {"key": _b64(key.encode())})
        items = reply.get("kvs", [])
        return _kv(items[0]) if items else None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Set ``key``, returning the revision; with a ``lease`` it vanishes with the lease."""
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return _revision(await self._call("/v3/kv/put", body))

    async def delete(self, key: str) -> int:
        """Delete ``key`` (no error when absent). Returns the revision."""
        return _revision(await self._call("/v3/kv/deleterange", {"key": _b64(key.encode())}))

    async def txn(
        self,
        puts: dict[str, bytes],
        deletes: list[str],
        *,
        expect: Mapping[str, int] | None = None,
        quiet_since: tuple[str, int] | None = None,
        lease: int = 0,
    ) -> int:
        """Apply every put and delete in one transaction (all or nothing); return its revision.

        Optional guards, checked by etcd in the same transaction: ``expect`` maps keys
        to the mod_revision they must still have (0: must not exist); ``quiet_since``
        = (prefix, revision): no key under prefix may have changed after revision
        (deletes leave no trace there: guard those keys with ``expect``). A failed
        guard applies nothing and raises `EtcdConflict`. ``lease``: the puts' lease.

        etcd refuses a key given twice and more operations (or guards) than its
        ``--max-txn-ops`` (128 by default); both raise `EtcdError` with etcd's message.
        """
        with_lease = {"lease": lease} if lease else {}
        ops: list[dict[str, Any]] = [
            {"request_put": {"key": _b64(k.encode()), "value": _b64(v), **with_lease}}
            for k, v in puts.items()
        ]
        ops += [{"request_delete_range": {"key": _b64(k.encode())}} for k in deletes]
        compare: list[dict[str, Any]] = [
            {"key": _b64(k.encode()), "target": "MOD", "result": "EQUAL", "mod_revision": rev}
            for k, rev in (expect or {}).items()
        ]
        if quiet_since is not None:
            raw = quiet_since[0].encode()
            compare.append(
                {
                    "key": _b64(raw),
                    "range_end": _b64(prefix_range_end(raw)),
                    "target": "MOD",
                    "result": "LESS",
                    "mod_revision": quiet_since[1] + 1,
                }
            )
        reply = await self._call("/v3/kv/txn", {"compare": compare, "success": ops})
        if compare and not reply.get("succeeded", False):
            raise EtcdConflict(f"etcd: changed since revision read ({_revision(reply)} now)")
        return _revision(reply)

    async def compact(self, revision: int) -> None:
        """Discard history before ``revision`` (watches from earlier raise `EtcdCompacted`)."""
        await self._call("/v3/kv/compaction", {"revision": revision, "physical": True})

    # -- leases ----------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        reply = await self._call("/v3/lease/grant", {"TTL": ttl})
        return int(reply["ID"])

    async def keep_alive(self, lease: int) -> int:
        """Refresh ``lease`` once; return its TTL. Raises `EtcdLeaseExpired` when it is gone.

        Each member gets `KEEPALIVE_TIMEOUT` to answer before the next is asked.
        """
        reply = await self._call("/v3/lease/keepalive", {"ID": lease}, KEEPALIVE_TIMEOUT)
        result = reply.get("result", reply)
        ttl = int(result.get("TTL", 0))
        if ttl <= 0:
            raise EtcdLeaseExpired(f"etcd lease {lease:x} expired or revoked")
        return ttl

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys. Raises `EtcdLeaseExpired` when it is gone."""
        await self._call("/v3/lease/revoke", {"ID": lease})

    # -- watch -----------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Every change under ``prefix`` from ``start_revision`` on, in batches.

        Iterate the returned `Watch` (``async for revision, events in watch``); close it
        with ``async with`` or `Watch.aclose` when leaving the loop early. When the
        stream breaks, it reconnects (another endpoint first) from the revision after the
        last event delivered, so no event is lost or repeated. A member that does not
        answer (the stream's opening within ``request_timeout``; a probe of a silent
        stream, see the module docstring) counts as a broken stream. Raises
        `EtcdCompacted` when the next revision it needs was compacted,
        `EtcdUnavailable` when no endpoint takes the watch within the retry budget.
        """
        return Watch(self._watch(prefix, start_revision))

    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        raw = prefix.encode()
        create = {"key": _b64(raw), "range_end": _b64(prefix_range_end(raw))}
        next_revision = start_revision
        # Read timeout off: a quiet prefix sends nothing for hours; _next's probes notice
        # a hung member, TCP keepalive a vanished host.
        timeout = httpx.Timeout(None, connect=self._connect_timeout)
        async with self._new_http(timeout, keepalive=True) as http:
            failures: dict[str, str] = {}
            deadline = trio.current_time() + self._retry_for
            backoff = BACKOFF_FIRST
            while True:
                for index in self._endpoint_order():
                    name = self._names[index]
                    request = {"create_request": {**create, "start_revision": next_revision}}
                    created = False
                    try:
                        async with self._stream(http, index, "/v3/watch", request) as messages:
                            while True:
                                message = await self._next(messages, index, created, raw)
                                if message is None:
                                    break
                                batch = _watch_batch(message, name)
                                if batch is None:  # "created", or a progress notification
                                    if not created and next_revision <= 0:  # "from now":
                                        next_revision = _revision(message) + 1  # pin it
                                    created = True
                                    self._current = index
                                    failures.clear()
                                    deadline = trio.current_time() + self._retry_for
                                    backoff = BACKOFF_FIRST
                                    continue
                                next_revision = batch[1][-1].mod_revision + 1
                                yield batch
                        failures[name] = "watch stream ended"
                    except _Unresponsive as exc:
                        log.warning("etcd watch: %s %s; watching again from revision %d, "
                                    "another endpoint first", name, exc, next_revision)  # fmt: skip
                        failures[name] = str(exc)
                    except (httpx.TransportError, _GatewayError) as exc:
                        if isinstance(exc, _GatewayError) and self._token_rejected(exc):
                            self._token = None  # expired: authenticate again next round
                        elif isinstance(exc, _GatewayError) and not exc.retry_elsewhere:
                            raise _map_error(exc) from None
                        failures[name] = _describe(exc)
                if trio.current_time() >= deadline:
                    raise EtcdUnavailable(self.target.describe_endpoints(), failures)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    # -- plumbing --------------------------------------------------------------------

    def _new_http(self, timeout: httpx.Timeout, keepalive: bool = False) -> httpx.AsyncClient:
        t = self.target
        options: list[tuple[int, int, int]] = []
        if keepalive:
            options = [
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
                (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
                (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
            ]
        # plain HTTP: no certificate is ever checked, and httpx would load the system's
        # CAs for nothing (~40 ms for each client: a node opens three at start)
        verify: Any = False
        if t.tls:
            try:
                verify = ssl.create_default_context(cafile=t.cacert)  # None: the system's CAs
            except (OSError, ssl.SSLError) as exc:
                raise EtcdError(f"etcd CA file {t.cacert!r}: {_describe(exc)}") from None
            if t.cert and t.key:
                try:
                    verify.load_cert_chain(t.cert, t.key)
                except (OSError, ssl.SSLError) as exc:
                    raise EtcdError(
                        f"etcd client certificate {t.cert!r} / key {t.key!r}: {_describe(exc)}"
                    ) from None
        transport = httpx.AsyncHTTPTransport(verify=verify, socket_options=options, retries=0)
        # trust_env off: an HTTP(S)_PROXY meant for the web must not carry etcd traffic.
        return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)

    def _endpoint_order(self) -> list[int]:
        """Every endpoint once, starting with the one that answered last."""
        n = len(self._bases)
        return [(self._current + i) % n for i in range(n)]

    async def _call(
        self, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first endpoint that answers; see the module doc.

        Each attempt (authentication included) has ``timeout`` seconds (default
        ``request_timeout``) as a whole: httpx's timeouts bound each read, not a
        request, and a hung member must not hold the call.
        """
        if self._http is None:
            raise RuntimeError("EtcdClient used outside 'async with'")
        timeout = self._request_timeout if timeout is None else timeout
        failures: dict[str, str] = {}
        deadline = trio.current_time() + self._retry_for
        backoff = BACKOFF_FIRST
        while True:
            for index in self._endpoint_order():
                try:
                    with trio.fail_after(timeout):
                        reply = await self._post(self._http, index, path, body)
                except trio.TooSlowError:
                    failures[self._names[index]] = f"no answer in {timeout:g}s"
                    continue
                except httpx.TransportError as exc:
                    failures[self._names[index]] = _describe(exc)
                    continue
                except _GatewayError as exc:
                    if not exc.retry_elsewhere:
                        raise _map_error(exc) from None
                    failures[self._names[index]] = exc.message
                    continue
                self._current = index
                return reply
            if trio.current_time() >= deadline:
                raise EtcdUnavailable(self.target.describe_endpoints(), failures)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _post(
        self, http: httpx.AsyncClient, index: int, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One request to one endpoint, authenticating first (and again on an expired token)."""
        for attempt in (1, 2):
            with self._url_errors(index):
                headers = await self._auth_headers(http, index)
                response = await http.post(self._bases[index] + path, json=body, headers=headers)
            try:
                return _reply(response.status_code, response.content)
            except _GatewayError as exc:
                if attempt == 1 and self._token_rejected(exc):
                    self._token = None
                    continue
                raise
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _stream(
        self, http: httpx.AsyncClient, index: int, path: str, body: dict[str, Any]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A streaming POST: yields an iterator over the JSON messages etcd sends.

        Raises `_Unresponsive` when the answer's headers take over ``request_timeout``.
        """
        response: httpx.Response | None = None
        try:
            with trio.move_on_after(self._request_timeout), self._url_errors(index):
                headers = await self._auth_headers(http, index)
                url = self._bases[index] + path
                request = http.build_request("POST", url, json=body, headers=headers)
                response = await http.send(request, stream=True)
                if response.status_code != 200:
                    _reply(response.status_code, await response.aread())  # raises _GatewayError
                    raise _GatewayError(response.status_code, 0, f"HTTP {response.status_code}")
            if response is None or response.status_code != 200:
                raise _Unresponsive(f"did not answer in {self._request_timeout:g}s")
            async with aclosing(_messages(response)) as messages:
                yield messages
        finally:
            if response is not None:
                await response.aclose()

    async def _next(
        self, messages: AsyncIterator[dict[str, Any]], index: int, created: bool, probe: bytes
    ) -> dict[str, Any] | None:
        """The stream's next message, or None at its end.

        Before "created", it must come within ``request_timeout``; after, while it
        does not come, the member is probed every ``probe_every`` seconds (a read of
        the key ``probe``: the watched prefix itself, which the user may read).
        Raises `_Unresponsive` when either fails.

        Resource handling: the probes run in a nursery that lives only while this
        waits (none spans the watch's ``yield``); a read cut short breaks the stream
        (httpx closes its connection), which the caller then leaves.
        """
        message = _NOTHING
        error: Exception | None = None  # the read's, raised as is (not in a group)
        why = f"did not confirm the watch in {self._request_timeout:g}s"
        async with trio.open_nursery() as nursery:
            if created:

                async def watchdog() -> None:
                    nonlocal why
                    while True:
                        await trio.sleep(self._probe_every)
                        failure = await self._probe(index, probe)
                        if failure is not None:
                            why = f"sent nothing for {self._probe_every:g}s and {failure}"
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(watchdog)
            else:
                nursery.cancel_scope.deadline = trio.current_time() + self._request_timeout
            try:
                message = await anext(messages, None)
            except Exception as exc:  # re-raised below, outside the nursery (no group)
                error = exc
            nursery.cancel_scope.cancel()  # the watchdog's work is done
        if error is not None:
            raise error
        if message is _NOTHING:
            raise _Unresponsive(why)
        return message

    async def _probe(self, index: int, key: bytes) -> str | None:
        """Whether the member ``index`` still serves: None if it answers a
        linearizable read of ``key`` (one key: a lookup in etcd's index, cheap),
        else what went wrong. A member cut off from the quorum answers no
        linearizable read, so this notices it too. An answer that refuses (auth)
        still shows a live member."""
        if self._http is None:
            raise RuntimeError("EtcdClient used outside 'async with'")
        body = {"key": _b64(key)}
        try:
            with trio.fail_after(self._probe_timeout):
                await self._post(self._http, index, "/v3/kv/range", body)
        except trio.TooSlowError:
            return f"did not answer a probe in {self._probe_timeout:g}s"
        except httpx.TransportError as exc:
            return f"failed a probe: {_describe(exc)}"
        except _GatewayError as exc:
            if exc.retry_elsewhere:
                return f"failed a probe: {exc.message}"
        except EtcdAuthFailed:
            pass
        return None

    @contextmanager
    def _url_errors(self, index: int) -> Iterator[None]:
        """An endpoint the HTTP client or the resolver refuses as written (an invalid IP
        literal, a DNS label IDNA cannot encode) as an `EtcdError` naming it: no retry
        helps. `parse_etcd_url` refuses these already; this keeps any it misses from
        escaping as a traceback."""
        try:
            yield
        except (httpx.InvalidURL, UnicodeError) as exc:
            raise EtcdError(f"etcd endpoint {self._names[index]}: bad address: {exc}") from None

    def _token_rejected(self, exc: _GatewayError) -> bool:
        return self.target.user is not None and exc.code == _UNAUTHENTICATED

    async def _auth_headers(self, http: httpx.AsyncClient, index: int) -> dict[str, str]:
        user = self.target.user
        if user is None:
            return {}
        if self._token is None:
            env = self.target.password_env or "ETCD_PASSWORD"
            password = os.environ.get(env)
            if password is None:
                raise EtcdAuthFailed(f"etcd user {user!r}: no password in ${env}")
            body = {"name": user, "password": password}
            response = await http.post(self._bases[index] + "/v3/auth/authenticate", json=body)
            try:
                reply = _reply(response.status_code, response.content)
            except _GatewayError as exc:
                if exc.retry_elsewhere:
                    raise
                raise EtcdAuthFailed(f"etcd user {user!r}: {exc.message}") from None
            self._token = str(reply["token"])
        return {"Authorization": self._token}


class Watch:
    """An open watch: an async iterator of ``(header_revision, [Event, ...])`` batches.

    Every batch holds at least one event, in revision order. Closing (``aclose``, leaving
    ``async with``, or a cancellation while waiting) closes its connection.
    """

    def __init__(self, batches: AsyncIterator[tuple[int, list[Event]]]) -> None:
        self._batches = batches

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> tuple[int, list[Event]]:
        return await self._batches.__anext__()

    async def aclose(self) -> None:
        await self._batches.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------
# The gateway's JSON, pure


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _revision(reply: dict[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _kv(item: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(item.get("key")).decode("utf-8", "replace"),
        value=_unb64(item.get("value")),
        mod_revision=int(item.get("mod_revision", 0)),
    )


def _reply(status: int, content: bytes) -> dict[str, Any]:
    """The decoded body of a unary answer, or `_GatewayError` for an error answer."""
    try:
        doc = json.loads(content.split(b"\n", 1)[0] if content.strip() else b"{}")
    except ValueError:
        text = content.decode("utf-8", "replace").strip()[:200]
        if _CN_REFUSED in text:
            text += (
                " (with auth on, etcd's JSON gateway refuses a client certificate that has"
                " a CommonName: use one without; the user comes from the password login)"
            )
        raise _GatewayError(status, 0, f"HTTP {status}: {text}") from None
    if isinstance(doc, dict) and "error" in doc:
        error = doc["error"]
        if isinstance(error, dict):  # a streaming endpoint's error: {"error": {...}}
            code, message = int(error.get("grpc_code", error.get("code", 0))), error.get("message")
        else:
            code, message = int(doc.get("code", 0)), doc.get("message") or error
        raise _GatewayError(status, code, str(message))
    if status != 200 or not isinstance(doc, dict):
        raise _GatewayError(status, 0, f"HTTP {status}: {content[:200]!r}")
    return doc


async def _messages(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The newline-separated JSON messages of a streaming answer."""
    async for line in response.aiter_lines():
        if line.strip():
            doc = json.loads(line)
            if "error" in doc:
                _reply(response.status_code, line.encode())
            yield doc.get("result", doc)


def _watch_batch(message: dict[str, Any], endpoint: str) -> tuple[int, list[Event]] | None:
    """A watch message as a batch, or None for one without events (created, progress)."""
    compacted = int(message.get("compact_revision", 0))
    if compacted:
        raise EtcdCompacted(compacted)
    if message.get("canceled"):
        reason = message.get("cancel_reason") or "no reason given"
        raise EtcdError(f"etcd at {endpoint} cancelled the watch: {reason}")
    events = [_event(item) for item in message.get("events", [])]
    if not events:
        return None
    return _revision(message), events


def _event(item: dict[str, Any]) -> Event:
    kv = _kv(item.get("kv", {}))
    if item.get("type") == "DELETE":
        return Event("delete", kv.key, None, kv.mod_revision)
    return Event("put", kv.key, kv.value, kv.mod_revision)


def _map_error(exc: _GatewayError) -> EtcdError:
    """A final (not retried) error answer as the matching `EtcdError`."""
    if _COMPACTED_MESSAGE in exc.message:
        return EtcdCompacted(0)  # a range's error names no revision: 0, "read the latest"
    if "lease not found" in exc.message:
        return EtcdLeaseExpired(f"etcd: {exc.message}")
    if exc.code in (_UNAUTHENTICATED, _FAILED_PRECONDITION) and "auth" in exc.message:
        return EtcdAuthFailed(f"etcd: {exc.message}")
    if any(
        text in exc.message for text in ("permission denied", "user name is empty", _CN_REFUSED)
    ):
        return EtcdAuthFailed(f"etcd: {exc.message}")
    return EtcdError(f"etcd: {exc.message}")


def _describe(exc: BaseException) -> str:
    """What went wrong, briefly: the OS's words (an errno's strerror) when the cause
    chain has them (httpx and trio wrap them), else the first non-empty message."""
    text = ""
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            text = current.strerror
            break
        if not text and str(current):
            text = str(current)
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    text = text or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."
