"""The ctypes mirrors in bpf.layout match np.h and the compiled object's BTF."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

import pytest

from bpf import layout
from bpf.btf import Btf
from bpf.loading import object_path
from bpf.objects import object_names

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "np.h"


def header_defines() -> dict[str, int]:
    out = {}
    for name, expr in re.findall(
        r"^#define (NP_[A-Z0-9_]+)\s+(.+?)\s*(?:/\*.*)?$", HEADER.read_text(), flags=re.M
    ):
        if name == "NP_H":
            continue
        expr = re.sub(r"(\d+)U?L?L?\b", r"\1", expr)
        assert re.fullmatch(r"[0-9 ()*+<-]+", expr), f"{name}: cannot evaluate {expr!r}"
        out[name] = int(eval(expr))  # digits and operators only, checked above
    return out


def test_every_header_constant_is_mirrored() -> None:
    defines = header_defines()
    assert len(defines) > 30
    for name, value in defines.items():
        assert getattr(layout, name, None) == value, f"layout.{name} != np.h {value}"


def test_every_mirrored_constant_is_in_the_header() -> None:
    defines = header_defines()
    mirrored = {n for n in vars(layout) if n.startswith("NP_")}
    assert mirrored - set(defines) == set()


@pytest.mark.parametrize("mirror", layout.MIRRORS, ids=lambda m: m._c_name)
def test_struct_matches_btf(mirror: type[layout.Struct]) -> None:
    with Btf(object_path()) as btf:
        st = btf.struct(mirror._c_name)
    assert st is not None, f"struct {mirror._c_name} missing from the object's BTF"
    assert ctypes.sizeof(mirror) == st.size, f"{mirror._c_name} size"
    py_fields = {
        name: (getattr(mirror, name).offset, getattr(mirror, name).size)
        for name, *_ in mirror._fields_
    }
    assert py_fields == st.fields


def test_every_shared_struct_in_the_header_has_a_mirror() -> None:
    declared = set(re.findall(r"^struct (np_[a-z_0-9]+) \{", HEADER.read_text(), flags=re.M))
    assert declared == {m._c_name for m in layout.MIRRORS}


def test_map_and_program_names() -> None:
    maps, progs = object_names(object_path())
    named = {v for k, v in vars(layout).items() if k.startswith("MAP_")}
    assert named == set(maps)
    assert {layout.PROG_INGRESS, layout.PROG_EGRESS} == set(progs)
    assert all(len(n) <= 15 for n in maps + progs), "kernel truncates names at 15 chars"


def test_the_sweep_objects_names() -> None:
    maps, progs = object_names(str(Path(object_path()).with_name(layout.SWEEP_OBJECT_FILE)))
    assert set(maps) == {layout.MAP_CT, layout.SWEEP_KEYS_MAP}
    assert progs == [layout.SWEEP_PROG]


@pytest.mark.parametrize("mirror", layout.MIRRORS, ids=lambda m: m._c_name)
def test_packers_follow_the_mirrors(mirror: type[layout.Struct]) -> None:
    """The struct formats the hot paths use (conntrack sweep, flow records, trie keys)
    are derived from the mirrors: each field unpacks at the mirror's offset."""
    import ctypes

    pk = layout.packer(mirror)
    assert pk.size == ctypes.sizeof(mirror)
    inst = mirror()
    numeric: dict[str, list[int]] = {}
    for n, field in enumerate(mirror._fields_, start=1):
        name, ctype = field[0], field[1]
        kind: Any = ctype
        if name.startswith("pad"):
            continue
        if not issubclass(kind, ctypes.Array):
            setattr(inst, name, n)
            numeric[name] = [n]
        elif kind._type_ is ctypes.c_char:
            setattr(inst, name, b"x" * (n % 8 + 1))
        elif kind._type_ in (layout.u16, layout.u32, layout.u64):
            arr = getattr(inst, name)
            for i in range(len(arr)):
                arr[i] = n + i
            numeric[name] = list(arr)
        else:  # bytes, or an array of structs: raw bytes
            ctypes.memset(
                ctypes.addressof(inst) + getattr(mirror, name).offset, n, ctypes.sizeof(kind)
            )
    raw = bytes(inst)
    expected: list[Any] = []
    for field in mirror._fields_:
        name, ctype = field[0], field[1]
        if name.startswith("pad"):
            continue
        if name in numeric:
            expected.extend(numeric[name])
        else:
            at = getattr(mirror, name).offset
            expected.append(raw[at : at + ctypes.sizeof(ctype)])
    assert list(pk.unpack(raw)) == expected
