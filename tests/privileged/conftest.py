"""Fixtures for privileged tests: real bpffs pins, network namespaces, tc, packets.

These tests are part of the normal run. Without root or bpffs they fail with a message
saying why; they are never skipped.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bpf.datapath import Datapath
from simnode.netns import exists
from simnode.node import SimNode, unique_tag
from tests.privileged.agentrig import AgentRig
from tests.privileged.podnet import PodNet


def _require_privileges() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root")
    if not os.path.ismount("/sys/fs/bpf"):
        problems.append("bpffs is not mounted at /sys/fs/bpf")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} (iproute2) is missing")
    if problems:
        pytest.fail(
            "privileged test cannot run: "
            + "; ".join(problems)
            + " (run ./scripts/test.sh as root)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def privileged() -> None:
    _require_privileges()


@pytest.fixture
def pin_root() -> Iterator[str]:
    root = f"/sys/fs/bpf/npt-{uuid.uuid4().hex[:10]}"
    yield root
    Datapath.unpin(root)
    assert not os.path.exists(root), f"pins left under {root}"


@pytest.fixture
def datapath(pin_root: str) -> Iterator[Datapath]:
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 20)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
async def podnet(sim: SimNode, datapath: Datapath) -> AsyncIterator[PodNet]:
    """The datapath attached to the simulated node's pods (no agent)."""
    pn = PodNet(sim, datapath)
    try:
        yield pn
    finally:
        await pn.close()


@pytest.fixture
async def sim() -> AsyncIterator[SimNode]:
    node = SimNode(unique_tag())
    try:
        await node.start()
        yield node
    finally:
        namespaces = [node.netns, *(p.netns for p in node.pods.values())]
        await node.close()
        leftovers = [n for n in namespaces if exists(n)]
        assert not leftovers, f"namespaces left behind: {leftovers}"


@pytest.fixture
async def rig(sim: SimNode, pin_root: str, tmp_path: Path) -> AsyncIterator[AgentRig]:
    """The node's fake API server running; the processes are started by the test."""
    r = AgentRig(sim, pin_root=pin_root, workdir=tmp_path)
    await r.start_api()
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def strict_rig(sim: SimNode, pin_root: str, tmp_path: Path) -> AsyncIterator[AgentRig]:
    """As ``rig``, with the agent in strict mode."""
    r = AgentRig(sim, pin_root=pin_root, workdir=tmp_path, mode="strict")
    await r.start_api()
    try:
        yield r
    finally:
        await r.close()
