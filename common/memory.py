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


PROFILE_ENV = "NP_MEMORY_PROFILE"  # a file: allocation growth written there every minute


async def profile(path: str, period: float = 60.0, top: int = 25) -> None:
    """A diagnostic task (run when $NP_MEMORY_PROFILE names a file): tracemalloc from
    start, and every ``period`` the ``top`` source lines whose allocations grew most since
    the first snapshot, appended to ``path``. Costs memory and CPU: not for production."""
    import asyncio
    import time
    import tracemalloc

    tracemalloc.start(8)
    await asyncio.sleep(period)
    base = tracemalloc.take_snapshot()
    while True:
        await asyncio.sleep(period)
        snap = tracemalloc.take_snapshot()
        stats = snap.compare_to(base, "traceback")[:top]
        lines = [f"==== {time.strftime('%H:%M:%S')} traced {tracemalloc.get_traced_memory()}"]
        for st in stats:
            lines.append(f"{st.size_diff / 1024:+.1f} KiB {st.count_diff:+d} blocks")
            lines += [f"    {frame}" for frame in st.traceback.format()[-6:]]
        await asyncio.to_thread(_append, path, "\n".join(lines) + "\n")


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
