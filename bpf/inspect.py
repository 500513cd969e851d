"""Enumerate kernel BPF objects by id (for the CLI): programs and maps, any loader."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator

from bpf import _libbpf as lb
from bpf.errors import BpfError


def _ids(next_id: object, what: str) -> Iterator[int]:
    cur = ctypes.c_uint32(0)
    while True:
        nxt = ctypes.c_uint32(0)
        if next_id(cur.value, ctypes.byref(nxt)) < 0:  # type: ignore[operator]
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return
            raise BpfError(err, f"list {what}")
        yield nxt.value
        cur = nxt


def program_ids() -> Iterator[int]:
    return _ids(lb.lib.bpf_prog_get_next_id, "programs")


def map_ids() -> Iterator[int]:
    return _ids(lb.lib.bpf_map_get_next_id, "maps")
