"""Giving memory back to the system after a burst (a full list, the first reconcile).

CPython frees objects into its own pools and glibc keeps freed heap pages for reuse, so
a process that parsed a large list once keeps that peak as resident memory. After such
a burst: a full collection, then ``malloc_trim(0)``, which returns free heap pages to
the kernel. Cheap (milliseconds), and a no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
except (OSError, AttributeError):
    _libc = None


def release() -> None:
    gc.collect()
    if _libc is not None:
        _trim(0)
