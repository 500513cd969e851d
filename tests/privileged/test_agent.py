"""The real enforcer process against the fake API server, proven with real traffic."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fakekube import store as fs
from simnode.node import SimNode, SimPod
from tests.privileged.agentrig import AgentRig, eventually


@pytest.fixture
async def rig(sim: SimNode, pin_root: str, tmp_path: Path) -> AsyncIterator[AgentRig]:
    r = AgentRig(sim, pin_root=pin_root, workdir=tmp_path)
    await r.start_api()
    try:
        yield r
    finally:
        await r.close()


def allow_from(*peers: SimPod, ports: list[dict[str, object]] | None = None
               ) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = []
    for p in peers:
        for ip in (p.ipv4, p.ipv6):
            rule: dict[str, object] = {"cidr": str(ip)}
            if ports is not None:
                rule["ports"] = ports
            rules.append(rule)
    return rules


async def test_policyendpoints_are_enforced_updated_and_removed(rig: AgentRig) -> None:
    server = await rig.add_pod("server")
    c1, c2 = await rig.add_pod("client1"), await rig.add_pod("client2")
    await rig.start_agent()
    await rig.ready()
    cases = [(c1, server, 80, "TCP", 4), (c2, server, 80, "TCP", 4),
             (c1, server, 80, "UDP", 6), (c2, server, 81, "TCP", 6)]
    await rig.converge(cases, [True, True, True, True])

    rig.apply(rig.policy_endpoint("web-abc12", policy="web", targets=[server],
                                  ingress=allow_from(c1)))
    await rig.converge(cases, [True, False, True, False])

    rig.apply(rig.policy_endpoint("web-abc12", policy="web", targets=[server],
                                  ingress=allow_from(c2, ports=[{"protocol": "TCP", "port": 81}])))
    await rig.converge(cases, [False, False, False, True])

    rig.delete("web-abc12")
    await rig.converge(cases, [True, True, True, True])
