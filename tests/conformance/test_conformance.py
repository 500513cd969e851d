"""Every scenario of the case directories, against the real resolver and enforcer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.conftest import RESULTS
from tests.conformance.harness import Cluster
from tests.conformance.scenario import load

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_case(case_path: Path, cluster: Cluster) -> None:
    result = await cluster.run(load(case_path))
    RESULTS.append(result)
    assert result.ok, result.line()
