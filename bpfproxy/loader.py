"""Gets bpf/sk_lookup.c into the kernel: checks the machine, compiles and loads it with bcc.

:func:`check_environment` says, before anything is loaded, what this machine
lacks (kernel version, capabilities, bcc, kernel headers).
:func:`compile_and_load` compiles the program, loads it as
``BPF_PROG_TYPE_SK_LOOKUP`` and returns a :class:`Program`: file descriptors
of the program and of its maps, checked to have the layout described here
(the names and sizes the dispatcher writes by), with bcc's module already
freed. Compile, verifier and permission failures become a
:class:`SteeringError` that names the file and the reason.
:func:`compile_check` does both and attaches nothing (``bpfproxy --check``).
:func:`check_program` checks a program and maps opened some other way (from
their pins in bpffs, see :mod:`bpfproxy.pinning`) the same way.

What is loaded steers nothing yet: :class:`bpfproxy.dispatcher.Dispatcher`
owns it, fills its maps and attaches it. Only descriptors leave this module:
bpfproxy calls :func:`compile_and_load` in a short-lived child process
(:mod:`bpfproxy.compiler`), so the serving process never imports bcc.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import importlib.util
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bpfsys
from .errors import SteeringError

__all__ = [
    "BIND_ENTRY",
    "BIND_MAP",
    "COUNTERS",
    "COUNTERS_MAP",
    "DROP_REASONS",
    "LISTENER_MAP",
    "MAPS",
    "MIN_KERNEL",
    "PORTS_MAP",
    "SUDO_HINT",
    "Program",
    "check_environment",
    "check_program",
    "compile_and_load",
    "compile_check",
    "source_digest",
]

#: sk_lookup (BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP links) arrived in Linux 5.9.
MIN_KERNEL = (5, 9)

#: Names of the program's per-CPU counters, in the order of ``enum counter``
#: in sk_lookup.c. ``no_listener``, ``assign_failed`` and ``held`` are drops
#: (``held``: a SYN dropped by the hold program while no process serves, so the
#: client retransmits); ``family_mismatch`` counts connections passed to the
#: normal lookup because the listener does not serve their address family
#: (e.g. IPv6 to an AF_INET listener); ``not_bind_address`` those passed
#: because their destination address is not the listener's bound address.
COUNTERS = ("no_listener", "assign_failed", "family_mismatch", "not_bind_address", "held")
DROP_REASONS = ("no_listener", "assign_failed", "held")

_SOURCE_NAME = "sk_lookup.c"
_PROGRAM = b"steer"
_HOLD_PROGRAM = b"hold"  # tc ingress: drops steered SYNs while no process serves
# The program's maps, by name (see _check_maps for their layout).
PORTS_MAP = b"steered_ports"
LISTENER_MAP = b"listener"
COUNTERS_MAP = b"counters"
BIND_MAP = b"bind_addr"

#: struct bind_addr: match4, match6, hold, a pad byte, ip4, ip6 (both network byte order).
BIND_ENTRY = struct.Struct("=BBBx4s16s")

#: The maps the kernel must have made for the program, by name:
#: (map type, key size, value size, max entries), as the dispatcher writes them.
MAPS = {
    PORTS_MAP: (bpfsys.BPF_MAP_TYPE_HASH, 2, 1, 65536),  # u16 port -> u8 1
    LISTENER_MAP: (bpfsys.BPF_MAP_TYPE_SOCKMAP, 4, 8, 1),
    COUNTERS_MAP: (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(COUNTERS)),
    BIND_MAP: (bpfsys.BPF_MAP_TYPE_ARRAY, 4, BIND_ENTRY.size, 1),
}


@dataclass
class Program:
    """The loaded programs and their maps, as file descriptors this object owns.

    ``prog_fd`` is the sk_lookup program, ``hold_fd`` the tc program that
    holds SYNs while no process serves; ``maps`` is keyed by map name (see
    :data:`MAPS`). :meth:`close` closes every descriptor; the kernel frees
    each object once nothing else (a link, a pin in bpffs) holds it.
    """

    prog_fd: int
    hold_fd: int
    maps: dict[bytes, int]

    def close(self) -> None:
        """Close the descriptors. Idempotent."""
        fds = [self.prog_fd, self.hold_fd, *self.maps.values()]
        self.prog_fd, self.hold_fd, self.maps = -1, -1, {}
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


# Linux capability bit numbers (include/uapi/linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39

_BCC_HINT = (
    "install Debian's python3-bpfcc and use a venv created with --system-site-packages; "
    "the PyPI package named bcc is unrelated"
)
SUDO_HINT = "run it with sudo (bpfproxy needs CAP_BPF and CAP_NET_ADMIN)"


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


def _find_bcc() -> None:
    """Raise SteeringError unless Debian's bcc can be imported, without importing it.

    Importing bcc maps LLVM into the process: only the compile child
    (:mod:`bpfproxy.compiler`) does, and reports a module that does not load.
    """
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as exc:
        raise SteeringError(f"cannot import bcc ({exc}): {_BCC_HINT}.") from exc
    if spec is None:
        raise SteeringError(f"cannot import bcc (no module named 'bcc'): {_BCC_HINT}.")
    locations = list(spec.submodule_search_locations or ())
    if not any(os.path.exists(os.path.join(where, "libbcc.py")) for where in locations):
        raise SteeringError(f"the bcc module at {spec.origin} is not BPF's bcc: {_BCC_HINT}.")


def check_environment() -> None:
    """Raise SteeringError, saying what to do, when this machine cannot run bpfproxy.

    Checks, cheapest first: kernel version (sk_lookup needs 5.9), effective
    capabilities (CAP_BPF or CAP_SYS_ADMIN, plus CAP_NET_ADMIN), that Debian's
    bcc is installed (found, not imported: see :func:`_find_bcc`), and that
    bcc will find kernel headers to compile with.
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
        raise SteeringError(
            f"bpfproxy needs CAP_BPF and CAP_NET_ADMIN ({who}): "
            + _privilege_hint(_container_evidence())
        )

    _find_bcc()

    # bcc compiles against /lib/modules/$(uname -r)/build, or else against the
    # kheaders archive of kernels built with CONFIG_IKHEADERS.
    build = Path("/lib/modules") / release / "build"
    if not build.exists() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise SteeringError(
            f"kernel headers for {release} are missing ({build} is absent): "
            + _headers_hint(release, _container_evidence())
        )


#: Files container engines create in a container's root: Docker, Podman.
_CONTAINER_MARKERS = ("/.dockerenv", "/run/.containerenv")
#: Words in /proc/1/cgroup that name a container runtime.
_CONTAINER_CGROUPS = ("docker", "containerd", "libpod", "kubepods", "lxc")
#: `docker run` options for bpfproxy; Docker before Engine 23 knows no CAP_BPF.
_DOCKER_CAPS = "--cap-add BPF --cap-add NET_ADMIN"
_DOCKER_CAPS_BEFORE_23 = "--cap-add SYS_ADMIN --cap-add NET_ADMIN"
_HEADER_MOUNTS = "-v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro"


def _container_evidence() -> str | None:
    """What says this process runs in a container (a marker file or a cgroup), or None.

    It changes what bpfproxy's messages tell the user to do: capabilities and
    kernel headers are given by the host and the run command, not by sudo or
    apt inside the container.
    """
    for marker in _CONTAINER_MARKERS:
        if os.path.exists(marker):
            return marker
    try:
        with open("/proc/1/cgroup") as cgroups:
            text = cgroups.read()
    except OSError:
        return None
    word = next((word for word in _CONTAINER_CGROUPS if word in text), None)
    return f"/proc/1/cgroup ({word})" if word else None


def _privilege_hint(container: str | None) -> str:
    """What to do about missing capabilities, on a host or in a container."""
    if container is None:
        return "run it with sudo."
    return (
        f"this looks like a container ({container}): run it as root with {_DOCKER_CAPS} "
        f"({_DOCKER_CAPS_BEFORE_23} on Docker before 23); outside a container, run it with sudo."
    )


def _headers_hint(release: str, container: str | None) -> str:
    """What to do about missing kernel headers, on a host or in a container."""
    if container is None:
        return (
            f"install the headers of kernel {release}, or run 'sudo make setup', "
            "which links Debian's generic ones when the kernel has none."
        )
    return (
        f"this looks like a container ({container}): the headers come from the host; "
        f"run `sudo make setup` on the host, then mount them with {_HEADER_MOUNTS}."
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


def release_bpf(bpf: Any) -> None:
    """bcc cleanup: close the program and map fds, free the module, drop bcc's atexit hooks."""
    try:
        bpf.cleanup()
    finally:
        atexit.unregister(bpf.cleanup)
        atexit.unregister(bpf.donothing)


def _load_error(err: int, log: str, source: Path) -> SteeringError:
    """Turn a failed BPF_PROG_LOAD into a SteeringError that says what to do."""
    if err == errno.EPERM:
        return SteeringError(f"the kernel refused to load the BPF program (EPERM): {SUDO_HINT}.")
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


def source_digest() -> str:
    """A hash of the program's source: a pinned program of the same digest is this one."""
    return hashlib.sha256(_source_path().read_bytes()).hexdigest()[:16]


def compile_and_load() -> Program:
    """Compile sk_lookup.c with bcc, load it and return its descriptors; bcc's module is freed.

    Raises SteeringError saying what to do (compile error, verifier log,
    missing privileges, maps not as expected).
    """
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
                f"the kernel refused to create BPF maps (EPERM): {SUDO_HINT}."
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
                hold = bpf.load_func(_HOLD_PROGRAM, bpfsys.BPF_PROG_TYPE_SCHED_CLS)
            except Exception as exc:
                load_failure = exc
                load_errno = ctypes.get_errno()
        if load_failure is not None:
            raise _load_error(load_errno, load_output.text, source) from load_failure
        # Our own descriptors (os.dup: not inherited by children), then bcc goes.
        loaded = Program(os.dup(program.fd), os.dup(hold.fd), {})
        try:
            for name in MAPS:
                loaded.maps[name] = os.dup(_bcc_map_fd(bpf, name))
            check_program(loaded)
        except BaseException:
            loaded.close()
            raise
    finally:
        release_bpf(bpf)
    return loaded


def _bcc_map_fd(bpf: Any, name: bytes) -> int:
    import bcc.libbcc

    fd = bcc.libbcc.lib.bpf_table_fd(bpf.module, name)
    if fd < 0:
        raise SteeringError(f"{_SOURCE_NAME} has no map named {name.decode()}: reinstall bpfproxy.")
    return fd


def check_program(program: Program) -> None:
    """Check that ``program`` is an sk_lookup program whose maps are what the dispatcher
    writes into them (types, key and value sizes, entries), and are its own maps.

    Raises SteeringError naming the first difference.
    """
    info = bpfsys.prog_info(program.prog_fd)
    if info.type != bpfsys.BPF_PROG_TYPE_SK_LOOKUP:
        raise SteeringError(f"program {info.name!r} (id {info.id}) is not an sk_lookup program.")
    hold = bpfsys.prog_info(program.hold_fd)
    if hold.type != bpfsys.BPF_PROG_TYPE_SCHED_CLS:
        raise SteeringError(f"program {hold.name!r} (id {hold.id}) is not a tc program.")
    for name, want in MAPS.items():
        fd = program.maps.get(name, -1)
        if fd < 0:
            raise SteeringError(f"map {name.decode()} is missing.")
        map_info = bpfsys.map_info(fd)
        got = (map_info.type, map_info.key_size, map_info.value_size, map_info.max_entries)
        if got != want:
            raise SteeringError(
                f"map {name.decode()} is (type, key, value, max_entries)={got} in the kernel, "
                f"{want} expected: {_SOURCE_NAME} and loader.py disagree."
            )
        if map_info.id not in info.map_ids or map_info.id not in hold.map_ids:
            raise SteeringError(f"map {name.decode()} (id {map_info.id}) is not the programs'.")


def compile_check() -> None:
    """Check that this machine can run bpfproxy: compile and load the program, attach nothing.

    Raises SteeringError saying what to do. Used by ``make bpfproxy``.
    """
    check_environment()
    compile_and_load().close()
