"""The public cases check the reference evaluator (no agent involved: fast)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.conformance.evaluator import Evaluator
from tests.conformance.generator import generate
from tests.conformance.scenario import PodKey, Scenario, discover, expected, load

PUBLIC = [Path(__file__).parent / "cases", Path(__file__).parent / "cluster-cases"]


def synthetic_address(family: int):  # type: ignore[no-untyped-def]
    """Any distinct addresses on one /24 (/120) will do: cases only use host prefixes and
    networks wide enough to hold every pod."""
    index: dict[PodKey, int] = {}

    def address(key: PodKey) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        n = index.setdefault(key, len(index) + 1)
        return (
            ipaddress.IPv4Address(f"10.66.0.{n}")
            if family == 4
            else ipaddress.IPv6Address(f"fd00:66::{n:x}")
        )

    return address


def check(scenario: Scenario) -> list[str]:
    ev = Evaluator.of(scenario.world, synthetic_address(scenario.world.family))
    problems = []
    for i, step in enumerate(scenario.steps, 1):
        for action in step.actions:
            ev.apply(action)
        for probe in step.probes:
            want = expected(probe, sorted(ev.pods))
            got = ev.matrix(probe.port, probe.protocol)
            wrong = sorted(k for k in want if want[k] != got[k])
            if wrong:
                problems.append(
                    f"step {i} {probe.port}/{probe.protocol}: {len(wrong)} cells, "
                    f"first {wrong[0]}: expected {want[wrong[0]]}"
                )
    return problems


@pytest.mark.parametrize("path", list(discover(PUBLIC)), ids=lambda p: p.stem)
def test_evaluator_agrees_with_public_case(path: Path) -> None:
    assert check(load(path)) == []


def test_generator_makes_enough_distinct_scenarios(tmp_path: Path) -> None:
    paths = generate(tmp_path)
    assert len(paths) >= 150
    names = {load(p).name for p in paths}
    assert len(names) == len(paths)
    # expectations are the evaluator's, so the evaluator agrees with all of them
    assert all(check(load(p)) == [] for p in paths)
