"""PolicyEndpoints in the AWS controller's layout: one policy split into pod-only and
rule-only objects joined by ``policyRef``, fed to the real agent, proven with traffic."""

from __future__ import annotations

from typing import Any

from simnode.node import SimPod
from tests.privileged.agentrig import AgentRig, allow_from

TCP4, TCP6 = ("TCP", 4), ("TCP", 6)


def pod_chunk(
    rig: AgentRig, name: str, policy: str, *targets: SimPod, isolation: list[str] | None = None
) -> dict[str, Any]:
    """An object holding only pods, as the controller writes it."""
    return rig.policy_endpoint(
        name, policy=policy, targets=list(targets), isolation=isolation or ["Ingress"]
    )


def rule_chunk(
    rig: AgentRig,
    name: str,
    policy: str,
    *,
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
    isolation: list[str] | None = None,
) -> dict[str, Any]:
    """An object holding only entries (no pods)."""
    return rig.policy_endpoint(
        name,
        policy=policy,
        targets=[],
        isolation=isolation or ["Ingress"],
        ingress=ingress,
        egress=egress,
    )


async def _three(rig: AgentRig) -> tuple[SimPod, SimPod, SimPod]:
    web = await rig.add_pod("web")
    ok, other = await rig.add_pod("ok"), await rig.add_pod("other")
    await rig.start_agent()
    await rig.ready()
    return web, ok, other


def _cases(
    web: SimPod, ok: SimPod, other: SimPod
) -> list[tuple[SimPod | None, SimPod, int, str, int]]:
    return [
        (ok, web, 80, *TCP4),
        (ok, web, 80, *TCP6),
        (other, web, 80, *TCP4),
        (other, web, 80, *TCP6),
    ]


async def test_rule_chunk_after_the_pod_chunk(rig: AgentRig) -> None:
    web, ok, other = await _three(rig)
    cases = _cases(web, ok, other)
    rig.apply(pod_chunk(rig, "allow-ok-abc12", "allow-ok", web))
    await rig.converge(cases, [False, False, False, False])  # isolated, nothing allowed yet
    rig.apply(rule_chunk(rig, "allow-ok-def34", "allow-ok", ingress=allow_from(ok)))
    await rig.converge(cases, [True, True, False, False])
    await rig.settle_agent()
    # explain names the object whose entry decided, not just the policy
    for peer, verdict, objects in (
        (ok, "ALLOW", ["default/allow-ok-def34"]),
        (other, "DENY", ["default/allow-ok-abc12", "default/allow-ok-def34"]),
    ):
        answer = await rig.explain("default/web", peer)
        assert (answer["verdict"], answer["policyendpoints"]) == (verdict, objects)

    # the rule chunk moves to a third object (the controller re-packs): still allowed
    rig.apply(rule_chunk(rig, "allow-ok-ghi56", "allow-ok", ingress=allow_from(ok)))
    rig.delete("allow-ok-def34")
    await rig.settle_agent()
    assert await rig.matrix(cases) == [True, True, False, False]

    # the rule chunk is deleted: the policy isolates with nothing allowed
    rig.delete("allow-ok-ghi56")
    await rig.converge(cases, [False, False, False, False])
    rig.delete("allow-ok-abc12")
    await rig.converge(cases, [True, True, True, True])


async def test_rule_chunk_before_the_pod_chunk(rig: AgentRig) -> None:
    """The rule-only object arrives while the policy selects no local pod (so the agent
    keeps a stub of it), then the pod chunk makes it relevant: it is fetched again."""
    web, ok, other = await _three(rig)
    cases = _cases(web, ok, other)
    rig.apply(rule_chunk(rig, "allow-ok-def34", "allow-ok", ingress=allow_from(ok)))
    await rig.settle_agent()
    assert await rig.matrix(cases) == [True, True, True, True]
    rig.apply(pod_chunk(rig, "allow-ok-abc12", "allow-ok", web))
    await rig.converge(cases, [True, True, False, False])
    await rig.settle_agent()
    fetched = [line for line in rig.log_lines() if line.get("event") == "policyendpoint.fetching"]
    assert fetched, "the rule chunk was held as a stub and fetched again"


async def test_entries_moved_between_chunks_and_pods_moved(rig: AgentRig) -> None:
    web, ok, other = await _three(rig)
    cases = [*_cases(web, ok, other), (web, ok, 80, *TCP4)]
    # pods and rules spread over three objects, one of them mixed
    rig.apply(
        rig.policy_endpoint("p-aaaaa", policy="p", targets=[web], ingress=allow_from(ok)[:1])
    )  # ok's IPv4
    rig.apply(rule_chunk(rig, "p-bbbbb", "p", ingress=allow_from(ok)[1:]))  # ok's IPv6
    await rig.converge(cases, [True, True, False, False, True])
    # both of ok's entries move into one object, the other object keeps nothing
    rig.apply(rule_chunk(rig, "p-bbbbb", "p", ingress=[]))
    rig.apply(rig.policy_endpoint("p-aaaaa", policy="p", targets=[web], ingress=allow_from(ok)))
    await rig.settle_agent()
    assert await rig.matrix(cases) == [True, True, False, False, True]
    # the pod moves to a pod-only object; ok's pod joins the policy's pods too
    rig.apply(rule_chunk(rig, "p-aaaaa", "p", ingress=allow_from(ok)))
    rig.apply(pod_chunk(rig, "p-bbbbb", "p", web, ok))
    # ok's own ingress is isolated now: only ok itself is allowed into it
    await rig.converge(cases, [True, True, False, False, False])


async def test_two_policies_sharing_pods_and_directions_in_separate_chunks(rig: AgentRig) -> None:
    web, ok, other = await _three(rig)
    cases = [*_cases(web, ok, other), (web, ok, 80, *TCP4), (web, other, 80, *TCP4)]
    # policy a: ingress from ok, its pods in one object, its rules in another
    rig.apply(pod_chunk(rig, "a-11111", "a", web))
    rig.apply(rule_chunk(rig, "a-22222", "a", ingress=allow_from(ok)))
    # policy b: the same pod; ingress from other in one chunk, egress to ok in another
    both = ["Ingress", "Egress"]
    rig.apply(pod_chunk(rig, "b-11111", "b", web, isolation=both))
    rig.apply(rule_chunk(rig, "b-22222", "b", ingress=allow_from(other), isolation=both))
    rig.apply(rule_chunk(rig, "b-33333", "b", egress=allow_from(ok), isolation=both))
    await rig.converge(cases, [True, True, True, True, True, False])
    rig.delete("b-22222")  # b's ingress entries gone: a's still allow ok
    await rig.converge(cases, [True, True, False, False, True, False])
    rig.delete("b-33333")  # b isolates egress with no entries left
    await rig.converge(cases, [True, True, False, False, False, False])


async def test_hostnetwork_entries_are_not_enforced(rig: AgentRig) -> None:
    web, ok, other = await _three(rig)
    cases = _cases(web, ok, other)
    body = pod_chunk(rig, "hn-11111", "hn", web)
    body["spec"]["podSelectorEndpoints"][0]["hostIP"] = str(web.ipv4)  # podIP == hostIP
    rig.apply(body)
    rig.apply(rule_chunk(rig, "hn-22222", "hn", ingress=allow_from(ok)))
    await rig.settle_agent()
    assert await rig.matrix(cases) == [True, True, True, True]


async def test_only_the_pods_own_namespace_and_address_select(rig: AgentRig) -> None:
    a = await rig.add_pod("a")
    b = await rig.add_pod("b")
    d = await rig.add_pod("d", namespace="other-ns")
    client = await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    cases = [(client, a, 80, *TCP4), (client, b, 80, *TCP4), (client, d, 80, *TCP4)]
    await rig.converge(cases, [True, True, True])
    # an object in namespace evil listing default/a
    evil = rig.policy_endpoint("evil-11111", policy="evil", namespace="evil", targets=[])
    evil["spec"]["podSelectorEndpoints"] = [rig.endpoint(a, "default")]
    rig.apply(evil)
    # an object in default listing other-ns/d
    stray = rig.policy_endpoint("stray-11111", policy="stray", targets=[])
    stray["spec"]["podSelectorEndpoints"] = [rig.endpoint(d, "other-ns")]
    rig.apply(stray)
    # b's name with another pod's address and a foreign node
    forged = rig.policy_endpoint("forged-11111", policy="forged", targets=[])
    forged["spec"]["podSelectorEndpoints"] = [
        {"podIP": str(client.ipv4), "hostIP": "192.0.2.77", "name": "b", "namespace": "default"}
    ]
    rig.apply(forged)
    # a legitimate change afterwards proves the agent has processed everything before it
    rig.apply(
        rig.policy_endpoint("real-11111", policy="real", targets=[client], isolation=["Ingress"])
    )
    await rig.converge([*cases, (a, client, 80, *TCP4)], [True, True, True, False])
    await rig.settle_agent()
    assert await rig.matrix(cases) == [True, True, True]
    events = [(line.get("event"), line.get("reason")) for line in rig.log_lines()]
    assert ("policyendpoint.entry_ignored", "foreign-namespace") in events
    assert ("policyendpoint.entry_ignored", "address-mismatch") in events
    status, metrics = await rig.http(8162, "/metrics")
    assert status == 200
    assert (
        'awsnodeagent_policyendpoint_entries_ignored_total{reason="foreign-namespace"}' in metrics
    )
