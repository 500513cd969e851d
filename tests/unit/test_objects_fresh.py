"""The committed BPF objects are what their sources build to.

The build is reproducible (relative paths, no timestamps), so with the compiler recorded
in bpf/BUILD the rebuilt object must be byte-identical. With another compiler version the
bytes may differ legitimately; then program/map names and every shared struct's BTF
layout must still agree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bpf import layout
from bpf.btf import Btf
from bpf.objects import object_names

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


def clang_version() -> str:
    assert shutil.which("clang"), "clang is needed to check the committed objects (setup.sh)"
    out = subprocess.run(["clang", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def test_committed_objects_are_fresh(tmp_path: Path) -> None:
    sources = sorted(BPF_DIR.glob("*.bpf.c"))
    assert sources, "no BPF sources"
    subprocess.run(
        ["make", "-s", "-C", str(BPF_DIR), "check", f"OUT={tmp_path}"],
        check=True,
        capture_output=True,
    )
    same_compiler = (BPF_DIR / "BUILD").read_text().strip() == clang_version()
    for src in sources:
        committed = BPF_DIR / (src.name[: -len(".c")] + ".o")
        rebuilt = tmp_path / committed.name
        assert committed.exists(), f"{committed.name} is not committed"
        if same_compiler:
            assert committed.read_bytes() == rebuilt.read_bytes(), (
                f"{committed.name} is stale: run `make -C bpf` and commit it"
            )
            continue
        assert object_names(str(committed)) == object_names(str(rebuilt))
        with Btf(str(committed)) as old, Btf(str(rebuilt)) as new:
            for mirror in layout.MIRRORS:
                assert old.struct(mirror._c_name) == new.struct(mirror._c_name), mirror._c_name
