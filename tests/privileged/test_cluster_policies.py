"""ClusterPolicyEndpoints in the AWS controller's layout fed to the real agent, proven with
traffic: tiers, priorities and actions, strict mode, established flows, changes under
continuous traffic, bad input."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from fakekube import store as fs
from simnode.node import SimPod
from simnode.traffic import open_tcp, tcp_probe
from tests.privileged.agentrig import AgentRig, eventually

TRIGGER = "networking.k8s.aws/last-change-trigger-time"


def cpe(
    rig: AgentRig,
    name: str,
    *,
    policy: str,
    tier: str,
    priority: int,
    subjects: list[SimPod],
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
    trigger_time: str | None = None,
) -> dict[str, Any]:
    """A ClusterPolicyEndpoint as the AWS controller writes it."""
    meta: dict[str, Any] = {"name": name}
    if trigger_time:
        meta["annotations"] = {TRIGGER: trigger_time}
    return {
        "apiVersion": "networking.k8s.aws/v1alpha1",
        "kind": "ClusterPolicyEndpoint",
        "metadata": meta,
        "spec": {
            "policyRef": {"name": policy},
            "tier": tier,
            "priority": priority,
            "subject": {"namespaces": {}},
            "podSelectorEndpoints": [rig.endpoint(p) for p in subjects],
            "ingress": ingress or [],
            "egress": egress or [],
        },
    }


def entries(
    action: str, *peers: SimPod, port: int | None = None, protocol: str = "TCP"
) -> list[dict[str, Any]]:
    out = []
    for p in peers:
        for ip, bits in ((p.ipv4, 32), (p.ipv6, 128)):
            e: dict[str, Any] = {"cidr": f"{ip}/{bits}", "action": action}
            if port is not None:
                e["ports"] = [{"protocol": protocol, "port": port}]
            out.append(e)
    return out


def apply(rig: AgentRig, body: dict[str, Any]) -> None:
    store, name = rig.api.store, body["metadata"]["name"]
    try:
        current = store.get(fs.CLUSTER_POLICY_ENDPOINTS, "", name)
    except fs.ApiError:
        store.create(fs.CLUSTER_POLICY_ENDPOINTS, None, body)
        return
    body = dict(
        body,
        metadata=dict(body["metadata"], resourceVersion=current["metadata"]["resourceVersion"]),
    )
    store.update(fs.CLUSTER_POLICY_ENDPOINTS, "", name, body)


async def test_strict_mode_pod_selected_only_by_a_cluster_policy(strict_rig: AgentRig) -> None:
    """The reference drops node traffic to such a pod; the node always gets through."""
    rig = strict_rig
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    apply(
        rig,
        cpe(
            rig,
            "admin-web-x1y2z",
            policy="admin-web",
            tier="Admin",
            priority=10,
            subjects=[server],
            ingress=entries("Accept", client, port=80),
        ),
    )
    cases = [
        (client, server, 80, "TCP", 4),
        (client, server, 80, "TCP", 6),
        (client, server, 81, "TCP", 4),
        (None, server, 80, "TCP", 4),  # the node
        (None, server, 81, "TCP", 4),
        (None, server, 81, "TCP", 6),
    ]
    # client's egress is its own (strict: default deny) -- let it out
    rig.open_policy("client-open", [client])
    await rig.converge(cases, [True, True, False, True, True, True])
    await rig.settle_agent()
    allowed = await rig.explain("default/server", client)
    assert (allowed["tier"], allowed["priority"], allowed["action"]) == ("ADMIN", 10, "Accept")
    assert allowed["policy"] == "admin-web"
    assert allowed["policyendpoints"] == ["admin-web-x1y2z"]
    denied = await rig.explain("default/server", client, port=81)
    assert (denied["verdict"], denied["tier"]) == ("DENY", "DEFAULT"), denied
    assert "every tier passed" in denied["summary"]


async def test_accept_to_deny_keeps_established_flows_and_refuses_new_ones(rig: AgentRig) -> None:
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    # a NetworkPolicy isolates the server with nothing allowed: only the Admin tier lets in
    rig.apply(rig.policy_endpoint("isolate-abc12", policy="isolate", targets=[server]))
    body = cpe(
        rig,
        "gate-a1b2c",
        policy="gate",
        tier="Admin",
        priority=100,
        subjects=[server],
        ingress=entries("Accept", client, port=80),
    )
    apply(rig, body)
    case = [(client, server, 80, "TCP", 4)]
    await rig.converge(case, [True])
    conn = await open_tcp(netns=client.netns, target=server.ipv4, port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"before", expect="server")
        for e in body["spec"]["ingress"]:
            e["action"] = "Deny"
        apply(rig, body)
        await rig.converge(case, [False])  # new connections: the current verdict
        # the established flow and its replies go on
        for i in range(5):
            assert await conn.exchange(f"after-{i}".encode(), expect="server")
        answer = await rig.explain("default/server", client)
        assert (answer["verdict"], answer["tier"], answer["action"]) == ("DENY", "ADMIN", "Deny")
    finally:
        await conn.close()
    # Deny -> Pass: the NetworkPolicy decides (isolated, nothing allowed)
    for e in body["spec"]["ingress"]:
        e["action"] = "Pass"
    apply(rig, body)
    await rig.settle_agent()
    answer = await rig.explain("default/server", client)
    assert (answer["verdict"], answer["tier"]) == ("DENY", "NETWORK_POLICY"), answer


async def _hammer(
    client: SimPod, server: SimPod, stop: asyncio.Event, results: list[tuple[float, bool]]
) -> None:
    """New connections back to back (each a new flow the datapath judges)."""
    while not stop.is_set():
        ok = await tcp_probe(netns=client.netns, target=server.ipv4, port=80, timeout=0.3)
        results.append((time.monotonic(), ok))


async def test_tier_and_priority_changes_under_continuous_traffic(rig: AgentRig) -> None:
    server = await rig.add_pod("server")
    friend, foe = await rig.add_pod("friend"), await rig.add_pod("foe")
    await rig.start_agent()
    await rig.ready()
    rig.apply(rig.policy_endpoint("isolate-abc12", policy="isolate", targets=[server]))
    deny_all = cpe(
        rig,
        "deny-all-11111",
        policy="deny-all",
        tier="Admin",
        priority=20,
        subjects=[server],
        ingress=entries("Deny", friend, foe),
    )
    friend_first = cpe(
        rig,
        "friend-first-22222",
        policy="friend-first",
        tier="Admin",
        priority=10,
        subjects=[server],
        ingress=entries("Accept", friend),
    )
    apply(rig, deny_all)
    apply(rig, friend_first)
    cases = [(friend, server, 80, "TCP", 4), (foe, server, 80, "TCP", 4)]
    await rig.converge(cases, [True, False])
    await rig.settle_agent()

    stop = asyncio.Event()
    allowed: list[tuple[float, bool]] = []
    refused: list[tuple[float, bool]] = []
    tasks = [
        asyncio.create_task(_hammer(friend, server, stop, allowed)),
        asyncio.create_task(_hammer(foe, server, stop, refused)),
    ]
    try:
        # a change that keeps every verdict: 10 -> 15 (still before the Deny at 20),
        # rewritten ten times while the traffic runs
        for prio in (15, 12, 18, 11, 19, 13, 17, 14, 16, 15):
            friend_first["spec"]["priority"] = prio
            apply(rig, friend_first)
            await rig.settle_agent()
        await asyncio.sleep(0.5)
        assert allowed
        assert refused
        assert all(ok for _, ok in allowed), "an allowed flow was dropped"
        assert not any(ok for _, ok in refused), "a denied flow passed"

        # a change that flips the verdict: Admin -> Baseline (the NetworkPolicy, which
        # isolates with nothing allowed, now decides before it): one switch, no flapping
        mark = len(allowed)
        friend_first["spec"]["tier"] = "Baseline"
        apply(rig, friend_first)
        await rig.settle_agent()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    after = [ok for _, ok in allowed[mark:]]
    assert after
    assert not after[-1], "friend is denied once Baseline"
    flips = sum(1 for a, b in itertools.pairwise(after) if a != b)
    assert flips <= 1, f"the verdict flapped: {after}"
    assert not any(ok for _, ok in refused), "a denied flow passed"
    answer = await rig.explain("default/server", friend)
    assert (answer["verdict"], answer["tier"]) == ("DENY", "ADMIN"), answer


async def test_bad_cluster_endpoint_is_rejected_and_the_last_valid_stays(rig: AgentRig) -> None:
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    body = cpe(
        rig,
        "deny-client-33333",
        policy="deny-client",
        tier="Baseline",
        priority=5,
        subjects=[server],
        ingress=entries("Deny", client),
        trigger_time="2026-12-03T00:00:00.000000000Z",
    )
    apply(rig, body)
    case = [(client, server, 80, "TCP", 4)]
    await rig.converge(case, [False])
    await rig.settle_agent()
    bad = cpe(
        rig,
        "deny-client-33333",
        policy="deny-client",
        tier="Middle",
        priority=5000,
        subjects=[server],
    )
    apply(rig, bad)
    await eventually(
        lambda: _logged(rig, "policyendpoint.rejected"), timeout=10, what="rejection logged"
    )
    assert await rig.matrix(case) == [False], "the last valid object stays in force"
    status, metrics = await rig.http(8162, "/metrics")
    assert status == 200
    assert "awsnodeagent_cluster_policy_programming_latency_seconds_count 1.0" in metrics
    series = 'awsnodeagent_policyendpoint_rejected_total{name="deny-client-33333",namespace=""}'
    assert f"{series} 1.0" in metrics, [ln for ln in metrics.splitlines() if "rejected" in ln]
    # the CLI shows it apart, and dump-cp-maps in the reference's layout
    shown = await rig.acli("pods", "default/server")
    assert shown.returncode == 0, shown.stderr
    assert "ClusterNetworkPolicies:\n  Baseline priority 5: deny-client" in shown.stdout
    trie = next(ln for ln in shown.stdout.splitlines() if ln.startswith("ingress:"))
    trie_id = int(trie.split("(trie ")[1].rstrip(")"))
    dumped = await rig.acli("ebpf", "dump-cp-maps", str(_map_id(rig, trie_id)))
    assert dumped.returncode == 0, dumped.stderr
    # Baseline Deny at priority 5: 5 * 10 + 0 + 2000
    assert f"Key: {client.ipv4}/32" in dumped.stdout
    assert "Priority  - 2050" in dumped.stdout


async def _logged(rig: AgentRig, event: str) -> bool:
    return any(line.get("event") == event for line in rig.log_lines())


def _map_id(rig: AgentRig, trie_id: int) -> int:
    from bpf.maps import Map

    with Map.from_pin(f"{rig.pin_root}/tries/{trie_id}") as m:
        return m.id


async def test_rule_chunk_before_the_pod_chunk_is_fetched(rig: AgentRig) -> None:
    """The controller's layout at chunk size 1: a rule-only ClusterPolicyEndpoint arrives
    while its policy lists no local pod (kept as a stub), then the pod-only one makes it
    relevant: the rule chunk is fetched again by name (cluster-scoped)."""
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    case = [(client, server, 80, "TCP", 4), (client, server, 80, "TCP", 6)]
    rules = cpe(rig, "split-aaaaa", policy="split", tier="Admin", priority=1, subjects=[])
    rules["spec"]["ingress"] = entries("Deny", client)
    apply(rig, rules)
    await rig.settle_agent()
    assert await rig.matrix(case) == [True, True]
    apply(rig, cpe(rig, "split-bbbbb", policy="split", tier="Admin", priority=1, subjects=[server]))
    await rig.converge(case, [False, False])
    assert await _logged(rig, "policyendpoint.fetching")
    shown = await rig.acli("policies")
    assert shown.returncode == 0, shown.stderr
    line = next(ln for ln in shown.stdout.splitlines() if "split" in ln)
    assert "(cluster)" in line
    assert "Admin 1" in line
    rig.api.store.delete(fs.CLUSTER_POLICY_ENDPOINTS, "", "split-aaaaa")
    await rig.converge(case, [True, True])
