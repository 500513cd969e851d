"""The tree's structure, checked: imports run one way (processes -> bpf -> common), and
the product never imports test or demo infrastructure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROCESSES = {"agent", "resolver", "conntrack", "flowlogs", "cli"}
INFRA = {"simnode", "fakekube", "tests", "bench"}
# package -> the top-level packages of this repo it may not import
FORBIDDEN = {
    "common": {"bpf", *PROCESSES, *INFRA},
    "bpf": {*PROCESSES, *INFRA},
    **dict.fromkeys(PROCESSES, INFRA),
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    bad = {
        str(f.relative_to(REPO)): sorted(imports(f) & FORBIDDEN[package])
        for f in (REPO / package).rglob("*.py")
        if imports(f) & FORBIDDEN[package]
    }
    assert bad == {}
