"""Bad PolicyEndpoints fed to the running agent: hundreds of malformed and valid objects
(wrong types, invalid CIDRs, mixed families, duplicates, excepts outside their CIDR,
ports out of range, huge lists) for a set of victim pods. The agent stays up, rejects
exactly the invalid ones (one log line and one metric each, naming the field), programs
the valid ones, and a bystander pod's enforcement never changes."""

from __future__ import annotations

import random
from typing import Any

from agent.endpoints import from_api
from common.policyendpoint import PolicyEndpointError
from simnode.node import SimPod
from tests.privileged.agentrig import AgentRig, allow_from, eventually

OBJECTS = 300


def _cidr(rng: random.Random) -> Any:
    return rng.choice(
        [
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24",
            f"fd00:{rng.randrange(65536):x}::/64",
            f"10.0.0.{rng.randrange(256)}",
            "10.0.0.0/33",
            "::/129",
            "300.1.1.1/8",
            "",
            "nonsense",
            "10.0.0.0/-1",
            42,
            None,
            ["10.0.0.0/8"],
            {"cidr": "10.0.0.0/8"},
        ]
    )


def _entry(rng: random.Random) -> Any:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice([None, 7, "10.0.0.0/8", []])
    entry: dict[str, Any] = {"cidr": _cidr(rng)}
    if kind == 1:
        entry["except"] = [_cidr(rng) for _ in range(rng.randrange(1, 4))]
    if kind == 2:
        entry["except"] = ["192.168.0.0/16"]  # outside most CIDRs
    if kind in (3, 4):
        entry["ports"] = [
            rng.choice(
                [
                    {"protocol": "TCP", "port": rng.randrange(1, 65536)},
                    {"protocol": "UDP"},
                    {"protocol": "ICMP", "port": 1},
                    {"port": 0},
                    {"port": 70000},
                    {"port": "http"},
                    {"port": 90, "endPort": 80},
                    {"endPort": 80},
                    {"protocol": None, "port": "8080"},
                    "TCP/80",
                    None,
                ]
            )
            for _ in range(rng.randrange(1, 4))
        ]
    return entry


def generate(rng: random.Random, i: int, victims: list[SimPod], node_ip: str) -> dict[str, Any]:
    targets = rng.sample(victims, rng.randrange(1, len(victims) + 1))
    size = rng.choice([0, 1, 3, 10, 50, 2000])
    spec: dict[str, Any] = {
        "policyRef": {"name": f"gen-{i % 20}", "namespace": "default"},
        "podIsolation": rng.choice(
            [["Ingress"], ["Egress"], ["Ingress", "Egress"], [], ["Sideways"], "Ingress", None]
        ),
        "podSelectorEndpoints": [
            {"podIP": str(p.ipv4), "hostIP": node_ip, "name": p.name, "namespace": "default"}
            for p in targets
        ],
        "ingress": [_entry(rng) for _ in range(size)],
        "egress": rng.choice([[], [_entry(rng) for _ in range(3)], None, "all", 5]),
    }
    if size == 2000:  # a huge list, duplicates included
        spec["ingress"] = [{"cidr": f"10.{j // 256 % 256}.{j % 256}.0/24"} for j in range(2000)]
        spec["ingress"] += spec["ingress"][:100]
    return {"metadata": {"name": f"gen-{i:04d}", "namespace": "default"}, "spec": spec}


async def test_generated_policyendpoints_are_rejected_or_enforced(rig: AgentRig) -> None:
    server, client, other = (
        await rig.add_pod("server"),
        await rig.add_pod("client"),
        await rig.add_pod("other"),
    )
    victims = [await rig.add_pod(f"victim{i}", ports=()) for i in range(4)]
    rig.apply(
        rig.policy_endpoint(
            "bystander-00000", policy="bystander", targets=[server], ingress=allow_from(client)
        )
    )
    await rig.start_agent("--log-level=info")
    await rig.ready()
    expect = [True, False]
    cases = [(client, server, 80, "TCP", 4), (other, server, 80, "TCP", 4)]
    await rig.converge(cases, expect)

    rng = random.Random(20261121)
    invalid: dict[str, str] = {}
    for i in range(OBJECTS):
        body = generate(rng, i, victims, str(rig.sim.node_ipv4))
        try:
            from_api(dict(body, metadata=dict(body["metadata"], generation=1)))
        except PolicyEndpointError as exc:
            invalid[body["metadata"]["name"]] = exc.reason
        rig.apply(body)
    assert 0.2 * OBJECTS < len(invalid) < 0.9 * OBJECTS, len(invalid)  # a real mix

    async def all_rejected() -> bool:
        rejected = {
            ln["name"]: ln["reason"]
            for ln in rig.log_lines()
            if ln.get("event") == "policyendpoint.rejected"
        }
        return rejected == invalid

    await eventually(all_rejected, timeout=30, what="one rejection line per invalid object")
    _, metrics = await rig.http(8162, "/metrics")
    counted = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("awsnodeagent_policyendpoint_rejected_total{")
    ]
    assert len(counted) == len(invalid)
    assert rig.proc is not None
    assert rig.proc.returncode is None, "the agent survived"
    # the bystander's enforcement never changed; the valid objects are programmed
    assert await rig.matrix(cases) == expect
    records = rig.records()
    assert {p.ifindex for p in victims} <= set(records)
