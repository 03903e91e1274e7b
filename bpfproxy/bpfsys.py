"""The few bpf(2) calls that bcc's Python bindings lack, via ctypes.

bcc 0.26 can compile and load, but it has no BPF link API, its ``Table``
class rejects sockmaps, and it cannot open pinned objects. bpfproxy works on
its program and maps by file descriptor only, through these wrappers: they
issue the raw syscall with ``union bpf_attr`` laid out as in
``include/uapi/linux/bpf.h`` (only the leading fields each command needs: the
kernel zero-fills the rest and accepts a shorter ``size``). Failures raise
``OSError`` with the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import NamedTuple

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_MAP_TYPE_ARRAY",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_PERCPU_ARRAY",
    "BPF_MAP_TYPE_SOCKHASH",
    "BPF_MAP_TYPE_SOCKMAP",
    "BPF_NOEXIST",
    "BPF_PROG_TYPE_SCHED_CLS",
    "BPF_PROG_TYPE_SK_LOOKUP",
    "BPF_SK_LOOKUP",
    "BPF_TCX_INGRESS",
    "LinkInfo",
    "MapInfo",
    "ProgInfo",
    "link_create",
    "link_info",
    "map_delete_batch",
    "map_delete_elem",
    "map_info",
    "map_keys",
    "map_lookup_elem",
    "map_update_batch",
    "map_update_elem",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_info",
]

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28

# enum bpf_map_type (the ones bpfproxy uses)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18

# enum bpf_prog_type / enum bpf_attach_type
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36
BPF_TCX_INGRESS = 46  # Linux 6.6+

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# __NR_bpf per architecture (platform.machine() spelling).
_NR_BPF = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "ppc64le": 361,
    "s390x": 351,
    "i686": 357,
    "armv7l": 386,
}


class _MapElemAttr(ctypes.Structure):
    """BPF_MAP_*_ELEM: map_fd, then __aligned_u64 key, value, flags."""

    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),  # key is __aligned_u64
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags (then a union we leave zero)."""

    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class _BatchAttr(ctypes.Structure):
    """BPF_MAP_*_BATCH: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags."""

    _fields_ = (
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _ObjAttr(ctypes.Structure):
    """BPF_OBJ_PIN / BPF_OBJ_GET: __aligned_u64 pathname, bpf_fd, file_flags."""

    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


class _ObjInfoAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, __aligned_u64 info."""

    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class _MapInfo(ctypes.Structure):
    """Leading fields of struct bpf_map_info (the kernel copies back only info_len bytes)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),  # BPF_OBJ_NAME_LEN
    )


class _ProgInfo(ctypes.Structure):
    """Leading fields of struct bpf_prog_info."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),  # BPF_TAG_SIZE
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


class _LinkInfo(ctypes.Structure):
    """Leading fields of struct bpf_link_info, with the netns member of its union."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),  # the union is 8-byte aligned
        ("netns_ino", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    )


# Sizes and offsets from the kernel ABI (include/uapi/linux/bpf.h).
assert ctypes.sizeof(_MapElemAttr) == 32 and _MapElemAttr.key.offset == 8
assert ctypes.sizeof(_LinkCreateAttr) == 16
assert ctypes.sizeof(_ObjInfoAttr) == 16 and _ObjInfoAttr.info.offset == 8
assert ctypes.sizeof(_MapInfo) == 40 and _MapInfo.name.offset == 24
assert ctypes.sizeof(_BatchAttr) == 56 and _BatchAttr.elem_flags.offset == 40
assert ctypes.sizeof(_ObjAttr) == 16
assert _ProgInfo.map_ids.offset == 56 and _ProgInfo.name.offset == 64
assert _LinkInfo.netns_ino.offset == 16


class ProgInfo(NamedTuple):
    """What the kernel says about a program (struct bpf_prog_info)."""

    type: int
    id: int
    tag: str  # hex of the 8-byte tag: a hash of the verified instructions
    name: str
    map_ids: tuple[int, ...]


class LinkInfo(NamedTuple):
    """What the kernel says about a link: its program, and for a netns link the netns."""

    type: int
    id: int
    prog_id: int
    netns_ino: int
    attach_type: int


class MapInfo(NamedTuple):
    """What the kernel says about a map (struct bpf_map_info)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(cmd, &attr, sizeof(attr)); OSError(errno, what) on failure."""
    try:
        nr = _NR_BPF[platform.machine()]
    except KeyError:
        raise OSError(0, f"bpf(2) syscall number unknown for {platform.machine()}") from None
    ret = _syscall(nr, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach a program with a BPF link and return the link's fd (O_CLOEXEC).

    For sk_lookup: ``target_fd`` is a network namespace fd (e.g. from
    ``open("/proc/self/ns/net")``) and ``attach_type`` is ``BPF_SK_LOOKUP``;
    for tcx: an interface index and ``BPF_TCX_INGRESS``.
    The program stays attached while the link fd (or a dup of it) is open:
    closing it, or the process dying, detaches it.
    """
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type)
    return _bpf(BPF_LINK_CREATE, attr, "BPF_LINK_CREATE")


def map_update_elem(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """BPF_MAP_UPDATE_ELEM with raw key and value bytes (sized as the map's).

    For a sockmap or sockhash the value is the socket's fd, as a native
    u32 or u64 matching the map's value size.
    """
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    attr = _MapElemAttr(
        map_fd=map_fd,
        key=ctypes.addressof(key_buf),
        value=ctypes.addressof(value_buf),
        flags=flags,
    )
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "BPF_MAP_UPDATE_ELEM")


def map_info(map_fd: int) -> MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a map: its type, key/value sizes, max_entries."""
    info = _MapInfo()
    _obj_info(map_fd, info)
    return MapInfo(
        info.type,
        info.id,
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        info.name.decode(errors="replace"),
    )


def map_lookup_elem(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """BPF_MAP_LOOKUP_ELEM: the value's bytes, or None if the key is absent (ENOENT).

    For per-CPU maps ``value_size`` is the value rounded up to 8 bytes times
    :func:`possible_cpus`.
    """
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value_size)
    attr = _MapElemAttr(
        map_fd=map_fd, key=ctypes.addressof(key_buf), value=ctypes.addressof(value_buf)
    )
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "BPF_MAP_LOOKUP_ELEM")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return value_buf.raw


def map_delete_elem(map_fd: int, key: bytes) -> None:
    """BPF_MAP_DELETE_ELEM; OSError(ENOENT) if the key is absent."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    attr = _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key_buf))
    _bpf(BPF_MAP_DELETE_ELEM, attr, "BPF_MAP_DELETE_ELEM")


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key of a map, by BPF_MAP_GET_NEXT_KEY (a hash map changing meanwhile may
    repeat or skip a key; bpfproxy reads only maps it alone writes)."""
    keys: list[bytes] = []
    previous: ctypes.Array[ctypes.c_char] | None = None
    while True:
        next_buf = ctypes.create_string_buffer(key_size)
        attr = _MapElemAttr(
            map_fd=map_fd,
            key=ctypes.addressof(previous) if previous is not None else 0,
            value=ctypes.addressof(next_buf),  # the union's next_key sits where value is
        )
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        keys.append(next_buf.raw)
        previous = next_buf


def _batch(cmd: int, what: str, map_fd: int, keys: ctypes.Array, values: ctypes.Array | None,
           count: int) -> int:  # fmt: skip
    attr = _BatchAttr(
        keys=ctypes.addressof(keys),
        values=ctypes.addressof(values) if values is not None else 0,
        count=count,
        map_fd=map_fd,
    )
    try:
        _bpf(cmd, attr, what)
    except OSError as exc:
        exc.processed = attr.count  # type: ignore[attr-defined]  # how many went through
        raise
    return attr.count


def map_update_batch(map_fd: int, keys: ctypes.Array, values: ctypes.Array, count: int) -> int:
    """BPF_MAP_UPDATE_BATCH of ``count`` keys and values (ctypes arrays of the map's key and
    value types); returns how many were written. Linux 5.6+ for hash maps."""
    return _batch(BPF_MAP_UPDATE_BATCH, "BPF_MAP_UPDATE_BATCH", map_fd, keys, values, count)


def map_delete_batch(map_fd: int, keys: ctypes.Array, count: int) -> int:
    """BPF_MAP_DELETE_BATCH; stops with OSError(ENOENT) at the first absent key (the
    exception's ``processed`` says how many were deleted before it)."""
    return _batch(BPF_MAP_DELETE_BATCH, "BPF_MAP_DELETE_BATCH", map_fd, keys, None, count)


def obj_pin(fd: int, path: str) -> None:
    """BPF_OBJ_PIN: make a program, map or link outlive its fds at ``path`` in a bpffs."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"BPF_OBJ_PIN {path}")


def obj_get(path: str) -> int:
    """BPF_OBJ_GET: a new fd (O_CLOEXEC) of the object pinned at ``path``."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(name))
    return _bpf(BPF_OBJ_GET, attr, f"BPF_OBJ_GET {path}")


def _obj_info(fd: int, info: ctypes.Structure) -> None:
    attr = _ObjInfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")


_MAX_MAP_IDS = 16  # more maps than any program of bpfproxy uses


def prog_info(prog_fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a program: type, id, tag, name and the ids of its maps."""
    ids = (ctypes.c_uint32 * _MAX_MAP_IDS)()
    info = _ProgInfo(nr_map_ids=_MAX_MAP_IDS, map_ids=ctypes.addressof(ids))
    _obj_info(prog_fd, info)
    return ProgInfo(
        info.type,
        info.id,
        bytes(info.tag).hex(),
        info.name.decode(errors="replace"),
        tuple(ids[: min(info.nr_map_ids, _MAX_MAP_IDS)]),
    )


def link_info(link_fd: int) -> LinkInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a link (netns_ino and attach_type: netns links only)."""
    info = _LinkInfo()
    _obj_info(link_fd, info)
    return LinkInfo(info.type, info.id, info.prog_id, info.netns_ino, info.attach_type)


def possible_cpus() -> int:
    """How many CPUs a per-CPU map has a slot for (/sys/devices/system/cpu/possible)."""
    with open("/sys/devices/system/cpu/possible") as possible:
        text = possible.read().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count
