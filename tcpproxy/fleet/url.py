"""Parse ``etcd://HOST:PORT[,HOST:PORT...]/PREFIX`` (and ``etcds://``) into an `EtcdTarget`.

Pure: no I/O. Credentials never come from the URL: a password in argv is visible to
every user of the machine (``ps``), so the user is a separate option and the
password is read from an environment variable named by `EtcdTarget.password_env`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PASSWORD_ENV", "DEFAULT_PORT", "EtcdTarget", "is_etcd_url", "parse_etcd_url"]

DEFAULT_PORT = 2379  # etcd's registered client port, as etcdctl assumes
DEFAULT_PASSWORD_ENV = "ETCD_PASSWORD"  # where the password is read from when a user is set
_SCHEMES = {"etcd": False, "etcds": True}  # scheme -> TLS
# A host name or IPv4 address (letters, digits, '.', '-', '_'), or an IPv6 address in [];
# then checked as what it claims to be (`_check_host`), as the HTTP client will.
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_DOTTED = re.compile(r"[0-9.]+")  # digits and dots only: meant as an IPv4 address
LABEL_MAX = 63  # bytes in one DNS label (RFC 1035 2.3.4)
NAME_MAX = 253  # bytes in a whole DNS name, without the trailing dot


@dataclass(frozen=True)
class EtcdTarget:
    """Where the fleet's configuration lives: endpoints of one etcd cluster and a key prefix.

    ``prefix`` starts with '/' and has no trailing '/': keys are ``prefix + "/apps/NAME"``.
    ``password_env`` names the environment variable holding ``user``'s password.
    """

    endpoints: tuple[tuple[str, int], ...]
    prefix: str
    tls: bool = False
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_env: str | None = None

    def describe_endpoints(self) -> str:
        """The endpoints as a user wrote them, for messages: ``127.0.0.1:2379,...``."""
        return ",".join(_join_host_port(host, port) for host, port in self.endpoints)

    def base_urls(self) -> tuple[str, ...]:
        """One HTTP(S) base URL per endpoint, in order."""
        scheme = "https" if self.tls else "http"
        return tuple(f"{scheme}://{_join_host_port(h, p)}" for h, p in self.endpoints)


def is_etcd_url(text: str) -> bool:
    """Whether ``text`` names etcd (``etcd://`` or ``etcds://``) rather than a file path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in _SCHEMES


def parse_etcd_url(
    text: str,
    *,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    user: str | None = None,
    password_env: str | None = None,
) -> EtcdTarget:
    """Parse ``text`` and attach the TLS and auth options; raise `ValueError` naming the bad part.

    A user implies a password, read from ``password_env`` (default ``ETCD_PASSWORD``).
    Client certificates and a CA need ``etcds://``: given with ``etcd://`` they would be
    silently unused.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"etcd URL {text!r}: must start with etcd:// or etcds://")
    tls = _SCHEMES[scheme.lower()]
    if any(c in rest for c in "?#"):
        raise ValueError(f"etcd URL {text!r}: no query or fragment allowed")
    hosts, slash, path = rest.partition("/")
    if "@" in hosts:
        raise ValueError(
            f"etcd URL {text!r}: no user or password in the URL; use --etcd-user and the "
            f"{DEFAULT_PASSWORD_ENV} environment variable"
        )
    endpoints = tuple(_parse_endpoint(text, part) for part in hosts.split(","))
    prefix = "/" + path.strip("/")
    if not slash or prefix == "/":
        raise ValueError(f"etcd URL {text!r}: needs a key prefix after the hosts, like /tcpproxy")
    if "//" in prefix:
        raise ValueError(f"etcd URL {text!r}: empty part in prefix {prefix!r}")
    if not tls and (cacert or cert or key):
        raise ValueError(f"etcd URL {text!r}: a CA or client certificate needs etcds://")
    if (cert is None) != (key is None):
        raise ValueError("etcd client certificate: give both --etcd-cert and --etcd-key")
    if user is not None:
        if not user or ":" in user:
            raise ValueError(
                f"etcd user {user!r}: a user name only; the password comes from the "
                f"{password_env or DEFAULT_PASSWORD_ENV} environment variable, never argv"
            )
        password_env = password_env or DEFAULT_PASSWORD_ENV
    elif password_env is not None:
        raise ValueError("etcd password environment variable given without a user")
    return EtcdTarget(endpoints, prefix, tls, cacert, cert, key, user, password_env)


def _parse_endpoint(url: str, part: str) -> tuple[str, int]:
    if not part:
        raise ValueError(f"etcd URL {url!r}: empty endpoint (hosts are HOST:PORT,HOST:PORT)")
    if part.startswith("["):
        host, _, port_text = part.partition("]")
        host += "]"
        if port_text and not port_text.startswith(":"):
            raise ValueError(f"etcd URL {url!r}: bad endpoint {part!r}")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = part.partition(":")
    if not _HOST.fullmatch(host):
        raise ValueError(f"etcd URL {url!r}: bad host {host!r} in endpoint {part!r}")
    problem = _check_host(host)
    if problem:
        raise ValueError(f"etcd URL {url!r}: bad host {host!r} in endpoint {part!r}: {problem}")
    if port_text == "":
        port = DEFAULT_PORT
    elif not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"etcd URL {url!r}: bad port {port_text!r} in endpoint {part!r}")
    else:
        port = int(port_text)
    return host.strip("[]"), port


def _check_host(host: str) -> str | None:
    """Why ``host`` (as written, IPv6 in []) cannot be connected to, or None.

    The pattern alone lets through what the HTTP client (an invalid IP literal) or
    the resolver (an empty or overlong DNS label, refused by the IDNA encoding)
    would raise on at the first request, far from the option that caused it.
    """
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "not an IPv6 address"
        return None
    if _DOTTED.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address (four numbers 0-255)"
        return None
    name = host.removesuffix(".")
    labels = name.split(".")
    if any(not label for label in labels):
        return "empty label"
    if any(len(label) > LABEL_MAX for label in labels):
        return f"a label over {LABEL_MAX} characters"
    if len(name) > NAME_MAX:
        return f"name over {NAME_MAX} characters"
    try:
        host.encode("idna")  # what the resolver does with it
    except UnicodeError as exc:
        return f"not a valid DNS name ({exc})"
    return None


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
