"""The proxy's JSON configuration, parsed and validated into frozen dataclasses.

The challenge's format loads unchanged::

    {"Apps": [{"Name": "five-thousand", "Ports": [5001, 5200],
               "Targets": ["tcp-echo.fly.dev:5001", "tcp-echo.fly.dev:5002"]}]}

Options may be set per app or in a top-level ``"Defaults"`` object. An app's own
value wins over ``Defaults``, which wins over the built-in default:

==============  ===========  =======  =================================================
Option          Default      Unit     Why
==============  ===========  =======  =================================================
Strategy        round-robin  --       Spreads connections evenly without tracking any
                                      state; ``least-connections`` suits apps whose
                                      connections vary a lot in lifetime.
ConnectTimeout  2.0          seconds  Survives one lost SYN (Linux resends it after 1 s)
                                      but fails a dead target fast, rather than after
                                      the kernel's ~127 s of SYN retries. Must be > 0
                                      and <= 300; the cap catches milliseconds typed
                                      as seconds.
IdleTimeout     3600.0       seconds  No byte either way for this long closes both sides;
                                      long enough for idle database sessions, short
                                      enough that vanished peers do not pin descriptors.
MaxConnections  a share of   count    Open connections of the app at once; the excess
                --max-                is reset. An equal share of the process's limit
                connections           (the --max-connections in force, all workers
                                      together) among the apps, at most ten ways: one
                                      app alone may use it all, two apps half each,
                                      ten or more a tenth each (1000 at the default
                                      10000); rounded down, at least 1. So one app's
                                      clients (idle ones included) cannot take every
                                      slot from the others: isolation between apps,
                                      whatever the limit. Raise it for an app that
                                      needs more; at or above the process's limit it
                                      isolates nothing (warned about).
MaxConn...      none (off)   count    MaxConnectionsPerSource: open connections of the
                                      app from one client IP address (the socket's
                                      peer, so with AcceptProxyProtocol: the
                                      balancer's); the excess is reset. Off by default:
                                      clients behind NAT or a balancer share an address.
FirstByte...    none (off)   seconds  FirstByteTimeout: a client that sends nothing for
                                      this long after connecting (after its PROXY
                                      header, if any) is closed, and no target is
                                      connected until it sends, so silent clients hold
                                      no backend connection. Off by default: in
                                      server-speaks-first protocols (SMTP, SSH, MySQL)
                                      the client waits for the target. <= 3600.
TrustedProx...  loopback     CIDRs    TrustedProxies: the peers whose PROXY headers are
                127.0.0.0/8               believed (AcceptProxyProtocol); a header from any
                ::1/128                   other peer is reset and counted. Only this host by
                                      default: a balancer elsewhere must be named, so a
                                      client that reaches the port directly cannot claim
                                      any address, and a same-host balancer needs no
                                      change. Addresses or networks, strictly parsed.
HealthCheck     none         object   Active TCP-connect checks (Interval 2 s, Timeout
                                      1 s, Rise 2, Fall 3); none means passive only.
SendProxy...    none         --       SendProxyProtocol "v1" or "v2": a PROXY header to
                                      each target, so it sees the client's address.
AcceptProxy...  false        --       AcceptProxyProtocol: the client (a balancer) sends
                                      a PROXY header first; its address is the client's.
Hostnames       none         names    Per app only: the names (TLS SNI, HTTP Host) its
                                      clients ask for, exact or ``*.example.com`` (one
                                      label, not the apex). Apps whose names do not
                                      overlap may share a port; at most one of them
                                      without Hostnames, the port's default (no name, an
                                      unknown name, not TLS or HTTP). Unicode names are
                                      stored as A-labels ("xn--..."). None: the app's
                                      ports are its own, and nothing is inspected.
InspectTimeout  5.0          seconds  On a port told apart by name: how long a client
                                      may take to send its whole TLS ClientHello or
                                      HTTP request head. One that sent nothing by then
                                      goes to the default app (server-speaks-first
                                      protocols); a partial one is closed. Long enough
                                      for a slow mobile link's 2-3 round trips, short
                                      enough that a stalled client does not hold its
                                      slot long (HAProxy's usual inspect-delay). <= 300.
==============  ===========  =======  =================================================

Apps sharing a port must agree on what is read before the app is known:
AcceptProxyProtocol, TrustedProxies and InspectTimeout.

Adding an option takes a field on ``_Options`` (default and bounds), the same field
on `AppConfig`, and a row in this table.

Validation is strict, because a proxy that guesses what a typo meant sends traffic
somewhere nobody intended: unknown keys, wrong types (``"5001"`` is not a port) and
out-of-range values are all errors. Every problem is reported at once, each with its
location (``Apps[2].Ports[1]``), so one edit fixes them all: the first `MAX_PROBLEMS`
in document order, and how many more.

pydantic is this module's implementation detail: the rest of the program sees only the
dataclasses, and no exception but `ConfigError` escapes `parse_config`.
"""

import difflib
import enum
import heapq
import ipaddress
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, islice
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic.alias_generators import to_pascal
from pydantic_core import ErrorDetails

from tcpproxy.hostnames import normalize_name

__all__ = [
    "APP_SHARE_DIVISOR",
    "MAX_PROBLEMS",
    "AppConfig",
    "Config",
    "ConfigError",
    "Defaults",
    "HealthCheck",
    "Network",
    "Strategy",
    "Target",
    "app_connection_limit",
    "no_isolation",
    "parse_app",
    "parse_config",
    "parse_defaults",
]

# An app without MaxConnections holds an equal share of the process's connection limit,
# split at most this many ways: with many apps a tenth each (1000 at the default 10000),
# so one app whose clients pile up leaves most slots to the others.
APP_SHARE_DIVISOR = 10

# Problems a ConfigError holds and shows; the rest are only counted. One mistake
# repeated over thousands of apps then makes a message (and a rejected reload's log
# line) of this many lines, not thousands, and only these are worded.
MAX_PROBLEMS = 20


class ConfigError(Exception):
    """Our side: the configuration is wrong (as opposed to peer/target errors).

    ``problems`` holds the first `MAX_PROBLEMS` problems found, each prefixed with
    its location, such as ``"Apps[2].Ports[1]: must be between 1 and 65535, got
    70000"``; ``more`` counts the others (given by the caller, which need not word
    them, plus any beyond the first MAX_PROBLEMS of ``problems``).
    """

    source: str  # the file's path, or "<config>"
    problems: tuple[str, ...]
    more: int  # problems found but not kept

    def __init__(self, source: str, problems: Iterable[str], more: int = 0) -> None:
        self.source = source
        rest = iter(problems)
        self.problems = tuple(islice(rest, MAX_PROBLEMS))
        self.more = more + sum(1 for _ in rest)
        super().__init__(source, self.problems, self.more)  # keeps the error picklable

    def __str__(self) -> str:
        if len(self.problems) == 1 and not self.more:
            return f"{self.source}: {self.problems[0]}"
        lines = "".join(f"\n  {problem}" for problem in self.problems)
        if self.more:
            lines += f"\n  ... and {self.more} more"
        return f"{self.source}: {len(self.problems) + self.more} problems:{lines}"


class Strategy(enum.StrEnum):
    """How an app picks a target for each new connection."""

    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_CONNECTIONS = "least-connections"


@dataclass(frozen=True, slots=True)
class Target:
    """A backend to connect to; ``host`` is a DNS name or an IP address (IPv6 unbracketed)."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checking: a TCP connect to each target every `interval`."""

    interval: float = 2.0  # seconds between probes of one target
    timeout: float = 1.0  # seconds a probe's connect may take
    rise: int = 2  # consecutive successes that bring a down target up
    fall: int = 3  # consecutive failures that take an up target down


@dataclass(frozen=True, slots=True)
class AppConfig:
    """One app: the ports it listens on, the targets it forwards to, and its options."""

    name: str
    ports: tuple[int, ...]
    targets: tuple[Target, ...]
    strategy: Strategy = Strategy.ROUND_ROBIN
    connect_timeout: float = 2.0  # seconds
    idle_timeout: float = 3600.0  # seconds without a byte either way before both sides close
    max_connections: int | None = None  # open connections of this app at once; None: a
    # share of the process's limit (`app_connection_limit`), known only when running
    max_connections_per_source: int | None = None  # per client IP address; None: no limit
    first_byte_timeout: float | None = None  # seconds a client may stay silent; None: forever
    health_check: HealthCheck | None = None  # None: passive health only
    send_proxy_protocol: str | None = None  # "v1" or "v2": tell targets the client's address
    accept_proxy_protocol: bool = False  # a load balancer in front sends a PROXY header
    trusted_proxies: tuple[Network, ...] = LOOPBACK  # peers whose PROXY headers are believed
    # the names (SNI, Host) that pick this app on a port it shares, normalized (lower
    # case, A-labels, no trailing dot; "*.x" wildcards); (): none, the ports' default
    hostnames: tuple[str, ...] = ()
    inspect_timeout: float = 5.0  # seconds a client may take to show its name


# What is read from a client before its app is known: the apps sharing a port agree on
# these (AppConfig fields, as the file names them)
PORT_SETTINGS = {
    "accept_proxy_protocol": "AcceptProxyProtocol",
    "trusted_proxies": "TrustedProxies",
    "inspect_timeout": "InspectTimeout",
}


@dataclass(frozen=True)
class Config:
    """A validated configuration: names are unique across all apps, and a port is one
    app's or shared by apps told apart by Hostnames (at most one without: the default).

    Not slotted: `ports` is worked out once per config (a config of 20,000
    ports is asked for them several times by each reload)."""

    apps: tuple[AppConfig, ...]

    def port_apps(self) -> dict[int, list[AppConfig]]:
        """Map every listening port to the apps that serve it (several: told apart by
        their Hostnames), in the config's order."""
        apps: dict[int, list[AppConfig]] = {}
        for app in self.apps:
            for port in app.ports:
                apps.setdefault(port, []).append(app)
        return apps

    @cached_property
    def ports(self) -> frozenset[int]:
        """Every port the proxy listens on."""
        return frozenset(chain.from_iterable(app.ports for app in self.apps))


@dataclass(frozen=True, slots=True)
class Defaults:
    """A validated ``Defaults`` object, for `parse_app`: it fills the options an app leaves
    unset. Opaque: its contents are this module's business."""

    options: Any = None  # the parsed object; None: the built-in defaults


def app_connection_limit(app: AppConfig, total: int, apps: int) -> int:
    """The open connections `app` may hold when the whole process may hold `total`
    (all workers together) and serves `apps` apps: its MaxConnections, else an equal
    share of `total`, split at most APP_SHARE_DIVISOR ways, at least 1."""
    if app.max_connections is not None:
        return app.max_connections
    return max(1, total // min(max(apps, 1), APP_SHARE_DIVISOR))


def no_isolation(config: Config, total: int) -> list[str]:
    """Apps whose explicit MaxConnections is not below the process's limit `total`: their
    clients can take every slot from the other apps (a warning; one app alone is fine)."""
    if len(config.apps) < 2:
        return []
    return [
        f"MaxConnections {app.max_connections} gives app {app.name!r} no "
        f"isolation: it is not below the proxy's --max-connections ({total}), so its "
        f"clients can take every slot from the other apps"
        for app in config.apps
        if app.max_connections is not None and app.max_connections >= total
    ]


def parse_config(data: bytes | str, source: str = "<config>") -> Config:
    """Parse a JSON configuration; raise `ConfigError` listing every problem in it.

    ``source`` names the input in error messages (usually the file's path).
    """
    doc, problems = _load_json(data, source)
    try:
        raw: _File | None = _File.model_validate(doc)
    except ValidationError as exc:
        raw = None
        problems += [(err["loc"], _message(err)) for err in exc.errors(include_url=False)]
    # Cross-app checks read the raw document, so they run even when pydantic fails.
    problems += _cross_check(doc)
    if raw is None or problems:
        raise _error(source, problems)
    config = Config(apps=tuple(_app_config(app, raw.defaults) for app in raw.apps))
    problems += disagreements(config.apps)
    if problems:
        raise _error(source, problems)
    return config


def disagreements(apps: Iterable[AppConfig]) -> list[tuple[tuple[int | str, ...], str]]:
    """Apps sharing a port whose PORT_SETTINGS differ: each later app's problem (its
    index in `apps`, the key), naming the first app of the port it differs from."""
    first: dict[int, tuple[AppConfig, int]] = {}  # port -> its first app, and its index
    problems: list[tuple[tuple[int | str, ...], str]] = []
    for i, app in enumerate(apps):
        reported: set[str] = set()
        for port in app.ports:
            owner, _ = first.setdefault(port, (app, i))
            if owner is app:
                continue
            for field, key in PORT_SETTINGS.items():
                mine, theirs = getattr(app, field), getattr(owner, field)
                if mine != theirs and key not in reported:
                    reported.add(key)
                    problems.append((
                        ("Apps", i, key),
                        f"app {_quote(app.name)} shares port {port} with app "
                        f"{_quote(owner.name)}, whose {key} is {_setting(theirs)}, not "
                        f"{_setting(mine)}: apps sharing a port must agree on "
                        f"{', '.join(PORT_SETTINGS.values())} (read before the app is known)",
                    ))  # fmt: skip
    return problems


def _setting(value: object) -> str:
    if isinstance(value, tuple):
        return f"[{', '.join(str(item) for item in value)}]"
    return json.dumps(value)


def parse_defaults(data: bytes | str, source: str = "<defaults>") -> Defaults:
    """Parse one ``Defaults`` object on its own (a fleet keeps it in a key of its own);
    raise `ConfigError` as `parse_config` does, locations relative to the object."""
    doc, problems = _load_json(data, source)
    options: _Options | None = None
    try:
        options = _File.model_validate({"Apps": [], "Defaults": doc}).defaults
    except ValidationError as exc:
        problems += [(err["loc"][1:], _message(err)) for err in exc.errors(include_url=False)]
    if options is None or problems:
        raise _error(source, problems)
    return Defaults(options)


def parse_app(
    data: bytes | str, name: str, defaults: Defaults = Defaults(), source: str = "<app>"
) -> AppConfig:
    """Parse one app's object on its own, named `name` (a fleet keeps each app in a key
    of its own, named by the key: a "Name" in the object, if any, must agree).

    The checks and messages are `parse_config`'s for that app, its locations relative
    to the object (``Ports[1]: must be between 1 and 65535, got 70000``). What spans
    apps (a port two apps list) is the caller's to judge. Raises `ConfigError`.
    """
    doc, problems = _load_json(data, source)
    if isinstance(doc, dict):
        if "Name" in doc and doc["Name"] != name:
            problems.append(
                (("Name",), f"is {_show(doc['Name'])}, but the key names the app "
                 f"{_quote(name)}; leave \"Name\" out")
            )  # fmt: skip
        doc = {**doc, "Name": name}
    raw: _App | None = None
    try:
        raw = _App.model_validate(doc)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):  # the full location, for _key_hint
            problems.append((err["loc"], _message({**err, "loc": ("Apps", 0, *err["loc"])})))
    problems += [
        (loc[2:], message.replace("Apps[0].", "")) for loc, message in _cross_check({"Apps": [doc]})
    ]
    if raw is None or problems:
        raise _error(source, problems)
    return _app_config(raw, defaults.options if defaults.options is not None else _Options())


# ---------------------------------------------------------------------------------------
# Internals

_Loc = tuple[int | str, ...]  # a path into the document, like ("Apps", 2, "Ports", 1)
_Problem = tuple[_Loc, str]

_MAX_NAME_LENGTH = 128  # names end up in logs and metric labels
# A DNS label: 1-63 letters, digits, '-' or '_' (for names like _service.example), not
# starting or ending with '-'. ASCII only: internationalised names go in as "xn--...".
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_name(name: str) -> str:
    if not name:
        raise ValueError(f"must not be empty, got {_show(name)}")
    if len(name) > _MAX_NAME_LENGTH:
        raise ValueError(
            f"must be at most {_MAX_NAME_LENGTH} characters, got {len(name)}: {_show(name)}"
        )
    if name != name.strip():
        raise ValueError(f"must not start or end with whitespace, got {_show(name)}")
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise ValueError(f"must not contain control characters, got {_show(name)}")
    if not name.isascii() and any(unicodedata.category(char) == "Cs" for char in name):
        # a lone surrogate cannot be written as UTF-8: not in a metric label, nor in JSON
        raise ValueError(f"must be valid Unicode (no lone surrogates), got {_show(name)}")
    return name


def _check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"must be between 1 and 65535, got {port}")
    return port


def _parse_target(value: object) -> Target:
    """Parse ``"host:port"`` or ``"[ipv6]:port"``; raise ValueError saying what is wrong
    with the value, quoting it."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_show(value)}")

    def bad(problem: str) -> ValueError:
        return ValueError(f"{_quote(value)} {problem}")

    if not value:
        raise bad("is empty, expected host:port")
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            raise bad("has no ']' after the IPv6 address")
        if rest and not rest.startswith(":"):
            raise bad("has no ':' after ']', expected [address]:port")
        if not rest:
            raise bad("has no port, expected [address]:port")
        port_text = rest[1:]
        if not _is_ipv6(host):
            raise bad(f"has an invalid IPv6 address {_quote(host)}")
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise bad("has no port, expected host:port")
        if ":" in host:
            if _is_ipv6(host) and port_text:
                raise bad(
                    f"needs brackets around the IPv6 address: write it as [{host}]:{port_text}"
                )
            raise bad("has too many ':'; IPv6 addresses need brackets, as in [::1]:8080")
        if not host:
            raise bad("has no host, expected host:port")
        problem = _host_problem(host)
        if problem:
            raise bad(f"has {problem}")
    if not port_text:
        raise bad("has no port, expected host:port")
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad(f"has port {_quote(port_text)}, expected a number")
    port = int(port_text) if len(port_text) <= 5 else 0
    if not 1 <= port <= 65535:
        raise bad(f"has port {port_text[:8]}, expected 1 to 65535")
    return Target(host, port)


def _host_problem(host: str) -> str | None:
    """What is wrong with a host that should be an IPv4 address or a DNS name (an
    optional trailing dot marks it fully qualified), phrased to follow "has"."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"an invalid IPv4 address {_quote(host)}"
        return None
    name = host.removesuffix(".")
    if len(name) > 253:
        return f"a host name longer than 253 characters ({len(name)})"
    if not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        return (
            f"an invalid host name {_quote(host)}: each '.'-separated part must be 1-63"
            " letters, digits, '-' or '_', and not start or end with '-'"
        )
    return None


def _parse_network(value: object) -> Network:
    """An address or CIDR network, strictly: no host bits after the prefix."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_show(value)}")
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        address, slash, prefix = value.partition("/")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            address = ""
        if slash and address:
            raise ValueError(
                f"{value!r} has an invalid prefix length {prefix!r} (0-32 for IPv4, 0-128 for IPv6)"
            ) from None
        raise ValueError(
            f"{value!r} is not an IP address or CIDR network (like '10.0.0.0/8' or 'fd00::/8')"
        ) from None
    raise ValueError(f"{value!r} has host bits set after the prefix; did you mean '{loose}'?")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


class _Model(BaseModel):
    # JSON keys are the CamelCase aliases of the snake_case fields.
    model_config = ConfigDict(strict=True, extra="forbid", alias_generator=to_pascal, frozen=True)


class _HealthCheck(_Model):
    interval: float = Field(default=2.0, gt=0, le=3600, allow_inf_nan=False)
    timeout: float = Field(default=1.0, gt=0, le=300, allow_inf_nan=False)
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)


class _Options(_Model):
    """The per-app options: ``Defaults`` is one of these, and each app extends it.

    A field's default is the built-in default; ``model_fields_set`` tells what the file set.
    Field names match `AppConfig`'s.
    """

    # Strict mode would want a Strategy instance; lax enum validation is still an exact match.
    strategy: Annotated[Strategy, Field(strict=False)] = Strategy.ROUND_ROBIN
    connect_timeout: float = Field(default=2.0, gt=0, le=300, allow_inf_nan=False)
    idle_timeout: float = Field(default=3600.0, gt=0, le=7 * 86400, allow_inf_nan=False)
    max_connections: int | None = Field(default=None, ge=1, le=1_000_000)
    max_connections_per_source: int | None = Field(default=None, ge=1, le=1_000_000)
    first_byte_timeout: float | None = Field(default=None, gt=0, le=3600, allow_inf_nan=False)
    health_check: _HealthCheck | None = None
    send_proxy_protocol: Literal["v1", "v2"] | None = None
    accept_proxy_protocol: bool = False
    trusted_proxies: list[Annotated[Network, PlainValidator(_parse_network)]] = Field(
        default=list(LOOPBACK), min_length=1
    )
    inspect_timeout: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)


class _App(_Options):
    name: Annotated[str, AfterValidator(_check_name)]
    ports: list[Annotated[int, AfterValidator(_check_port)]] = Field(min_length=1)
    # PlainValidator: _parse_target does the whole job, checking that it got a str included.
    targets: list[Annotated[Target, PlainValidator(_parse_target)]] = Field(min_length=1)
    # each name is checked (and normalized) by _cross_check, which knows the app's name
    hostnames: list[str] = Field(default_factory=list, min_length=1)  # absent: none


class _File(_Model):
    apps: list[_App]
    defaults: _Options = _Options()


def _app_config(app: _App, defaults: _Options) -> AppConfig:
    """Merge: the app's own value, else the Defaults value (itself built-in unless set)."""
    options: dict[str, Any] = {
        name: getattr(app if name in app.model_fields_set else defaults, name)
        for name in _Options.model_fields
    }
    options["trusted_proxies"] = tuple(options["trusted_proxies"])
    if options["health_check"] is not None:
        options["health_check"] = HealthCheck(**options["health_check"].model_dump())
    hostnames = tuple(normalize_name(name) for name in app.hostnames)
    return AppConfig(
        name=app.name, ports=tuple(app.ports), targets=tuple(app.targets), hostnames=hostnames,
        **options,
    )  # fmt: skip


def _error(source: str, problems: list[_Problem]) -> ConfigError:
    """The first MAX_PROBLEMS problems in document order, each with its location, and
    how many more."""
    first = heapq.nsmallest(
        MAX_PROBLEMS, problems, key=lambda problem: [(isinstance(p, str), p) for p in problem[0]]
    )
    return ConfigError(
        source,
        [f"{_format_loc(loc)}: {message}" for loc, message in first],
        more=len(problems) - len(first),
    )


def _load_json(data: bytes | str, source: str) -> tuple[object, list[_Problem]]:
    """Decode and parse; return the document and its duplicate-key problems.

    Syntax errors are fatal (raised at once): nothing after them can be checked.
    """
    if isinstance(data, str):
        text = data.removeprefix("\ufeff")
    else:
        try:
            text = data.decode("utf-8-sig")  # tolerate the BOM some editors write
        except UnicodeDecodeError as exc:
            where = _line_column(data[: exc.start].decode("utf-8-sig"))
            raise ConfigError(source, [f"{where}: not valid UTF-8 ({exc.reason})"]) from None
    if not text.strip():
        raise ConfigError(source, ["(top level): empty document, expected a JSON object"])

    # json keeps the last of repeated keys silently; remember them to report instead.
    # Holding each object here keeps it alive, so its id() cannot be reused by another.
    repeated: list[tuple[dict[str, Any], list[str]]] = []

    def object_pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            counts = Counter(key for key, _ in pairs)
            repeated.append((obj, [key for key, count in counts.items() if count > 1]))
        return obj

    try:
        doc = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        message = exc.msg[:1].lower() + exc.msg[1:]
        raise ConfigError(source, [f"line {exc.lineno}, column {exc.colno}: {message}"]) from None
    except RecursionError:
        raise ConfigError(source, ["(top level): nested too deeply"]) from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise ConfigError(source, ["(top level): a number has too many digits"]) from None
    return doc, list(_duplicate_keys(doc, {id(obj): keys for obj, keys in repeated}))


def _line_column(prefix: str) -> str:
    """The position just after ``prefix``, counted in characters as json does."""
    line = prefix.count("\n") + 1
    column = len(prefix) - (prefix.rfind("\n") + 1) + 1
    return f"line {line}, column {column}"


def _duplicate_keys(doc: object, repeated: dict[int, list[str]]) -> Iterator[_Problem]:
    """Locate the objects with repeated keys (iteratively: documents may nest deeply)."""
    stack: list[tuple[_Loc, object]] = [((), doc)] if repeated else []
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            for key in repeated.get(id(value), ()):
                yield (*loc, key), f"duplicate key {_quote(key)}"
            stack.extend(((*loc, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*loc, index), item) for index, item in enumerate(value))


def _cross_check(doc: object) -> Iterator[_Problem]:
    """Report what spans several values: repeated names, ports and targets.

    Only values that are valid on their own are compared; pydantic reports the others.
    """
    apps = doc.get("Apps") if isinstance(doc, dict) else None
    if not isinstance(apps, list):
        return
    names: dict[str, int] = {}
    # each port's default app (the first without Hostnames), each (port, name)'s app
    defaults: dict[int, tuple[str, _Loc]] = {}
    holders: dict[tuple[int, str], tuple[str, _Loc]] = {}
    clashes: set[tuple[str, str]] = set()  # (other app, name) said for this app
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            continue
        name = app.get("Name")
        label = f"app {_quote(name)}" if isinstance(name, str) and name else f"app Apps[{i}]"
        if isinstance(name, str):
            if name in names:
                yield (
                    ("Apps", i, "Name"),
                    (f"app name {_quote(name)} is already used by Apps[{names[name]}]"),
                )
            names.setdefault(name, i)

        hostnames = None if "Hostnames" not in app else _hostnames(i, label, app["Hostnames"])
        if hostnames is not None:
            yield from hostnames[1]
        # its names -> where; None: no Hostnames (a default); False: not a list (pydantic's)
        names_here = None if hostnames is None else hostnames[0]
        own_ports: dict[int, _Loc] = {}
        for j, port in _items(app.get("Ports")):
            if type(port) is not int or not 1 <= port <= 65535:
                continue
            loc: _Loc = ("Apps", i, "Ports", j)
            where = _format_loc(loc)
            if port in own_ports:
                first = _format_loc(own_ports[port])
                yield loc, f"port {port} is listed twice in {label} ({first} and {where})"
                continue
            own_ports[port] = loc
            if names_here is None:  # the port's default: one at most
                first_default = defaults.setdefault(port, (label, loc))
                if first_default[1] != loc:
                    other, other_loc = first_default
                    yield (
                        loc,
                        f"port {port} is used by both {other} ({_format_loc(other_loc)}) "
                        f"and {label} ({where}); {_SHARING}",
                    )
            elif isinstance(names_here, dict):
                for name, name_loc in names_here.items():
                    other, other_loc = holders.setdefault((port, name), (label, name_loc))
                    if other_loc != name_loc and (other, name) not in clashes:
                        clashes.add((other, name))  # once, not again for each port they share
                        yield (
                            name_loc,
                            f"hostname {_quote(name)} on port {port} is in both {other} "
                            f"({_format_loc(other_loc)}) and {label}: a name picks one app "
                            "per port",
                        )
        clashes.clear()

        own_targets: dict[tuple[str, int], tuple[str, _Loc]] = {}
        for j, text in _items(app.get("Targets")):
            try:
                target = _parse_target(text)
            except ValueError:
                continue
            assert isinstance(text, str)  # _parse_target accepted it
            loc = ("Apps", i, "Targets", j)
            key = (target.host.lower(), target.port)  # DNS names are case-insensitive
            if key in own_targets:
                first_text, first_loc = own_targets[key]
                yield (
                    loc,
                    (
                        f"target {_quote(text)} is listed twice in {label}"
                        f" (as {_quote(first_text)} at {_format_loc(first_loc)})"
                    ),
                )
            own_targets.setdefault(key, (text, loc))


# why two apps without Hostnames cannot share a port, and what would let them
_SHARING = "apps share a port only if Hostnames tell them apart (one may go without)"


def _hostnames(i: int, label: str, value: object) -> tuple[dict[str, _Loc] | bool, list[_Problem]]:
    """An app's Hostnames, normalized, each with where it is (False: not a list, which
    pydantic reports), and the problems of the names themselves."""
    if not isinstance(value, list):
        return False, []
    names: dict[str, _Loc] = {}
    problems: list[_Problem] = []
    for j, text in enumerate(value):
        if not isinstance(text, str):
            continue  # pydantic: "must be a string"
        loc: _Loc = ("Apps", i, "Hostnames", j)
        try:
            name = normalize_name(text)
        except ValueError as exc:
            problems.append((loc, f"invalid hostname in {label}: {exc}, got {_show(text)}"))
            continue
        if name in names:
            problems.append((
                loc,
                f"hostname {_quote(name)} is listed twice in {label} "
                f"({_format_loc(names[name])} and {_format_loc(loc)})",
            ))  # fmt: skip
            continue
        names[name] = loc
    return names, problems


def _items(value: object) -> Iterable[tuple[int, object]]:
    return enumerate(value) if isinstance(value, list) else ()


_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}


def _message(err: ErrorDetails) -> str:
    """Rewrite a pydantic error as a short plain-English message."""
    kind, ctx, got = err["type"], err.get("ctx", {}), _show(err["input"])
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}, got {got}"
    match kind:
        case "missing":
            return f"missing required key {_quote(str(err['loc'][-1]))}"
        case "extra_forbidden":
            return f"unknown key {_quote(str(err['loc'][-1]))}{_key_hint(err['loc'])}"
        case "value_error":  # raised by our own validators, already phrased for people
            return str(ctx["error"])
        case "too_short":
            return f"must not be empty, got {'[]' if err['input'] == [] else got}"
        case "enum":
            return f"must be one of {', '.join(repr(s.value) for s in Strategy)}, got {got}"
        case "greater_than":
            return f"must be greater than {ctx['gt']:g}, got {got}"
        case "greater_than_equal":
            return f"must be at least {ctx['ge']:g}, got {got}"
        case "less_than_equal":
            return f"must be at most {ctx['le']:g}, got {got}"
        case "finite_number":
            return f"must be a finite number, got {got}"
    message = err["msg"].replace("Input should be", "must be")
    return f"{message[:1].lower()}{message[1:]}, got {got}"


def _key_hint(loc: _Loc) -> str:
    """Suggest the allowed key closest to an unknown one (ignoring case), or list them all."""
    model: type[_Model] = _File if len(loc) == 1 else _Options if loc[0] == "Defaults" else _App
    if "HealthCheck" in loc[:-1]:
        model = _HealthCheck
    allowed = {
        (field.alias or name).lower(): field.alias or name
        for name, field in model.model_fields.items()
    }
    close = difflib.get_close_matches(str(loc[-1]).lower(), allowed, n=1)
    if close:
        return f" (did you mean {allowed[close[0]]!r}?)"
    return f" (expected one of: {', '.join(sorted(allowed.values()))})"


def _format_loc(loc: _Loc) -> str:
    """``("Apps", 2, "Ports", 1)`` -> ``Apps[2].Ports[1]``; odd keys are JSON-quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or "(top level)"


_SHOW_CHARS = 36  # characters of a bad value shown in a message (a line stays readable)


def _quote(text: str) -> str:
    """Name a bad string inside a sentence: quoted, escaped, shortened like `_show`."""
    return repr(text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}...")


def _show(value: object) -> str:
    """Render a bad value briefly, as JSON, for "got ..." (escaping anything unprintable)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str) and len(value) > _SHOW_CHARS:
        value = f"{value[: _SHOW_CHARS - 3]}..."  # shortened inside its quotes
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:36]}..."
