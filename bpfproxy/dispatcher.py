"""The control plane of bpfproxy's sk_lookup program (bpf/sk_lookup.c).

A :class:`Dispatcher` compiles the program with bcc, loads it as
``BPF_PROG_TYPE_SK_LOOKUP``, puts the proxy's one listening socket in the
program's sockmap and attaches the program to the listener's network
namespace with a BPF link. From then on a new TCP connection to any port in
:attr:`Dispatcher.ports` is accepted by that listener, which sees the port
that was dialled with ``getsockname()`` on the accepted socket. Only
connections to the listener's own bound address are steered (all addresses
when it is bound to the wildcard), so ``--bind 127.0.0.1`` keeps the app
ports off the host's other interfaces.

Lifetime: steering lasts exactly as long as the link fd is open. ``close()``
(or the process exiting, even by SIGKILL) closes it; nothing is pinned in
bpffs, so nothing outlives the process.

Typical use::

    check_environment()                 # SteeringError says what to install/do
    with Dispatcher(listener) as dispatcher:
        dispatcher.set_ports(config_ports)
        ...                             # accept() on listener
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import re
import socket
import struct
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from . import bpfsys

__all__ = [
    "COUNTERS",
    "DROP_REASONS",
    "MIN_KERNEL",
    "Dispatcher",
    "SteeringError",
    "check_environment",
    "compile_check",
]

#: sk_lookup (BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP links) arrived in Linux 5.9.
MIN_KERNEL = (5, 9)

#: Names of the program's per-CPU counters, in the order of ``enum counter``
#: in sk_lookup.c. The first two are drops; ``family_mismatch`` counts
#: connections passed to the normal lookup because the listener does not
#: serve their address family (e.g. IPv6 to an AF_INET listener);
#: ``not_bind_address`` those passed because their destination address is
#: not the listener's bound address.
COUNTERS = ("no_listener", "assign_failed", "family_mismatch", "not_bind_address")
DROP_REASONS = COUNTERS[:2]

_SOURCE_NAME = "sk_lookup.c"
_PROGRAM = b"steer"
_PORTS_MAP = b"steered_ports"
_LISTENER_MAP = b"listener"
_COUNTERS_MAP = b"counters"
_BIND_MAP = b"bind_addr"
_LISTENER_KEY = 0
_BIND_KEY = 0

# enum match in sk_lookup.c: how struct bind_addr matches one address family.
_MATCH_NONE = 0  # no address of the family
_MATCH_ANY = 1  # every address of the family (wildcard bind)
_MATCH_ADDR = 2  # exactly the entry's address
# struct bind_addr: match4, match6, 2 pad bytes, ip4, ip6 (both network byte order).
_BIND_ENTRY = struct.Struct("=BBxx4s16s")

# Linux capability bit numbers (include/uapi/linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39

# ioctl on a socket returning an fd of the socket's network namespace (Linux 4.9+).
_SIOCGSKNS = 0x894C
# Kernel-internal "operation not supported", seen by user space from bpf(2).
_ENOTSUPP = 524

_BCC_HINT = (
    "install Debian's python3-bpfcc and use a venv created with --system-site-packages; "
    "the PyPI package named bcc is unrelated"
)
_SUDO_HINT = "run it with sudo (bpfproxy needs CAP_BPF and CAP_NET_ADMIN)"


class SteeringError(Exception):
    """bpfproxy cannot steer on this machine; the message says what to do (one or two lines,
    no traceback needed)."""


# --------------------------------------------------------------------------- environment


def _kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _effective_caps() -> int:
    """The CapEff bit mask of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _import_bcc() -> Any:
    """Import Debian's bcc module or raise SteeringError saying how to get it."""
    try:
        import bcc
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        raise SteeringError(f"cannot import bcc ({exc}): {_BCC_HINT}.") from exc
    if not hasattr(bcc, "BPF"):
        raise SteeringError(f"the bcc module at {bcc.__file__} is not BPF's bcc: {_BCC_HINT}.")
    return bcc


def check_environment() -> None:
    """Raise SteeringError, saying what to do, when this machine cannot run bpfproxy.

    Checks, cheapest first: kernel version (sk_lookup needs 5.9), effective
    capabilities (CAP_BPF or CAP_SYS_ADMIN, plus CAP_NET_ADMIN), that Debian's
    bcc imports, and that bcc will find kernel headers to compile with.
    """
    release = os.uname().release
    if _kernel_version(release) < MIN_KERNEL:
        raise SteeringError(
            f"Linux {release} has no sk_lookup (needs {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer): "
            "upgrade the kernel, or use tcpproxy (one listener per port) on this machine."
        )

    caps = _effective_caps()
    has_bpf = bool(caps & (1 << _CAP_BPF | 1 << _CAP_SYS_ADMIN))
    has_net_admin = bool(caps & (1 << _CAP_NET_ADMIN))
    if not (has_bpf and has_net_admin):
        who = "not root" if os.geteuid() != 0 else "root without these capabilities"
        raise SteeringError(f"bpfproxy needs CAP_BPF and CAP_NET_ADMIN ({who}): run it with sudo.")

    _import_bcc()

    # bcc compiles against /lib/modules/$(uname -r)/build, or else against the
    # kheaders archive of kernels built with CONFIG_IKHEADERS.
    build = Path("/lib/modules") / release / "build"
    if not build.exists() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise SteeringError(
            f"kernel headers for {release} are missing ({build} is absent): "
            f"install linux-headers-{release} or run 'make setup'."
        )


# --------------------------------------------------------------------------- loading


def _source_path() -> Path:
    """sk_lookup.c: in the package dir (installed, or the symlink in a checkout), else bpf/."""
    package_dir = Path(__file__).parent
    candidates = (package_dir / _SOURCE_NAME, package_dir.parent / "bpf" / _SOURCE_NAME)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(path) for path in candidates)
    raise SteeringError(f"{_SOURCE_NAME} not found (looked at {looked}): reinstall bpfproxy.")


class _StderrCapture:
    """Redirect fd 2 to a temporary file for a moment, then keep what was written.

    bcc writes clang diagnostics and the verifier log straight to fd 2 from C;
    this is the way to put them into a SteeringError instead of the terminal.
    It affects the whole process (all threads) while active, which is only
    while compiling and loading.
    """

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> _StderrCapture:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._file.seek(0)
            self.text = self._file.read().decode(errors="replace").strip()
            self._file.close()


_LOG_LINES = 60  # lines of compiler or verifier output kept in a message
_BCC_SOURCE_NAME = "/virtual/main.c"  # what bcc calls a source given as text
_VERIFIER_INSN = re.compile(r"\d+: ")  # a verifier log line about one instruction
_VERIFIER_STATS = ("processed ", "verification time", "stack depth")  # its closing summary


def _head(text: str, lines: int = _LOG_LINES) -> str:
    """The start of clang's output: its first error is the one to fix, the rest may follow
    from it."""
    return "\n".join(text.splitlines()[:lines])


def _tail(text: str, lines: int = _LOG_LINES) -> str:
    """The end of the verifier's log: where it gave up, and why."""
    return "\n".join(text.splitlines()[-lines:])


def _verifier_reason(log: str) -> str:
    """The verifier's own words for a refusal: the lines after the last instruction it walked
    (e.g. "Unreleased reference id=5 alloc_insn=51"), without the statistics."""
    lines = log.splitlines()
    last_insn = max((i for i, line in enumerate(lines) if _VERIFIER_INSN.match(line)), default=-1)
    said = (line.strip() for line in lines[last_insn + 1 :])
    return "; ".join(line for line in said if line and not line.startswith(_VERIFIER_STATS))


def _release_bpf(bpf: Any) -> None:
    """bcc cleanup: close the program and map fds, free the module, drop bcc's atexit hooks."""
    try:
        bpf.cleanup()
    finally:
        atexit.unregister(bpf.cleanup)
        atexit.unregister(bpf.donothing)


def _load_error(err: int, log: str, source: Path) -> SteeringError:
    """Turn a failed BPF_PROG_LOAD into a SteeringError that says what to do."""
    if err == errno.EPERM:
        return SteeringError(f"the kernel refused to load the BPF program (EPERM): {_SUDO_HINT}.")
    # bcc prefixes the log with "bpf: Failed to load program: <strerror>"; the
    # rest, if any, is the verifier's.
    verifier_log = "\n".join(
        line for line in log.splitlines() if not line.startswith("bpf: Failed to load program")
    ).strip()
    if err == errno.EINVAL and not verifier_log:
        return SteeringError(
            "this kernel does not support sk_lookup programs (BPF_PROG_LOAD: EINVAL): "
            f"it needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]}+ built with CONFIG_BPF_SYSCALL."
        )
    reason = os.strerror(err) if err else "unknown error"
    said = _verifier_reason(verifier_log)
    return SteeringError(
        f"the kernel's verifier rejected {source} ({reason})"
        + (f": {said}" if said else "")
        + "; verifier log:\n"
        + _tail(verifier_log or log or "(empty)")
    )


def _compile_and_load() -> tuple[Any, int]:
    """Compile sk_lookup.c with bcc and load it; return (bcc.BPF, program fd)."""
    bcc = _import_bcc()
    source = _source_path()

    compile_failure: Exception | None = None
    bpf = None
    with _StderrCapture() as compile_output:
        try:
            bpf = bcc.BPF(text=source.read_bytes())
        except Exception as exc:
            compile_failure = exc
    if bpf is None:
        # bcc also creates the maps while "compiling": a refusal there is not a
        # compile error ("could not open bpf map: NAME, error: <strerror>").
        if "Operation not permitted" in compile_output.text:
            raise SteeringError(
                f"the kernel refused to create BPF maps (EPERM): {_SUDO_HINT}."
            ) from compile_failure
        map_errors = [line for line in compile_output.text.splitlines() if "bpf map" in line]
        if map_errors:
            raise SteeringError(
                f"the kernel refused to create BPF maps: {map_errors[0].strip()}."
            ) from compile_failure
        # clang's diagnostics, naming the real file (the line numbers are the file's).
        diagnostics = _head(compile_output.text.replace(_BCC_SOURCE_NAME, str(source)))
        raise SteeringError(
            f"bcc could not compile {source}:\n{diagnostics or compile_failure}"
        ) from compile_failure

    try:
        load_failure: Exception | None = None
        load_errno = 0
        with _StderrCapture() as load_output:
            try:
                program = bpf.load_func(
                    _PROGRAM, bpfsys.BPF_PROG_TYPE_SK_LOOKUP, attach_type=bpfsys.BPF_SK_LOOKUP
                )
            except Exception as exc:
                load_failure = exc
                load_errno = ctypes.get_errno()
        if load_failure is not None:
            raise _load_error(load_errno, load_output.text, source) from load_failure
        _check_maps(bpf)
    except BaseException:
        _release_bpf(bpf)
        raise
    return bpf, program.fd


def _map_fd(bpf: Any, name: bytes) -> int:
    import bcc.libbcc

    fd = bcc.libbcc.lib.bpf_table_fd(bpf.module, name)
    if fd < 0:
        raise SteeringError(f"{_SOURCE_NAME} has no map named {name.decode()}: reinstall bpfproxy.")
    return fd


def _check_maps(bpf: Any) -> None:
    """Check that the maps the kernel created are what this module writes into them."""
    ports = bpf[_PORTS_MAP]
    counters = bpf[_COUNTERS_MAP]
    expected = {
        # name: (map type, key size, value size, max entries)
        _PORTS_MAP: (
            bpfsys.BPF_MAP_TYPE_HASH,
            ctypes.sizeof(ctypes.c_uint16),
            ctypes.sizeof(ctypes.c_uint8),
            65536,
        ),
        _LISTENER_MAP: (bpfsys.BPF_MAP_TYPE_SOCKMAP, 4, 8, 1),
        _COUNTERS_MAP: (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(COUNTERS)),
        _BIND_MAP: (bpfsys.BPF_MAP_TYPE_ARRAY, 4, _BIND_ENTRY.size, 1),
    }
    python_side = {
        _PORTS_MAP: (ctypes.sizeof(ports.Key), ctypes.sizeof(ports.Leaf)),
        _COUNTERS_MAP: (ctypes.sizeof(counters.Key), ctypes.sizeof(counters.sLeaf)),
    }
    for name, want in expected.items():
        info = bpfsys.map_info(_map_fd(bpf, name))
        got = (info.type, info.key_size, info.value_size, info.max_entries)
        sizes = python_side.get(name, want[1:3])
        if got != want or sizes != want[1:3]:
            raise SteeringError(
                f"map {name.decode()} is (type, key, value, max_entries)={got} in the kernel, "
                f"{want} expected, ctypes key/value sizes {sizes}: "
                f"{_SOURCE_NAME} and dispatcher.py disagree; reinstall bpfproxy."
            )


def compile_check() -> None:
    """Check that this machine can run bpfproxy: compile and load the program, attach nothing.

    Raises SteeringError saying what to do. Used by ``make bpfproxy``.
    """
    check_environment()
    bpf, _ = _compile_and_load()
    _release_bpf(bpf)


# --------------------------------------------------------------------------- dispatcher


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


def _netns_fd_of(sock: socket.socket) -> int:
    """An fd of the network namespace the socket lives in (SIOCGSKNS), else of this thread's."""
    try:
        return fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    except OSError:
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def bind_entry(host: str) -> bytes:
    """The ``bind_addr`` map entry that steers connections to ``host`` only.

    ``host`` is a listener's bound address (``getsockname()[0]``). The
    wildcard (``::`` or ``0.0.0.0``) matches every address: whichever family
    the listener cannot take, bpf_sk_assign() refuses and the program passes
    (as before there was a bind address). A specific address matches itself
    only, and nothing of the other family; an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.1``) is the IPv4 address it maps, as for the kernel.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])  # no "%scope" in the match
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        mapped = address.ipv4_mapped
        match4 = _MATCH_ANY if mapped.is_unspecified else _MATCH_ADDR
        return _BIND_ENTRY.pack(match4, _MATCH_NONE, mapped.packed, bytes(16))
    if address.is_unspecified:
        return _BIND_ENTRY.pack(_MATCH_ANY, _MATCH_ANY, bytes(4), bytes(16))
    if isinstance(address, ipaddress.IPv4Address):
        return _BIND_ENTRY.pack(_MATCH_ADDR, _MATCH_NONE, address.packed, bytes(16))
    return _BIND_ENTRY.pack(_MATCH_NONE, _MATCH_ADDR, bytes(4), address.packed)


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"not a TCP port: {port!r}")
    return port


class Dispatcher:
    """Owns the BPF module, its maps and the netns link that steer ports to one listener.

    ``Dispatcher(listener)`` compiles and loads ``sk_lookup.c``, stores the
    listener in the sockmap and (``attach=True``) attaches the program with a
    BPF link to the network namespace *the listener lives in* (for a socket
    made in this process's namespace, that is the current one). Only
    connections to the listener's bound address are steered (see
    :func:`bind_entry`); a listener on the wildcard takes every address. Any failure
    undoes what was already set up and raises :class:`SteeringError`
    (:class:`ValueError` if ``listener`` is not a listening TCP socket).

    The listener stays the caller's: the Dispatcher never closes it. If it is
    closed while the Dispatcher is attached, the kernel removes it from the
    sockmap and steered ports drop SYNs (counted as ``no_listener``).

    Port updates (:meth:`set_ports`) apply a diff with batched map operations.
    Not thread-safe: call it from one thread (or guard it).
    """

    def __init__(self, listener: socket.socket, *, attach: bool = True) -> None:
        self._bpf: Any = None
        self._link_fd = -1
        self._ports: frozenset[int] = frozenset()
        self._batch = True  # cleared if the kernel lacks batched map operations
        self._bind_host = ""
        self._bind_entry = b""
        self._closed = False
        _check_listener(listener)
        try:
            self._bpf, self._prog_fd = _compile_and_load()
            self._ports_table = self._bpf[_PORTS_MAP]
            self._counters_table = self._bpf[_COUNTERS_MAP]
            self._put_listener(listener)
            self._put_bind_address(listener)
            if attach:
                self._attach(listener)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- setup steps

    def _put_listener(self, listener: socket.socket) -> None:
        map_fd = _map_fd(self._bpf, _LISTENER_MAP)
        try:
            bpfsys.map_update_elem(
                map_fd,
                struct.pack("=I", _LISTENER_KEY),
                struct.pack("=Q", listener.fileno()),
                bpfsys.BPF_ANY,
            )
        except OSError as exc:
            raise SteeringError(
                f"the kernel would not put the listener in the sockmap ({exc.strerror}): "
                "pass a bound, listening TCP socket."
            ) from exc

    def _put_bind_address(self, listener: socket.socket) -> None:
        """Steer only connections to the listener's bound address (set once, before attaching)."""
        self._bind_host = listener.getsockname()[0]
        self._bind_entry = bind_entry(self._bind_host)
        try:
            bpfsys.map_update_elem(
                _map_fd(self._bpf, _BIND_MAP),
                struct.pack("=I", _BIND_KEY),
                self._bind_entry,
                bpfsys.BPF_ANY,
            )
        except OSError as exc:
            raise SteeringError(
                f"the kernel would not store the bind address {self._bind_host} "
                f"({exc.strerror}): reinstall bpfproxy."
            ) from exc

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
        netns_fd = _netns_fd_of(listener)
        try:
            self._link_fd = bpfsys.link_create(self._prog_fd, netns_fd, bpfsys.BPF_SK_LOOKUP)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                hint = _SUDO_HINT
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
        wanted = frozenset(_check_port(port) for port in ports)
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
        return self._ports_table.Key(port) in self._ports_table

    def _write(self, ports: list[int], *, delete: bool, missing_ok: bool = False) -> None:
        """Add or delete ``ports`` in the port map: batched if possible, else one by one."""
        table = self._ports_table
        if self._batch and not missing_ok:
            keys = (table.Key * len(ports))(*ports)
            try:
                if delete:
                    table.items_delete_batch(keys)
                else:
                    values = (table.Leaf * len(ports))(*([1] * len(ports)))
                    table.items_update_batch(keys, values)
                return
            except Exception:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                    self._batch = False  # kernel older than 5.6: no batch ops on hash maps
                elif not (delete and err == errno.ENOENT):
                    raise OSError(err, os.strerror(err)) from None
                # A batch delete stops at the first missing key: finish one by one.
                missing_ok = delete
        for port in ports:
            key = table.Key(port)
            try:
                if delete:
                    del table[key]
                else:
                    table[key] = table.Leaf(1)
            except KeyError:  # bcc's way to say the key was not there
                if not missing_ok:
                    raise OSError(errno.ENOENT, f"port {port} was not in the map") from None
            except Exception as exc:
                err = ctypes.get_errno()
                raise OSError(err, f"{exc}") from exc

    # ----------------------------------------------------------------- counters

    def counters(self) -> dict[str, int]:
        """All the program's counters (see COUNTERS), summed over CPUs."""
        self._check_open()
        table = self._counters_table
        return {name: int(table.sum(table.Key(index)).value) for index, name in enumerate(COUNTERS)}

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

        Release order: first the link (closing its fd detaches the program, so
        from this moment new connections get the kernel's normal lookup, i.e.
        only sockets bound to the port itself), then bcc's module (the program
        and map fds; the kernel frees them, and the sockmap's hold on the
        listener, once the last reference is gone). The listener is not closed.
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
            bpf, self._bpf = self._bpf, None
            if bpf is not None:
                _release_bpf(bpf)

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
