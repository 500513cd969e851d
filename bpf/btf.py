"""Read struct layouts from an object's BTF (used to check the ctypes mirrors)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from bpf import _libbpf as lb

BTF_KIND_STRUCT = 4


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class StructLayout:
    name: str
    size: int
    fields: dict[str, tuple[int, int]]  # name -> (byte offset, byte size)


class Btf:
    """BTF parsed from an ELF object (``btf__parse_elf``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._btf = lb.check_ptr(lb.lib.btf__parse_elf(path.encode(), None), f"parse BTF of {path}")

    def close(self) -> None:
        if self._btf:
            lb.lib.btf__free(self._btf)
            self._btf = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _name(self, off: int) -> str:
        raw = lb.lib.btf__name_by_offset(self._btf, off)
        return raw.decode() if raw else ""

    def struct(self, name: str) -> StructLayout | None:
        type_id = lb.lib.btf__find_by_name_kind(self._btf, name.encode(), BTF_KIND_STRUCT)
        if type_id < 0:
            return None
        ptr = lb.lib.btf__type_by_id(self._btf, type_id)
        t = _BtfType.from_address(ptr)
        vlen = t.info & 0xFFFF
        kflag = bool(t.info >> 31)
        members = (_BtfMember * vlen).from_address(ptr + ctypes.sizeof(_BtfType))
        fields: dict[str, tuple[int, int]] = {}
        for m in members:
            bit_offset = m.offset & 0xFFFFFF if kflag else m.offset
            size = lb.lib.btf__resolve_size(self._btf, m.type)
            fields[self._name(m.name_off)] = (bit_offset // 8, int(size))
        return StructLayout(name, t.size, fields)
