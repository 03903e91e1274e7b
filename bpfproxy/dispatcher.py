"""Steers ports to one listener: owns the loaded sk_lookup program, its link, maps and counters.

A :class:`Dispatcher` gets the program compiled and loaded by a child process
(:mod:`bpfproxy.compiler`, as ``BPF_PROG_TYPE_SK_LOOKUP``), puts the proxy's one
listening socket in the program's sockmap and attaches the program to the
listener's network namespace with a BPF link. From then on a new TCP
connection to any port in :attr:`Dispatcher.ports` is accepted by that
listener, which sees the port that was dialled with ``getsockname()`` on the
accepted socket. Only connections to the listener's own bound address are
steered (all addresses when it is bound to the wildcard), so
``--bind 127.0.0.1`` keeps the app ports off the host's other interfaces.

Lifetime: steering lasts as long as the link is held: by the Dispatcher's
link fd, and by a pin in bpffs if :mod:`bpfproxy.pinning` pinned it. Without a
pin, ``close()`` (or the process exiting, even by SIGKILL) detaches the
program. With one, the program, its maps and its link outlive the process,
and a Dispatcher made from them (``program=``, ``link_fd=``) takes over: it
puts its own listener in the sockmap and diffs the port map it finds.

Typical use::

    check_environment()                 # loader; SteeringError says what to install/do
    with Dispatcher(listener) as dispatcher:
        dispatcher.set_ports(config_ports)
        ...                             # accept() on listener
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from types import TracebackType

from . import bpfsys
from .compiler import load_in_child
from .errors import SteeringError
from .loader import (
    BIND_ENTRY,
    BIND_MAP,
    COUNTERS,
    COUNTERS_MAP,
    DROP_REASONS,
    LISTENER_MAP,
    MIN_KERNEL,
    PORTS_MAP,
    SUDO_HINT,
    Program,
)

__all__ = ["Dispatcher", "bind_entry", "netns_fd_of"]

_LISTENER_KEY = 0
_BIND_KEY = 0

# enum match in sk_lookup.c: how struct bind_addr (loader.BIND_ENTRY) matches one address family.
_MATCH_NONE = 0  # no address of the family
_MATCH_ANY = 1  # every address of the family (wildcard bind)
_MATCH_ADDR = 2  # exactly the entry's address

# ioctl on a socket returning an fd of the socket's network namespace (Linux 4.9+).
_SIOCGSKNS = 0x894C
# Kernel-internal "operation not supported", seen by user space from bpf(2).
_ENOTSUPP = 524

_PORT_KEY = struct.Struct("=H")  # steered_ports: u16 port (host order) -> u8 1
_PORT_VALUE = b"\x01"
_COUNTER = struct.Struct("=Q")  # one CPU's u64 slot of a per-CPU counter


def _check_listener(listener: socket.socket) -> None:
    sock_type = listener.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    protocol = listener.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if (
        listener.family not in (socket.AF_INET, socket.AF_INET6)
        or sock_type != socket.SOCK_STREAM
        or protocol != socket.IPPROTO_TCP
        or not listening
    ):
        raise ValueError(f"Dispatcher needs a listening TCP/IP socket, got {listener!r}")


def netns_fd_of(sock: socket.socket) -> int:
    """An fd of the network namespace the socket lives in (SIOCGSKNS), else of this thread's."""
    try:
        return fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    except OSError:
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def bind_entry(host: str, hold: bool = False) -> bytes:
    """The ``bind_addr`` map entry that steers connections to ``host`` only.

    ``host`` is a listener's bound address (``getsockname()[0]``). The
    wildcard (``::`` or ``0.0.0.0``) matches every address: whichever family
    the listener cannot take, bpf_sk_assign() refuses and the program passes
    (as before there was a bind address). A specific address matches itself
    only, and nothing of the other family; an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.1``) is the IPv4 address it maps, as for the kernel.
    ``hold`` is the flag of the hold program (see :meth:`Dispatcher.set_hold`).
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])  # no "%scope" in the match
    flag = int(hold)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        mapped = address.ipv4_mapped
        match4 = _MATCH_ANY if mapped.is_unspecified else _MATCH_ADDR
        return BIND_ENTRY.pack(match4, _MATCH_NONE, flag, mapped.packed, bytes(16))
    if address.is_unspecified:
        return BIND_ENTRY.pack(_MATCH_ANY, _MATCH_ANY, flag, bytes(4), bytes(16))
    if isinstance(address, ipaddress.IPv4Address):
        return BIND_ENTRY.pack(_MATCH_ADDR, _MATCH_NONE, flag, address.packed, bytes(16))
    return BIND_ENTRY.pack(_MATCH_NONE, _MATCH_ADDR, flag, bytes(4), address.packed)


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"not a TCP port: {port!r}")
    return port


class Dispatcher:
    """Owns the loaded program, its maps and the netns link that steer ports to one listener.

    ``Dispatcher(listener)`` compiles and loads ``sk_lookup.c`` (or takes
    ``program``, already loaded, e.g. from its pins), stores the listener in
    the sockmap and (``attach=True``) attaches the program with a BPF link to
    the network namespace *the listener lives in* (for a socket made in this
    process's namespace, that is the current one); given ``link_fd`` (a link
    that already attaches ``program``, e.g. a pinned one) it adopts that link
    and starts from the ports the map already holds. Only connections to the
    listener's bound address are steered (see :func:`bind_entry`); a
    listener on the wildcard takes every address. Any failure undoes what
    was already set up (closing ``program`` and ``link_fd`` too: they are the
    Dispatcher's from the call on) and raises :class:`SteeringError`
    (:class:`ValueError` if ``listener`` is not a listening TCP socket).

    The listener stays the caller's: the Dispatcher never closes it. If it is
    closed while the Dispatcher is attached, the kernel removes it from the
    sockmap and steered ports drop SYNs (counted as ``no_listener``).

    Port updates (:meth:`set_ports`) apply a diff with batched map operations.
    Not thread-safe: call it from one thread (or guard it).
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        attach: bool = True,
        program: Program | None = None,
        link_fd: int | None = None,
    ) -> None:
        self._program = program
        self._link_fd = -1 if link_fd is None else link_fd
        self._ports: frozenset[int] = frozenset()
        self._batch = True  # cleared if the kernel lacks batched map operations
        self._bind_host = ""
        self._bind_entry = b""
        self._hold = False
        self._closed = False
        try:
            _check_listener(listener)
            if self._program is None:
                self._program = load_in_child()
            self._ports_fd = self._program.maps[PORTS_MAP]
            self._counters_fd = self._program.maps[COUNTERS_MAP]
            if self._link_fd >= 0:  # adopted: keep what the map says until told otherwise
                self._ports = self._read_ports()
                self._hold = self._read_hold()
            self._put_listener(listener)
            self._put_bind_address(listener)
            if attach and self._link_fd < 0:
                self._attach(listener)
        except BaseException:
            self.close()
            raise

    @property
    def program(self) -> Program:
        """The program's and maps' descriptors (still the Dispatcher's: for pinning them)."""
        self._check_open()
        assert self._program is not None
        return self._program

    @property
    def link_fd(self) -> int:
        """The link's descriptor, -1 if not attached (still the Dispatcher's)."""
        return self._link_fd

    def resync(self) -> None:
        """Believe the port map again (another process may have changed it: an upgrade
        that failed after its diff), so the next set_ports and set_hold write what
        differs from it."""
        self._check_open()
        self._ports = self._read_ports()
        self._hold = self._read_hold()

    def _read_ports(self) -> frozenset[int]:
        """The ports the map holds (a map taken over from a pin holds the last run's)."""
        keys = bpfsys.map_keys(self._ports_fd, _PORT_KEY.size)
        return frozenset(_PORT_KEY.unpack(key)[0] for key in keys)

    # ----------------------------------------------------------------- setup steps

    def _put_listener(self, listener: socket.socket) -> None:
        assert self._program is not None
        listener_map = self._program.maps[LISTENER_MAP]
        try:
            bpfsys.map_update_elem(
                listener_map,
                struct.pack("=I", _LISTENER_KEY),
                struct.pack("=Q", listener.fileno()),
                bpfsys.BPF_ANY,
            )
        except OSError as exc:
            raise SteeringError(
                f"the kernel would not put the listener in the sockmap ({exc.strerror}): "
                "pass a bound, listening TCP socket."
            ) from exc

    def _read_hold(self) -> bool:
        assert self._program is not None
        entry = bpfsys.map_lookup_elem(
            self._program.maps[BIND_MAP], struct.pack("=I", _BIND_KEY), BIND_ENTRY.size
        )
        return bool(entry and BIND_ENTRY.unpack(entry)[2])

    def _put_bind_address(self, listener: socket.socket) -> None:
        """Steer only connections to the listener's bound address (set once, before attaching)."""
        self._bind_host = listener.getsockname()[0]
        self._bind_entry = bind_entry(self._bind_host)
        self._write_bind_entry()

    def _write_bind_entry(self) -> None:
        assert self._program is not None
        try:
            bpfsys.map_update_elem(
                self._program.maps[BIND_MAP],
                struct.pack("=I", _BIND_KEY),
                bind_entry(self._bind_host, self._hold),
                bpfsys.BPF_ANY,
            )
        except OSError as exc:
            raise SteeringError(
                f"the kernel would not store the bind address {self._bind_host} "
                f"({exc.strerror}): reinstall bpfproxy."
            ) from exc

    def set_hold(self, hold: bool) -> None:
        """Whether the hold program (attached only to pinned state, see
        :mod:`bpfproxy.pinning`) drops steered SYNs while no listener is in
        the sockmap: on while serving, so a crash or restart makes clients
        retransmit instead of being refused; off for a clean stop, so a
        stopping proxy refuses at once."""
        self._check_open()
        if hold != self._hold:
            self._hold = hold
            self._write_bind_entry()

    @property
    def bind_address(self) -> str | None:
        """The only destination address steered, or None for every address (wildcard)."""
        return None if self._bind_entry == bind_entry("::") else self._bind_host

    def set_listener(self, listener: socket.socket) -> None:
        """Steer to `listener` from now on (e.g. another member of the same
        SO_REUSEPORT group, when the one in the sockmap is closing).

        It must be bound to the same address as the first: the bind address
        in the program is not changed while steering.
        """
        self._check_open()
        _check_listener(listener)
        host = listener.getsockname()[0]
        if bind_entry(host) != self._bind_entry:
            raise ValueError(
                f"set_listener: the new listener is bound to {host}, "
                f"the steered address is {self._bind_host}"
            )
        self._put_listener(listener)

    def _attach(self, listener: socket.socket) -> None:
        assert self._program is not None
        netns_fd = netns_fd_of(listener)
        try:
            self._link_fd = bpfsys.link_create(
                self._program.prog_fd, netns_fd, bpfsys.BPF_SK_LOOKUP
            )
        except OSError as exc:
            if exc.errno == errno.EPERM:
                hint = SUDO_HINT
            elif exc.errno == errno.EINVAL:
                hint = (
                    "this kernel cannot attach sk_lookup programs to a network namespace "
                    f"(needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]}+)"
                )
            else:
                hint = "too many sk_lookup programs attached?" if exc.errno == errno.E2BIG else ""
            raise SteeringError(
                f"could not attach the sk_lookup program (BPF_LINK_CREATE: {exc.strerror})"
                + (f": {hint}." if hint else ".")
            ) from exc
        finally:
            os.close(netns_fd)

    # ----------------------------------------------------------------- ports

    @property
    def ports(self) -> frozenset[int]:
        """The ports currently steered to the listener."""
        return self._ports

    @property
    def attached(self) -> bool:
        """Whether the program is attached (steering) right now."""
        return self._link_fd >= 0

    def set_ports(self, ports: Iterable[int]) -> tuple[frozenset[int], frozenset[int]]:
        """Steer exactly ``ports`` from now on; return ``(added, removed)``.

        Only the difference with :attr:`ports` is written: new ports first
        (one batched update), then withdrawn ports (one batched delete), so a
        port present before and after is never unsteered in between. On
        failure, raises SteeringError; :attr:`ports` then still describes what
        the map holds.
        """
        self._check_open()
        wanted = frozenset(ports)  # a Config's ports are a frozenset already: no copy
        if wanted and not (
            set(map(type, wanted)) == {int} and 1 <= min(wanted) <= max(wanted) <= 65535
        ):
            for port in wanted:  # the checks at C speed above; here, which port is bad
                _check_port(port)
        added = wanted - self._ports
        removed = self._ports - wanted
        if added:
            try:
                self._write(sorted(added), delete=False)
            except OSError as exc:
                # Take back whatever part of the batch went in.
                with contextlib.suppress(OSError):
                    self._write(sorted(added), delete=True, missing_ok=True)
                raise SteeringError(f"could not add {len(added)} steered ports: {exc}") from exc
            self._ports = self._ports | added
        if removed:
            try:
                self._write(sorted(removed), delete=True)
            except OSError as exc:
                still = frozenset(port for port in removed if self._has_port(port))
                self._ports = wanted | still
                raise SteeringError(f"could not remove {len(still)} steered ports: {exc}") from exc
            self._ports = wanted
        return added, removed

    def _has_port(self, port: int) -> bool:
        return bpfsys.map_lookup_elem(self._ports_fd, _PORT_KEY.pack(port), 1) is not None

    def _write(self, ports: list[int], *, delete: bool, missing_ok: bool = False) -> None:
        """Add or delete ``ports`` in the port map: batched if possible, else one by one."""
        if self._batch and not missing_ok:
            keys = (ctypes.c_uint16 * len(ports))(*ports)
            try:
                if delete:
                    bpfsys.map_delete_batch(self._ports_fd, keys, len(ports))
                else:
                    values = (ctypes.c_uint8 * len(ports))(*([1] * len(ports)))
                    bpfsys.map_update_batch(self._ports_fd, keys, values, len(ports))
                return
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                    self._batch = False  # kernel older than 5.6: no batch ops on hash maps
                elif not (delete and exc.errno == errno.ENOENT):
                    raise
                # A batch delete stops at the first missing key: finish one by one.
                missing_ok = delete
        for port in ports:
            key = _PORT_KEY.pack(port)
            try:
                if delete:
                    bpfsys.map_delete_elem(self._ports_fd, key)
                else:
                    bpfsys.map_update_elem(self._ports_fd, key, _PORT_VALUE)
            except OSError as exc:
                if not (missing_ok and exc.errno == errno.ENOENT):
                    raise

    # ----------------------------------------------------------------- counters

    def counters(self) -> dict[str, int]:
        """All the program's counters (see COUNTERS), summed over CPUs."""
        self._check_open()
        cpus = bpfsys.possible_cpus()
        counts = {}
        for index, name in enumerate(COUNTERS):
            raw = bpfsys.map_lookup_elem(
                self._counters_fd, struct.pack("=I", index), _COUNTER.size * cpus
            )
            counts[name] = sum(value for (value,) in _COUNTER.iter_unpack(raw or b""))
        return counts

    def drop_counts(self) -> dict[str, int]:
        """SYNs the program dropped, per reason (see DROP_REASONS), summed over CPUs."""
        counts = self.counters()
        return {reason: counts[reason] for reason in DROP_REASONS}

    # ----------------------------------------------------------------- lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Dispatcher is closed")

    def close(self) -> None:
        """Stop steering and free the program and maps. Idempotent.

        Release order: first the link (closing its fd detaches the program
        unless a pin still holds the link, so from this moment new connections
        get the kernel's normal lookup, i.e. only sockets bound to the port
        itself), then the program and map fds (the kernel frees them, and the
        sockmap's hold on the listener, once the last reference is gone). The
        listener is not closed, nor is anything unpinned.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._link_fd >= 0:
                os.close(self._link_fd)
        finally:
            self._link_fd = -1
            self._ports = frozenset()
            program, self._program = self._program, None
            if program is not None:
                program.close()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("attached" if self.attached else "detached")
        where = self.bind_address or "every address"
        return f"<Dispatcher {state}, {len(self._ports)} ports on {where}>"
