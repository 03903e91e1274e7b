"""The few bpf(2) calls that bcc's Python bindings lack, via ctypes.

bcc 0.26 can compile, load and manage hash/array maps, but it has no BPF link
API and its ``Table`` class rejects sockmaps. These wrappers issue the raw
syscall with ``union bpf_attr`` laid out as in ``include/uapi/linux/bpf.h``
(only the leading fields each command needs: the kernel zero-fills the rest
and accepts a shorter ``size``). Failures raise ``OSError`` with the errno.
"""

from __future__ import annotations

import ctypes
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
    "BPF_PROG_TYPE_SK_LOOKUP",
    "BPF_SK_LOOKUP",
    "MapInfo",
    "link_create",
    "map_info",
    "map_update_elem",
]

# enum bpf_cmd
BPF_MAP_UPDATE_ELEM = 2
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28

# enum bpf_map_type (the ones bpfproxy uses)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18

# enum bpf_prog_type / enum bpf_attach_type
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36

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


# Sizes and offsets from the kernel ABI (include/uapi/linux/bpf.h).
assert ctypes.sizeof(_MapElemAttr) == 32 and _MapElemAttr.key.offset == 8
assert ctypes.sizeof(_LinkCreateAttr) == 16
assert ctypes.sizeof(_ObjInfoAttr) == 16 and _ObjInfoAttr.info.offset == 8
assert ctypes.sizeof(_MapInfo) == 40 and _MapInfo.name.offset == 24


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
    ``open("/proc/self/ns/net")``) and ``attach_type`` is ``BPF_SK_LOOKUP``.
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
    attr = _ObjInfoAttr(bpf_fd=map_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return MapInfo(
        info.type,
        info.id,
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        info.name.decode(errors="replace"),
    )
