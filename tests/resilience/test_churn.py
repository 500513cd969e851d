"""A node that runs for months, compressed: pods re-created with new UIDs (as Jobs,
CronJobs and rolling updates do) and policies renamed, past every capacity of a test
build with small tables. Afterwards the tables hold only what is live, a brand-new pod is
enforced, and flow logs name the right pods."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bpf import layout as lay
from common.apimodels import NodeStatus
from fakekube import store as fs
from simnode.node import SimPod
from tests.privileged.agentrig import AgentRig, allow_from, eventually
from tests.privileged.test_flowlogs import lines_with

POD_META, POLICIES = 12, 8  # capacities: 11 and 7 ids (key 0 is the watermark)
ROUNDS = 7  # 4 UIDs and 2 policy names a round: 28 and 14 in all
CHURN_ENV = {
    "NP_MAP_SIZES": f"{lay.MAP_POD_META}={POD_META},{lay.MAP_POLICIES}={POLICIES}",
    "NP_ID_GRACE": "0.5",
    "NP_LIFECYCLE_PERIOD": "0.5",
}
TCP80 = [{"protocol": "TCP", "port": 80}]
UDP81 = [{"protocol": "UDP", "port": 81}]  # the second policy's own rule: its id stays in use


def _pod_object(rig: AgentRig, pod: SimPod, name: str) -> None:
    rig.create_pod_object(pod, name=name, labels={"app": pod.name})


def _policy(
    rig: AgentRig,
    name: str,
    targets: list[tuple[str, str]],
    peer: SimPod,
    pods: dict[str, SimPod],
    ports: list[dict[str, Any]] = TCP80,
) -> dict[str, Any]:
    body = rig.policy_endpoint(name, policy=name, targets=[], ingress=allow_from(peer, ports=ports))
    body["spec"]["podSelectorEndpoints"] = [
        {
            "podIP": str(pods[t].ipv4),
            "hostIP": str(rig.sim.node_ipv4),
            "name": obj,
            "namespace": "default",
        }
        for t, obj in targets
    ]
    return body


async def _tables(rig: AgentRig) -> dict[str, tuple[int, int]]:
    st = await rig.agent.get("/v1/status", NodeStatus)
    return {name: (t.entries, t.capacity) for name, t in st.tables.items()}


async def test_churn_past_every_capacity(rig: AgentRig, tmp_path: Path) -> None:
    churned = [await rig.add_pod(n, create_object=False) for n in ("web", "a", "b", "c")]
    peer = await rig.add_pod("peer")
    pods = {p.name: p for p in churned}
    flow_log = tmp_path / "flows.log"
    await rig.start_agent("--enable-policy-event-logs=true", env=CHURN_ENV)
    await rig.start_process(
        "flowlogs", "--enable-policy-event-logs=true", f"--log-file={flow_log}", "--log-level=info"
    )
    await rig.ready()

    names: dict[str, str] = {}
    previous: list[str] = []
    for r in range(ROUNDS):
        # every churned pod is re-created: same address, a new UID (and here a new name,
        # so that a flow log naming an old pod would show)
        for p in churned:
            if p.name in names:
                rig.api.store.delete(fs.PODS, "default", names[p.name])
            names[p.name] = f"{p.name}-{r}"
            _pod_object(rig, p, names[p.name])
        targets = [(p.name, names[p.name]) for p in churned]
        current = [f"allow-peer-{r}", f"also-peer-{r}"]  # two new policy names a round
        # (two policies with the same rule would merge into one port rule carrying one
        # id: each has a rule of its own, so both ids stay in use)
        rig.apply(_policy(rig, current[0], targets, peer, pods))
        rig.apply(_policy(rig, current[1], targets, peer, pods, ports=UDP81))
        for name in previous:
            rig.delete(name)
        previous = current
        web, b = pods["web"], pods["b"]
        await rig.converge(
            [(peer, web, 80, "TCP", 4), (peer, web, 81, "TCP", 4), (b, web, 80, "TCP", 4)],
            [True, False, False],
            timeout=30,
        )
        await rig.settle_agent(timeout=30)

    # the tables come back to what is live: 5 pods, 2 policy names
    live = {lay.MAP_PODS: 5, lay.MAP_POD_META: 5, lay.MAP_POLICIES: 2}
    seen: dict[str, tuple[int, int]] = {}

    async def back_to_live() -> bool:
        nonlocal seen
        seen = await _tables(rig)
        return all(seen[t][0] == n for t, n in live.items())

    await eventually(back_to_live, timeout=10, what=lambda: f"tables {seen}")
    assert seen[lay.MAP_POD_META][1] == POD_META - 1
    assert seen[lay.MAP_POLICIES][1] == POLICIES - 1

    # a brand-new pod with a policy is programmed, and the peer its policy denies drops
    fresh = await rig.add_pod("fresh", create_object=False)
    _pod_object(rig, fresh, "fresh")
    pods["fresh"] = fresh
    rig.apply(_policy(rig, "fresh-only-peer", [("fresh", "fresh")], peer, pods))
    await rig.settle_agent(timeout=30)
    await rig.converge(
        [(peer, fresh, 80, "TCP", 4), (pods["a"], fresh, 80, "TCP", 4)], [True, False]
    )

    # flow logs name the pods as they are now, never an earlier incarnation's name
    denied = await lines_with(
        flow_log, f"Src IP: {pods['a'].ipv4}", f"Dest IP: {fresh.ipv4}", "Verdict DENY"
    )
    assert denied[0].endswith("Pod default/fresh Policy -"), denied[0]
    assert not await rig.probe(pods["b"], pods["web"], port=80)
    last = f"web-{ROUNDS - 1}"
    denied = await lines_with(
        flow_log, f"Src IP: {pods['b'].ipv4}", f"Dest IP: {pods['web'].ipv4}", "Verdict DENY"
    )
    assert denied[-1].endswith(f"Pod default/{last} Policy -"), denied[-1]
    text = await asyncio.to_thread(flow_log.read_text)
    for line in text.splitlines():
        if f"Dest IP: {pods['web'].ipv4}" in line and "Verdict DENY" in line:
            # each line names the incarnation that was live then: one of the churned names
            assert " Pod default/web-" in line, line

    # the churn outran the small table at times: those pods were reported, retried and
    # programmed once ids were freed; none failed for good
    full = [ln for ln in rig.log_lines() if ln.get("event") == "enforcer.pod_failed"]
    assert full, "the churn never filled the pod table: raise ROUNDS or lower POD_META"
    assert all(ln["reason"] == "table-full" for ln in full), full[:3]
    _, metrics = await rig.http(8162, "/metrics")
    assert 'awsnodeagent_pod_programming_failures_total{reason="table-full"}' in metrics
    st = await rig.agent.get("/v1/status", NodeStatus)
    assert st.failed == {}, st.failed
