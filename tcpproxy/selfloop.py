"""Targets that are the proxy itself: rejected at load, refused at connect time.

A target on a local address (loopback, the wildcard, any address of this host
or network namespace) with a port the proxy listens on sends each connection
back into the proxy, which connects to itself again, until max-connections is
full and nothing is served.

The proxy listens on (bind address, port): with the default wildcard bind any
local address on one of its ports is the proxy; with `--bind B` (both binaries:
bpfproxy steers only B, and its -p listener binds B) only B is, and the
unspecified address of B's family when B is loopback (connect() to 0.0.0.0 or
:: reaches loopback). So `--bind 10.77.0.1` may expose a service of
127.0.0.1 on the same port. Literal addresses are checked when a config is
loaded (start: exit 2; reload: rejected, the old config stays); names can only
be checked once resolved, so each address is checked again before connecting.

The decisions (`self_loops`, `is_local`, `reaches_proxy`) are pure: they take
the config, the proxy's extra listening ports (bpfproxy's -p), its bind address
and the set of local addresses;
`local_addresses` and `SelfLoopGuard` gather those at the edge.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from functools import partial
from itertools import islice
from typing import Any

from tcpproxy.config import MAX_PROBLEMS, Config, ConfigError, Target

__all__ = [
    "LOCAL_ADDRESSES_TTL",
    "SELF_LOOP",
    "SelfLoopError",
    "SelfLoopGuard",
    "is_local",
    "local_addresses",
    "parse_bind",
    "reaches_proxy",
    "reject_self_loops",
    "self_loops",
]

log = logging.getLogger("tcpproxy")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SELF_LOOP = "would connect to the proxy itself"  # the reason logged for a refused target
LOCAL_ADDRESSES_TTL = 10.0  # seconds the host's address list is reused at connect time
SELF_LOOP_LOG_INTERVAL = 10.0  # seconds between repeated warnings about one target
SELF_LOOP_LOG_KEYS = 1024  # targets remembered for that; more (reload churn) starts afresh


# -- pure -------------------------------------------------------------------------------


def parse_ip(host: str) -> IPAddress | None:
    """The address `host` spells (IPv4-mapped IPv6 as IPv4, scope dropped), or None
    for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(ip: IPAddress, local: Collection[IPAddress]) -> bool:
    """A connection to `ip` stays on this host: loopback (127.0.0.0/8, ::1), the
    wildcard (0.0.0.0 and :: mean "this host" to connect()), or one of `local`."""
    return ip.is_loopback or ip.is_unspecified or ip in local


def parse_bind(bind: str | None) -> IPAddress | None:
    """The specific address the proxy listens on, or None for every address (no
    --bind, the wildcard, or a name: a name is checked as the wildcard, to be safe)."""
    if bind is None:
        return None
    ip = parse_ip(bind.strip("[]"))
    return None if ip is None or ip.is_unspecified else ip


def reaches_proxy(ip: IPAddress, bind: IPAddress | None, local: Collection[IPAddress]) -> bool:
    """Whether a connection to `ip`, on a port the proxy listens on, reaches the proxy.

    `bind`: the proxy's specific listening address (see `parse_bind`), None for
    every address. `ip` and `bind` come unmapped from `parse_ip`/`parse_bind`,
    so v4-mapped forms compare equal to IPv4.
    """
    if bind is None:
        return is_local(ip, local)
    if ip == bind:
        return True
    # connect() to 0.0.0.0 or :: goes to loopback: to the proxy only if it listens there
    return ip.is_unspecified and ip.version == bind.version and bind.is_loopback


def self_loops(
    config: Config,
    extra_ports: Collection[int],
    local: Collection[IPAddress],
    bind: IPAddress | None = None,
    owners: Mapping[int, str] | None = None,
) -> list[str]:
    """Every target of `config` spelled as an address that is the proxy itself.

    Args:
      extra_ports: ports the proxy listens on besides the apps' (bpfproxy's -p).
      local: this host's (namespace's) addresses.
      bind: the proxy's specific listening address (`parse_bind`); None: every one.
      owners: further ports the proxy serves, with what they are (a fleet node's
        other apps, when judging one app alone).

    Returns one problem per such target, located as config errors are
    (``Apps[i].Targets[j]: ...``); host names are left to connect time.
    """
    found = _loops(config, extra_ports, local, bind, owners or {})
    return [describe() for describe in found]


def _loops(
    config: Config,
    extra_ports: Collection[int],
    local: Collection[IPAddress],
    bind: IPAddress | None,
    others: Mapping[int, str],
) -> Iterator[Callable[[], str]]:
    """`self_loops`' search, in one pass over the targets, yielding for each loop a
    function that words it: a caller that shows only a few words only those."""
    ports = config.ports  # worked out once per config
    listeners: dict[int, tuple[int, int]] | None = None  # indexed at the first loop
    for i, app in enumerate(config.apps):
        for j, target in enumerate(app.targets):
            ours = target.port in ports or target.port in extra_ports
            mine = ours or target.port in others
            ip = parse_ip(target.host) if mine else None
            if ip is None or not reaches_proxy(ip, bind, local):
                continue
            if listeners is None:
                listeners = _listeners(config)
            yield partial(_describe, config, listeners, extra_ports, others, i, j, ip, bind)


def _describe(
    config: Config,
    listeners: Mapping[int, tuple[int, int]],
    extra_ports: Collection[int],
    others: Mapping[int, str],
    i: int,
    j: int,
    ip: IPAddress,
    bind: IPAddress | None,
) -> str:
    """The problem of target j of app i, which reaches the proxy at `ip`."""
    app, target = config.apps[i], config.apps[i].targets[j]
    where = "an address of this host" if bind is None else f"where it listens ({bind})"
    return (
        f"Apps[{i}].Targets[{j}]: {str(target)!r} of app {app.name!r} is this proxy "
        f"itself: {ip} is {where} and {target.port} is "
        f"{_owner(config, listeners, extra_ports, others, target.port)}; "
        f"each connection would loop back into the proxy until no slot is left"
    )


def _listeners(config: Config) -> dict[int, tuple[int, int]]:
    """Each app port's (app index, index in its Ports), built once per check: a scan
    of every app per loop made N apps looping into one port cost N^2 (16,000 apps:
    minutes). The last app listing a port wins, and its first listing of it."""
    return {
        port: (i, j)
        for i, app in enumerate(config.apps)
        for j, port in reversed(list(enumerate(app.ports)))
    }


def _owner(
    config: Config,
    listeners: Mapping[int, tuple[int, int]],
    extra_ports: Collection[int],
    others: Mapping[int, str],
    port: int,
) -> str:
    """Who listens on `port`, for a problem's message (an app's port wins over -p,
    which wins over the `others` a fleet node serves)."""
    if port in listeners:
        i, j = listeners[port]
        return f"a port of app {config.apps[i].name!r} (Apps[{i}].Ports[{j}])"
    if port in extra_ports:
        return "bpfproxy's listening port (-p)"
    return others[port]


# -- edge -------------------------------------------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_NETLINK_BUFFER = 1 << 16  # bytes per recv of the dump


def _align(n: int) -> int:
    return (n + 3) & ~3


def local_addresses() -> frozenset[IPAddress]:
    """This network namespace's interface addresses (an rtnetlink RTM_GETADDR dump,
    as `ip addr` does; no dependency). Raises OSError when netlink is unavailable."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.bind((0, 0))
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        sock.send(header + body)
        found: set[IPAddress] = set()
        while True:
            data = sock.recv(_NETLINK_BUFFER)
            if not data:
                raise OSError("netlink: the address dump ended early")
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError("netlink: malformed message")
                if kind == _NLMSG_DONE:
                    return frozenset(found)
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    raise OSError(-code, f"netlink: {os.strerror(-code)}")
                if kind == _RTM_NEWADDR:
                    found.update(_address(data[offset + _NLMSGHDR.size : offset + length]))
                offset += _align(length)


def _address(message: bytes) -> Iterable[IPAddress]:
    """The address of one RTM_NEWADDR message: IFA_LOCAL (IPv4; IFA_ADDRESS is the
    peer on point-to-point links), else IFA_ADDRESS (IPv6)."""
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(message):
        length, kind = _RTATTR.unpack_from(message, offset)
        if length < _RTATTR.size:
            break
        attrs[kind] = message[offset + _RTATTR.size : offset + length]
        offset += _align(length)
    raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
    if raw is not None and len(raw) in (4, 16):
        yield ipaddress.ip_address(raw)


def _bindable(ip: IPAddress) -> bool:
    """Fallback without netlink: binding succeeds only for a local address (unless
    net.ipv4.ip_nonlocal_bind is set, which is why netlink comes first)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(ip), 0))
    except OSError:
        return False
    return True


class _LocalView(Collection[IPAddress]):
    """The host's addresses for `self_loops`: netlink's list, or bind tests without it."""

    def __init__(self) -> None:
        self._read = False  # netlink is asked on first use: most checks never need it
        # (a target on loopback, or on a port the proxy does not listen on)
        self._list: frozenset[IPAddress] | None = None

    @property
    def _addresses(self) -> frozenset[IPAddress] | None:
        if not self._read:
            self._read = True
            try:
                self._list = local_addresses()
            except OSError:
                self._list = None
        return self._list

    def __contains__(self, ip: object) -> bool:
        addresses = self._addresses
        if addresses is not None:
            return ip in addresses
        return isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address) and _bindable(ip)

    def __iter__(self) -> Any:
        return iter(self._addresses or ())

    def __len__(self) -> int:
        return len(self._addresses or ())


def reject_self_loops(
    config: Config,
    extra_ports: Collection[int] = (),
    source: str = "<config>",
    bind: str | None = None,
    owners: Mapping[int, str] | None = None,
    local: Collection[IPAddress] | None = None,
) -> None:
    """Raise ConfigError naming the targets of `config` that are the proxy itself:
    the first MAX_PROBLEMS, and how many more (counted, not worded).

    The validation hook for every config load: at start (exit 2) and on reload
    (rejected, the running config stays). `bind`: the --bind option as given.
    `local`: the addresses that are this host (None: this namespace's, read only
    if needed; tcpproxyctl, judging for every node, gives none)."""
    address = parse_bind(bind)
    if local is None:
        local = _LocalView() if address is None else ()
    found = _loops(config, extra_ports, local, address, owners or {})
    first = [describe() for describe in islice(found, MAX_PROBLEMS)]
    if first:
        raise ConfigError(source, first, more=sum(1 for _ in found))


class SelfLoopError(OSError):
    """A target address that is the proxy itself: a failure of that target."""

    def __init__(self) -> None:
        super().__init__(SELF_LOOP)


class SelfLoopGuard:
    """Connect-time check of resolved addresses (host names escape the load check).

    `check(target, family, sockaddr)` raises SelfLoopError for an address that
    reaches the proxy (`reaches_proxy`: a local one, or with `bind` only that)
    with a port the proxy listens on (`ports`, kept current by the owner on
    each config), and logs it at most once per SELF_LOOP_LOG_INTERVAL per
    target. The host's addresses are read only when a port matches (and no
    specific bind address makes them moot), and reused for LOCAL_ADDRESSES_TTL.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, bind: str | None = None
    ) -> None:
        self.ports: frozenset[int] = frozenset()
        self._bind = parse_bind(bind)
        self._clock = clock
        self._local: tuple[float, Collection[IPAddress]] | None = None
        self._logged: dict[Target, float] = {}

    def check(self, target: Target, family: int, sockaddr: tuple) -> None:
        port = sockaddr[1]
        if port not in self.ports:
            return
        ip = parse_ip(sockaddr[0])
        if ip is None:
            return
        local = self._local_addresses() if self._bind is None else ()
        if not reaches_proxy(ip, self._bind, local):
            return
        now = self._clock()
        where = "an address of this host" if self._bind is None else f"--bind {self._bind}"
        if now - self._logged.get(target, -SELF_LOOP_LOG_INTERVAL) >= SELF_LOOP_LOG_INTERVAL:
            if len(self._logged) >= SELF_LOOP_LOG_KEYS:
                self._logged.clear()
            self._logged[target] = now
            log.warning(
                "target %s resolves to %s (%s), and port %d is one this proxy listens on: "
                "refused (%s)", target, ip, where, port, SELF_LOOP,
            )  # fmt: skip
        raise SelfLoopError()

    def _local_addresses(self) -> Collection[IPAddress]:
        now = self._clock()
        if self._local is None or now - self._local[0] >= LOCAL_ADDRESSES_TTL:
            self._local = (now, _LocalView())
        return self._local[1]
