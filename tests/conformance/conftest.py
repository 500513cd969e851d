"""Conformance scenarios as test items, one per case, against one shared simulated node."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bpf.datapath import Datapath
from simnode.netns import exists
from simnode.node import SimNode, unique_tag
from tests.conformance.generator import generate
from tests.conformance.harness import LAYOUTS, CaseResult, Cluster, summary
from tests.conformance.scenario import discover

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "conformance"
HERE = Path(__file__).parent
# scenario directories: the shared ones if this checkout has them, else our copies
CASE_SETS = ("cases", "cluster-cases", "dns-cases")
RESULTS: list[CaseResult] = []
_GENERATED: list[Path] = []


def case_directories(config: pytest.Config) -> list[Path]:
    given = [Path(d).expanduser().resolve() for d in config.getoption("--cases")]
    if given:
        for d in given:
            if not d.is_dir():
                raise pytest.UsageError(f"--cases {d}: not a directory")
        return given
    dirs = [SHARED / s if (SHARED / s).is_dir() else HERE / s for s in CASE_SETS]
    if not config.getoption("--no-generated"):
        if not _GENERATED:
            out = Path(tempfile.mkdtemp(prefix="np-generated-cases-"))
            generate(out)
            _GENERATED.append(out)
        dirs.append(_GENERATED[0])
    return dirs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case_path" in metafunc.fixturenames:
        paths = list(discover(case_directories(metafunc.config)))
        metafunc.parametrize("case_path", paths, ids=[p.stem for p in paths])


def pytest_unconfigure(config: pytest.Config) -> None:
    for d in _GENERATED:
        shutil.rmtree(d, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("conformance")
    for r in RESULTS:
        terminalreporter.write_line(r.line())
    terminalreporter.write_line(summary(RESULTS))


@pytest_asyncio.fixture(scope="session", loop_scope="session", params=list(LAYOUTS))
async def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    """One simulated node per resolver layout (every case runs in each)."""
    from tests.privileged.conftest import _require_privileges

    _require_privileges()
    workdir = tmp_path_factory.mktemp("conformance")
    pin_root = f"/sys/fs/bpf/npc-{unique_tag()}"
    sim = SimNode(unique_tag("npc"))
    c = Cluster(sim, workdir=workdir, pin_root=pin_root, layout=request.param)
    try:
        await sim.start()
        await c.start()
        yield c
    finally:
        namespaces = [sim.netns, *(p.netns for p in sim.pods.values())]
        await c.stop()
        await sim.close()
        Datapath.unpin(pin_root)
        leftovers = [n for n in namespaces if exists(n)]
        assert not leftovers, f"namespaces left behind: {leftovers}"
