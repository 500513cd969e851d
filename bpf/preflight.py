"""Start-up checks for the datapath: each failure is one line saying what to do."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import platform
import re

import structlog

log = structlog.get_logger("preflight")

BPF_FS_MAGIC = 0xCAFE4A11
ST_RDONLY = 1
MIN_KERNEL = (5, 15)

_libc = ctypes.CDLL(None, use_errno=True)


class _Statfs(ctypes.Structure):
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


def _fs_type(path: str) -> tuple[int, int] | None:
    st = _Statfs()
    if _libc.statfs(path.encode(), ctypes.byref(st)) != 0:
        return None
    return st.f_type & 0xFFFFFFFF, st.f_flags


def bpffs_problem(path: str = "/sys/fs/bpf", *, try_mount: bool = True) -> str | None:
    """None if bpffs is mounted read-write at ``path`` (mounting it when permitted)."""
    info = _fs_type(path)
    refused = False
    if (info is None or info[0] != BPF_FS_MAGIC) and try_mount and os.path.isdir(path):
        if _libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0700") == 0:
            info = _fs_type(path)
        else:
            refused = ctypes.get_errno() == errno.EPERM
    if info is None or info[0] != BPF_FS_MAGIC:
        how = (
            "mount it on the node (`mount -t bpf bpf /sys/fs/bpf`, e.g. in the node's "
            "user data) and into this container"
        )
        if refused:
            return f"bpffs is not mounted at {path} and mounting it was refused: {how}"
        return f"bpffs is not mounted at {path}: {how}"
    if info[1] & ST_RDONLY or not os.access(path, os.W_OK):
        return f"bpffs at {path} is read-only: mount it read-write into this container"
    return None


def kernel_problem(release: str | None = None) -> str | None:
    release = release or platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return f"cannot read the kernel version from {release!r}"
    if (int(m.group(1)), int(m.group(2))) < MIN_KERNEL:
        return (
            f"kernel {release} is too old: the datapath needs Linux "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]} or later (BPF ring buffer, BPF-to-BPF "
            "global functions with pointer arguments)"
        )
    return None


def libbpf_problem() -> str | None:
    try:
        import bpf._libbpf  # noqa: F401  (loading it is the check)
    except Exception as exc:  # the library itself or a symbol missing
        return f"libbpf is not usable: {exc} (install libbpf1, version 1.0 or later)"
    return None


def problems(pin_root: str) -> list[str]:
    """Everything that stops the datapath from loading, as one line each."""
    found = [p for p in (libbpf_problem(), kernel_problem(), bpffs_problem()) if p]
    if not found and not pin_root.startswith("/sys/fs/bpf/"):
        info = _fs_type(os.path.dirname(pin_root.rstrip("/")) or "/")
        if info is None or info[0] != BPF_FS_MAGIC:
            found.append(f"--bpf-pin-root {pin_root} is not on a bpffs mount")
    return found


async def wait_for_pin(path: str, stop: asyncio.Event, *, event: str) -> bool:
    """Until ``path`` (a map the agent pins) exists: True, or False if a stop was
    requested first. Logs ``event`` once while waiting."""
    announced = False
    while not await asyncio.to_thread(os.path.exists, path):
        if not announced:
            log.info(event, path=path)
            announced = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if stop.is_set():
            return False
    return True
