"""What a long-lived node does to the agent: pins removed under it, objects past the
datapath's rule limit, one huge object among small ones, thousands of objects come and
gone. Each proven against the real agent with real packets."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from typing import Any

from bpf import layout as lay
from common.apimodels import NodeStatus, WaitResult
from simnode.node import SimPod
from tests.privileged.agentrig import AgentRig, allow_from, eventually

FAST = {"NP_LIFECYCLE_PERIOD": "0.5"}


async def _web_ok_other(rig: AgentRig, *extra: str) -> tuple[SimPod, SimPod, SimPod]:
    web = await rig.add_pod("web", ports=(80, 81))
    ok, other = await rig.add_pod("ok"), await rig.add_pod("other")
    await rig.start_agent(*extra, env=FAST)
    await rig.ready()
    return web, ok, other


def _odd_ports(start: int, count: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": start + 2 * i} for i in range(count)]


def _anywhere(ports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"cidr": "0.0.0.0/0", "ports": ports}]


async def test_removed_pins_are_restored_without_a_restart(rig: AgentRig) -> None:
    web, ok, other = await _web_ok_other(rig)
    rig.apply(rig.policy_endpoint("allow-ok", targets=[web], ingress=allow_from(ok)))
    cases = [(ok, web, 80, "TCP", 4), (other, web, 80, "TCP", 4)]
    await rig.converge(cases, [True, False])
    # an operator (or a cleanup script) removes the tries and a map's pin
    shutil.rmtree(os.path.join(rig.pin_root, "tries"))
    os.unlink(os.path.join(rig.pin_root, "maps", lay.MAP_PODS))
    assert await rig.matrix(cases) == [True, False]  # the programs hold their maps
    # the next change works, and the agent re-creates what it owns
    rig.apply(rig.policy_endpoint("allow-ok", targets=[web], ingress=allow_from(ok, other)))
    await rig.converge(cases, [True, True])
    await rig.settle_agent()

    async def restored() -> bool:
        return any(ln.get("event") == "datapath.pins_restored" for ln in rig.log_lines())

    await eventually(restored, timeout=10, what="datapath.pins_restored in the log")
    assert await asyncio.to_thread(os.path.exists, os.path.join(rig.pin_root, "maps", lay.MAP_PODS))
    assert await asyncio.to_thread(os.listdir, os.path.join(rig.pin_root, "tries"))
    failed = [ln for ln in rig.log_lines() if ln.get("event") == "enforcer.program_failed"]
    assert failed == []
    assert (await rig.http(8163, "/readyz"))[0] == 200
    # the CLI reads the pins again
    assert (await rig.explain("default/web", other))["verdict"] == "ALLOW"


async def test_over_the_rule_limit_fails_safe_and_later_changes_apply(rig: AgentRig) -> None:
    web, ok, other = await _web_ok_other(rig)
    cases = [(ok, web, 80, "TCP", 4), (ok, web, 81, "TCP", 4), (other, web, 82, "TCP", 4)]
    # one policy allows 80, 81 and 200 odd ports from anywhere: within the limit
    first = _anywhere(
        [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 81}, *_odd_ports(1001, 200)]
    )
    rig.apply(rig.policy_endpoint("ports-a", targets=[web], ingress=first))
    await rig.converge(cases, [True, True, False])
    await rig.settle_agent()
    # a second, valid policy adds 200 more to the same CIDR: 402 ranges, over the limit
    rig.apply(
        rig.policy_endpoint("ports-b", targets=[web], ingress=_anywhere(_odd_ports(3001, 200)))
    )

    async def reported() -> bool:
        res = await rig.agent.get("/v1/wait", WaitResult, params={"timeout": "0"})
        return "default/web" in res.failed

    await eventually(reported, timeout=15, what="web reported as failing in /v1/wait")
    res = await rig.agent.get("/v1/wait", WaitResult, params={"timeout": "0"})
    assert res.failed["default/web"].startswith("rule-limit:"), res.failed
    # it enforces what fits: the lowest ranges, fewer allowed ports, nothing more
    assert await rig.matrix(cases) == [True, True, False]
    pods = await rig.acli("pods")
    assert "no (rule-limit)" in pods.stdout, pods.stdout
    _, metrics = await rig.http(8162, "/metrics")
    assert 'awsnodeagent_pod_programming_failures_total{reason="rule-limit"}' in metrics
    # a revocation in the other object is applied, never held back by the limit
    revoked = _anywhere([{"protocol": "TCP", "port": 80}, *_odd_ports(1001, 200)])
    rig.apply(rig.policy_endpoint("ports-a", targets=[web], ingress=revoked))
    await rig.converge(cases, [True, False, False])
    # back under the limit: the failure ends
    rig.delete("ports-b")
    await rig.settle_agent()
    st = await rig.agent.get("/v1/status", NodeStatus)
    assert st.failed == {}, st.failed
    assert await rig.matrix(cases) == [True, False, False]


async def test_one_huge_object_does_not_hold_up_other_pods(rig: AgentRig) -> None:
    web, ok, other = await _web_ok_other(rig)
    # 10,000 odd ports on one CIDR: compiled (and truncated to the limit) on its own
    rig.apply(
        rig.policy_endpoint("huge", targets=[web], ingress=_anywhere(_odd_ports(10001, 10_000)))
    )
    await asyncio.sleep(0.05)
    # meanwhile a small change for another pod
    started = time.monotonic()
    rig.apply(rig.policy_endpoint("small", targets=[ok], ingress=allow_from(web)))
    await rig.converge([(other, ok, 80, "TCP", 4), (web, ok, 80, "TCP", 4)], [False, True])
    small_took = time.monotonic() - started

    async def huge_reported() -> bool:
        res = await rig.agent.get("/v1/wait", WaitResult, params={"timeout": "0"})
        return res.failed.get("default/web", "").startswith("rule-limit:")

    await eventually(huge_reported, timeout=60, what="the huge object applied (truncated)")
    # web enforces the ports that fit: the lowest; 80 was never allowed
    assert await rig.matrix([(ok, web, 80, "TCP", 4)]) == [False]
    programmed = [ln for ln in rig.log_lines() if ln.get("event") == "enforcer.programmed"]
    slowest = max(ln["ms"] for ln in programmed)
    # no pass held the worker for long (the compile was 12 s when it was quadratic)
    assert slowest < 5000, programmed
    assert small_took < 10, small_took


async def test_metric_series_end_with_their_objects(rig: AgentRig) -> None:
    web, ok, other = await _web_ok_other(rig)
    await rig.settle_agent()
    _, before = await rig.http(8162, "/metrics")
    names = [f"churn-pe-{i:04d}" for i in range(300)]
    for i, name in enumerate(names):
        rig.apply(
            rig.policy_endpoint(
                name, targets=[web, ok, other][i % 3 : i % 3 + 1], ingress=allow_from(ok)
            )
        )
    await rig.settle_agent(timeout=60)
    _, during = await rig.http(8162, "/metrics")
    assert sum(1 for line in during.splitlines() if "churn-pe-" in line) >= len(names)
    for name in names:
        rig.delete(name)
    await rig.settle_agent(timeout=60)

    lingering: list[str] = []

    async def ended() -> bool:
        nonlocal lingering
        _, text = await rig.http(8162, "/metrics")
        lingering = [line for line in text.splitlines() if "churn-pe-" in line]
        return not lingering

    await eventually(ended, timeout=10, what=lambda: f"{len(lingering)} lines: {lingering[:3]}")
    _, after = await rig.http(8162, "/metrics")
    # what is left is about the size it was: series of live objects only
    assert len(after) < 2 * len(before) + 4096, (len(before), len(after))


async def test_a_full_table_shows_everywhere_and_fails_readiness(rig: AgentRig) -> None:
    """The README's promise: a table near full shows in /readyz's body, np-cli status
    and the gauges; a full one fails /readyz (new pods cannot be programmed)."""
    pods = [await rig.add_pod(f"p{i}") for i in range(4)]
    # np_pod_meta holds 3 ids (key 0 is the watermark): the fourth pod cannot get one
    await rig.start_agent(env={**FAST, "NP_MAP_SIZES": f"{lay.MAP_POD_META}=4"})
    rig.apply(rig.policy_endpoint("iso", targets=pods, ingress=[]))
    body = ""

    async def unready() -> bool:
        nonlocal body
        status, body = await rig.http(8163, "/readyz")
        return status == 503 and "table np_pod_meta is full (3/3)" in body

    await eventually(unready, timeout=20, what=lambda: f"/readyz said {body}")
    answer = json.loads(body)
    assert "table np_pod_meta is 3/3 full (100%)" in answer["warnings"]
    st = await rig.agent.get("/v1/status", NodeStatus)
    assert (st.tables[lay.MAP_POD_META].entries, st.tables[lay.MAP_POD_META].capacity) == (3, 3)
    assert len(st.failed) == 1
    assert next(iter(st.failed.values())).startswith("map np_pod_meta: full")
    out = await rig.acli("status")
    assert "table np_pod_meta" in out.stdout
    assert "3/3  <- nearly full" in out.stdout, out.stdout
    _, metrics = await rig.http(8162, "/metrics")
    assert 'awsnodeagent_datapath_table_entries{table="np_pod_meta"} 3.0' in metrics
    assert 'awsnodeagent_datapath_table_capacity{table="np_pod_meta"} 3.0' in metrics
