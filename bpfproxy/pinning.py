"""An instance's BPF state pinned in bpffs: where it lives, who holds it, reuse and release.

bpfproxy pins its sk_lookup program, the program's maps and the netns link
under ``<bpffs>/bpfproxy/<instance>/`` so that they outlive the process:

- ``prog``, ``link``, ``map_steered_ports``, ``map_listener``,
  ``map_bind_addr``, ``map_counters``: the sk_lookup program, its netns link
  and its maps;
- ``hold`` and ``hold-<ifindex>``: the tc program that drops steered SYNs
  while no process serves (so clients retransmit instead of being refused;
  see bpf/sk_lookup.c) and its tcx link on each interface (Ethernet or
  loopback) there was when a bpfproxy of this instance started;
- ``source-<digest>/``: an empty directory naming the program's source
  (:func:`bpfproxy.loader.source_digest`); bpffs holds no regular files.

Rules:

1. One process holds an instance at a time: it keeps an exclusive
   ``flock`` on the instance's directory while it runs (the kernel drops it
   when the process dies, even by SIGKILL). A second start, and
   ``--release``, see the lock and refuse. An upgrade (SIGUSR2) hands the
   locked directory's descriptor to the new process (bpfproxy.handover):
   the same open file, so the lock passes with it.
2. A start that finds the instance's pins reuses them when they are
   complete and compatible (same source digest, maps of the expected layout
   and owned by the program, the link attaching that program to this
   network namespace): no compile. Anything else is an error that says to
   run ``bpfproxy --release``; pins are never replaced silently.
3. A start that finds nothing compiles, attaches, and pins; if it fails
   before serving, it unpins what it pinned.
4. A clean stop unpins (the link first) and removes the directory, so
   every port is released when the process's own descriptors close. A
   crash or SIGKILL leaves everything pinned: the ports stay steered and
   the next start takes over.

If the bpffs root (``/sys/fs/bpf`` by default) is not a bpffs mount, one is
mounted there first, as bpftool does. Note that ``ip netns exec`` gives
each command a mount namespace of its own with a fresh ``/sys``: a bpffs
mounted there lasts only as long as that command, so for pins that survive a
restart under ``ip netns exec`` pass a root it leaves alone (``--bpffs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import bpfsys
from .compiler import load_in_child
from .errors import SteeringError
from .loader import MAPS, Program, check_program, source_digest

__all__ = [
    "BPFFS_ENV",
    "DEFAULT_BPFFS",
    "Instance",
    "NoBpffs",
    "check_instance_name",
    "default_instance",
    "ensure_bpffs",
    "is_bpffs",
    "release",
]

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

log = logging.getLogger("tcpproxy")

DEFAULT_BPFFS = "/sys/fs/bpf"  # where systemd mounts bpffs
BPFFS_ENV = "BPFPROXY_BPFFS"  # another root (tests: one bpffs each)
BPF_FS_MAGIC = 0xCAFE4A11  # statfs f_type of a bpffs (linux/magic.h)
_SUBDIR = "bpfproxy"

#: An instance name: a path component anyone can type, at most 64 characters.
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

PROG_PIN = "prog"
LINK_PIN = "link"
HOLD_PIN = "hold"
_HOLD_LINK_PREFIX = "hold-"
_LOCK_ATTEMPTS = 3  # a clean stop of the same instance may remove the directory meanwhile
_MAP_PREFIX = "map_"
_SOURCE_PREFIX = "source-"

_libc = ctypes.CDLL(None, use_errno=True)


class NoBpffs(SteeringError):
    """No bpffs at the root and none could be mounted (e.g. a container without
    CAP_SYS_ADMIN): bpfproxy can still run, without pinned state."""


def default_instance(listen_port: int) -> str:
    """The instance name when none is given: one instance per listening port."""
    return f"port-{listen_port}"


def check_instance_name(name: str) -> str:
    """``name`` if it is a valid instance name, else ValueError saying what is allowed."""
    if not _INSTANCE_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an instance name: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------- the mount


def is_bpffs(path: str) -> bool:
    """Whether ``path`` is (the root of, or inside) a bpffs mount (statfs f_type)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == BPF_FS_MAGIC


def ensure_bpffs(root: str) -> None:
    """Mount a bpffs at ``root`` unless one is there (as bpftool does: mode 0700)."""
    if is_bpffs(root):
        return
    if _libc.mount(b"bpf", os.fsencode(root), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise NoBpffs(
            f"{root} is not a bpffs and mounting one there failed ({os.strerror(err)}): "
            f"mount one (mount -t bpf bpf {root}) for pinned state"
        )
    if _own_mount_namespace():
        log.warning(
            "mounted a bpffs at %s in a mount namespace of this process's own (ip netns "
            "exec?): the pinned state ends with it; for pins that survive a restart, mount "
            "one where the next start sees it and give it with --bpffs",
            root,
        )
    else:
        log.info("mounted a bpffs at %s for pinned state", root)


def _own_mount_namespace() -> bool:
    """Whether this process sees other mounts than PID 1 (its mounts die with it)."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino != os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return False


# --------------------------------------------------------------------------- an instance


def _netns_ino(listener: socket.socket) -> int:
    from .dispatcher import netns_fd_of

    fd = netns_fd_of(listener)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _lock(path: Path, name: str, hint: str) -> int:
    """An fd of the instance's directory with an exclusive flock on it, or SteeringError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SteeringError(
            f"instance {name} is running (a bpfproxy holds {path}): {hint}."
        ) from None
    return fd


class Instance:
    """One instance's directory in bpffs, locked from :meth:`open` to :meth:`close`.

    Resource handling: :meth:`load` hands its descriptors to the caller (a
    Dispatcher takes them); :meth:`close` unpins when :attr:`unpin_at_close`
    is set, then drops the lock. ``unpin_at_close`` starts true for state
    this process creates (a failed start leaves nothing) and false for state
    it took over; the caller clears it once serving (a crash keeps the pins)
    and sets it after a clean stop.
    """

    def __init__(self, root: str, name: str) -> None:
        self.name = check_instance_name(name)
        self.path = Path(root) / _SUBDIR / name
        self.reused = False
        self.unpin_at_close = True
        self._lock_fd = -1

    @classmethod
    def open(cls, root: str, name: str) -> Instance:
        """Mount bpffs at ``root`` if needed, make the directory and lock it."""
        instance = cls(root, name)
        ensure_bpffs(root)
        for _ in range(_LOCK_ATTEMPTS):
            try:
                instance.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = _lock(instance.path, name, "give this one another --instance")
            except FileNotFoundError:
                continue  # removed by a clean stop between mkdir and open: again
            except OSError as exc:
                raise SteeringError(f"cannot make {instance.path}: {exc.strerror}.") from exc
            try:
                if os.fstat(fd).st_ino == os.stat(instance.path).st_ino:
                    instance._lock_fd = fd
                    return instance
            except FileNotFoundError:
                pass
            os.close(fd)  # locked a directory a clean stop has just removed: again
        raise SteeringError(f"{instance.path} keeps disappearing: is another bpfproxy stopping?")

    @classmethod
    def adopt(cls, root: str, name: str, lock_fd: int) -> Instance:
        """The instance an upgrade handed over: ``lock_fd`` is the old process's locked
        directory (the same open file, so the same flock). The state is reused, not
        ours to unpin until a clean stop says so."""
        instance = cls(root, name)
        instance._lock_fd = lock_fd
        instance.reused = True
        instance.unpin_at_close = False
        return instance

    @property
    def lock_fd(self) -> int:
        """The locked directory's descriptor (-1 once closed), for an upgrade."""
        return self._lock_fd

    def load(self, listener: socket.socket) -> tuple[Program, int | None]:
        """The program to steer with, and the link to adopt (None: attach a new one).

        Pinned state is reused (see the module's rules), else the program is
        compiled. Raises SteeringError for incompatible pins.
        """
        pins = sorted(os.listdir(self.path))
        if not pins:
            started = time.perf_counter()
            program = load_in_child()
            log.info(
                "compiled and loaded sk_lookup.c in %.0f ms",
                (time.perf_counter() - started) * 1000,
            )
            return program, None
        program, link_fd = self._reuse(pins, _netns_ino(listener))
        self.reused = True
        self.unpin_at_close = False
        log.info(
            "instance %s: reusing the pinned program (id %d) and link in %s, no compile",
            self.name, bpfsys.prog_info(program.prog_fd).id, self.path,
        )  # fmt: skip
        return program, link_fd

    def _reuse(self, pins: list[str], netns_ino: int) -> tuple[Program, int]:
        release = f"run `bpfproxy --release --instance {self.name}` (it removes {self.path})"
        digest = _SOURCE_PREFIX + source_digest()
        versions = [pin for pin in pins if pin.startswith(_SOURCE_PREFIX)]
        if versions != [digest]:
            found = versions[0] if versions else "no source digest"
            raise SteeringError(
                f"instance {self.name} has state pinned by another bpfproxy ({found}, "
                f"this one is {digest}): {release}, then start again."
            )
        wanted = [PROG_PIN, HOLD_PIN, LINK_PIN, *(_MAP_PREFIX + name.decode() for name in MAPS)]
        missing = [pin for pin in wanted if pin not in pins]
        if missing:
            raise SteeringError(
                f"instance {self.name} has incomplete pinned state (no {', '.join(missing)}): "
                f"{release}, then start again."
            )
        program = Program(-1, -1, {})
        link_fd = -1
        try:
            program.prog_fd = bpfsys.obj_get(str(self.path / PROG_PIN))
            program.hold_fd = bpfsys.obj_get(str(self.path / HOLD_PIN))
            for name in MAPS:
                program.maps[name] = bpfsys.obj_get(str(self.path / (_MAP_PREFIX + name.decode())))
            check_program(program)
            link_fd = bpfsys.obj_get(str(self.path / LINK_PIN))
            link = bpfsys.link_info(link_fd)
            if link.prog_id != bpfsys.prog_info(program.prog_fd).id:
                raise SteeringError("the pinned link attaches another program.")
            if link.netns_ino != netns_ino:
                raise SteeringError("the pinned link steers another network namespace.")
        except (OSError, SteeringError) as exc:
            program.close()
            if link_fd >= 0:
                os.close(link_fd)
            raise SteeringError(
                f"instance {self.name}: cannot reuse its pinned state ({exc}): {release}."
            ) from exc
        return program, link_fd

    def dispatcher(self, listener: socket.socket) -> Dispatcher:
        """A Dispatcher steering to ``listener``: on the pinned state if there is some
        (its port map is then diffed by ``set_ports``), else on a new program it pins."""
        from .dispatcher import Dispatcher

        program, link_fd = self.load(listener)
        dispatcher = Dispatcher(listener, program=program, link_fd=link_fd)
        try:
            if not self.reused:
                self.pin(dispatcher.program, dispatcher.link_fd)
            self.attach_hold(dispatcher.program.hold_fd)
        except BaseException:
            dispatcher.close()
            raise
        return dispatcher

    def attach_hold(self, hold_fd: int) -> None:
        """Attach the hold program at tc ingress (tcx) of each Ethernet or loopback
        interface of this network namespace that has no pinned link yet, and pin it.

        Kernels before 6.6 have no tcx: then nothing is attached and a warning
        says that SYNs are refused while no process serves.
        """
        attached = []
        for index, name in socket.if_nameindex():
            pin = self.path / f"{_HOLD_LINK_PREFIX}{index}"
            if pin.exists() or _arphrd(name) not in _HOLD_ARPHRD:
                continue
            try:
                fd = bpfsys.link_create(hold_fd, index, bpfsys.BPF_TCX_INGRESS)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise SteeringError(
                        f"cannot attach the hold program to {name}: {exc}."
                    ) from exc
                log.warning(
                    "this kernel has no tcx (Linux 6.6+: %s): while no bpfproxy serves, "
                    "SYNs to steered ports are refused, not held", exc.strerror,
                )  # fmt: skip
                return
            try:
                bpfsys.obj_pin(fd, str(pin))
            except OSError as exc:
                raise SteeringError(f"cannot pin {pin}: {exc}.") from exc
            finally:
                os.close(fd)
            attached.append(name)
        if attached:
            log.info("instance %s: SYNs held on %s while no process serves",
                     self.name, ", ".join(attached))  # fmt: skip

    def pin(self, program: Program, link_fd: int) -> None:
        """Pin the maps, the program, the source digest and, last, the link."""
        try:
            for name, fd in program.maps.items():
                bpfsys.obj_pin(fd, str(self.path / (_MAP_PREFIX + name.decode())))
            bpfsys.obj_pin(program.prog_fd, str(self.path / PROG_PIN))
            bpfsys.obj_pin(program.hold_fd, str(self.path / HOLD_PIN))
            (self.path / (_SOURCE_PREFIX + source_digest())).mkdir()
            bpfsys.obj_pin(link_fd, str(self.path / LINK_PIN))
        except OSError as exc:
            raise SteeringError(f"cannot pin the program's state in {self.path}: {exc}.") from exc
        log.info("instance %s: program, maps and link pinned in %s", self.name, self.path)

    def hand_to(self, uid: int, gid: int) -> None:
        """Make the directory ``uid``'s: after dropping privileges to it, the process can
        still remove the pins at a clean stop (by the locked directory's fd: the bpffs
        root above it is root's, mode 0700)."""
        try:
            os.fchown(self._lock_fd, uid, gid)
        except OSError as exc:
            raise SteeringError(f"cannot give {self.path} to uid {uid}: {exc.strerror}.") from exc

    def unpin(self) -> list[str]:
        """Remove every pin (the link first) and the directory; the removed names."""
        return _remove(self.path, self._lock_fd)

    def close(self) -> None:
        """Unpin if :attr:`unpin_at_close`, then drop the lock. Idempotent."""
        try:
            if self._lock_fd >= 0 and self.unpin_at_close:
                self.unpin()
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


# ARPHRD_ETHER, ARPHRD_LOOPBACK: the interfaces whose frames start with an Ethernet header.
_HOLD_ARPHRD = (1, 772)
_SIOCGIFHWADDR = 0x8927
_IFNAMSIZ = 16


def _arphrd(name: str) -> int:
    """An interface's hardware type (ARPHRD_*), -1 if unknown."""
    request = name.encode()[: _IFNAMSIZ - 1].ljust(40, b"\0")  # struct ifreq
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock, _SIOCGIFHWADDR, request)
    except OSError:
        return -1
    return int.from_bytes(reply[_IFNAMSIZ : _IFNAMSIZ + 2], sys.byteorder)


def _remove(path: Path, dir_fd: int | None = None) -> list[str]:
    """Unpin everything in an instance's directory, the link first; remove it and, if
    empty, its parent. Returns the names removed.

    Entries are removed through ``dir_fd`` (the directory, open) if given:
    that needs only write access to the directory itself, which a process
    that dropped root keeps (see :meth:`Instance.hand_to`); the directory
    itself then stays, empty, if its parent is not writable for it.
    """
    own_fd = dir_fd is None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if own_fd else dir_fd
    except FileNotFoundError:
        return []
    assert fd is not None
    try:
        # The links first: each detaches as its last holder goes.
        names = sorted(
            os.listdir(fd),
            key=lambda name: (name != LINK_PIN, not name.startswith(_HOLD_LINK_PREFIX), name),
        )
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # another holder's clean stop
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.rmdir(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
    finally:
        if own_fd:
            os.close(fd)
    try:
        path.rmdir()
    except PermissionError:
        log.debug("%s is empty but stays: its parent is not writable after the drop", path)
        return names
    except FileNotFoundError:
        return names
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only if no other instance is left
    return names


def release(root: str, name: str) -> tuple[Path, list[str]]:
    """Remove the pinned state of an instance that is not running (``bpfproxy --release``).

    Returns the instance's directory and the names removed (none if nothing
    was pinned). Raises SteeringError if the instance is running. Mounts
    nothing: where no bpffs is mounted, nothing can be pinned.
    """
    path = Path(root) / _SUBDIR / check_instance_name(name)
    try:
        if not is_bpffs(root) or not path.is_dir():
            return path, []
        lock_fd = _lock(path, name, "stop it instead (SIGTERM unpins its state)")
    except FileNotFoundError:
        return path, []
    except PermissionError as exc:
        raise SteeringError(f"cannot read {path} ({exc.strerror}): run it with sudo.") from exc
    try:
        return path, _remove(path)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise SteeringError(
                f"cannot remove {path} ({exc.strerror}): run it with sudo."
            ) from exc
        raise SteeringError(f"cannot remove {path}: {exc}.") from exc
    finally:
        os.close(lock_fd)
