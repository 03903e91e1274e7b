"""Large heap blocks go back to the system once freed: glibc's mmap threshold, fixed.

glibc gives a block of at least the threshold its own mapping, unmapped when it
is freed; smaller ones come from the heaps (one per thread arena), which give
back only what is free at their top. The threshold starts at 128 KiB but rises
to the size of each mapped block freed (up to 32 MiB): after one reload of an
8 MiB config, the next configs' bytes and text came from the heaps, and RSS
stayed up to 64 MiB above where it started after their rejection. Fixed at
MMAP_THRESHOLD, every config-sized block is returned when freed; the relay's
buffers (64 KiB at most) are far below it.
"""

from __future__ import annotations

import ctypes

__all__ = ["MMAP_THRESHOLD", "return_large_blocks"]

MMAP_THRESHOLD = 2**20  # bytes: a block this large gets its own mapping, unmapped when freed
M_MMAP_THRESHOLD = -3  # mallopt()'s parameter number for it (glibc's malloc.h)


def return_large_blocks() -> None:
    """Fix the threshold (which also stops its rise); a no-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl maps large blocks itself)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
