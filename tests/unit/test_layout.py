"""The ctypes mirrors in bpf.layout match np.h and the compiled object's BTF."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from bpf import layout
from bpf.btf import Btf
from bpf.datapath import object_path
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
