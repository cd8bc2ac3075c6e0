"""Keeping glibc from hoarding the memory of freed image buffers in a many-threaded fetcher.

glibc serves a large allocation with its own mmap and unmaps it when freed, but after such
a buffer is freed it raises the size limit for that (up to 32 MiB), so from then on
downloads, decoded images and encoder buffers of a few MiB come from the heaps of the
threads that allocate them, and freed ones stay there as free-but-resident memory. With
16-32 fetch threads each process kept hundreds of MiB that way (measured: 330-390 MiB
free in the heaps against 24 MiB in use). Fixing the limit at 64 KiB turns that off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024

_done = False
_lock = threading.Lock()


def limit_heap_retention() -> bool:
    """Fix glibc's mmap threshold for this process (once); False where it does not apply (not glibc)."""
    global _done
    with _lock:
        if _done:
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        return _done
