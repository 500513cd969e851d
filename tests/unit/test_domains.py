"""Domain rules: parsing, and what a learned address opens (agent.domains)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.desired import plan_pod
from agent.domains import decision_for, final_addresses
from agent.endpoints import from_api, from_cluster_api
from bpf import layout as lay
from common.policyendpoint import PolicyEndpointError

A = ipaddress.ip_address
NODE = "172.31.0.9"
IDS = {("x", "anp"): 7, ("x", "np"): 8, ("", "cnp"): 9, ("", "deny-all"): 10}


def pe(name: str, policy: str, egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "x"},
        "spec": {
            "policyRef": {"name": policy, "namespace": "x"},
            "podIsolation": ["Egress"],
            "podSelectorEndpoints": [
                {"podIP": "10.0.0.1", "hostIP": NODE, "name": "a", "namespace": "x"}
            ],
            "egress": egress,
        },
    }


def cpe(name: str, policy: str, priority: int, egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "ClusterPolicyEndpoint",
        "metadata": {"name": name},
        "spec": {
            "policyRef": {"name": policy},
            "tier": "Admin",
            "priority": priority,
            "subject": {"namespaces": {}},
            "podSelectorEndpoints": [
                {"podIP": "10.0.0.1", "hostIP": NODE, "name": "a", "namespace": "x"}
            ],
            "egress": egress,
        },
    }


def pid(ref: tuple[str, str]) -> int:
    return IDS[ref]


def test_an_application_policys_domain_opens_its_ports_for_the_asked_name() -> None:
    anp = from_api(
        pe(
            "anp-1",
            "anp",
            [
                {"domainName": "*.example.com", "ports": [{"protocol": "TCP", "port": 443}]},
                {"cidr": "192.0.2.0/24"},
            ],
        )
    )
    assert [d.pattern for d in anp.domains] == ["*.example.com"]
    plan = plan_pod([anp], strict=False, policy_id=pid)
    assert plan.egress.state == lay.NP_STATE_POLICIES_APPLIED
    inputs = plan.egress_inputs
    ps = decision_for(inputs, name="API.example.com.", address=A("198.51.100.7"))
    assert ps is not None
    assert ps.decide(lay.NP_PROTO_TCP, 443).allowed
    assert ps.decide(lay.NP_PROTO_TCP, 443).policy_id == 7
    assert not ps.decide(lay.NP_PROTO_TCP, 80).allowed
    assert decision_for(inputs, name="example.com", address=A("198.51.100.7")) is None
    # an address the NetworkPolicy already opens keeps what it had, plus the domain's
    both = decision_for(inputs, name="www.example.com", address=A("192.0.2.5"))
    assert both is not None
    assert both.decide(lay.NP_PROTO_UDP, 53).allowed


def test_a_cluster_domain_accept_competes_by_priority() -> None:
    deny_all = from_cluster_api(
        cpe("deny-all-1", "deny-all", 20, [{"cidr": "0.0.0.0/0", "action": "Deny"}])
    )
    allow = from_cluster_api(
        cpe("cnp-1", "cnp", 10, [{"domainName": "api.example.com", "action": "Accept"}])
    )
    plan = plan_pod([deny_all, allow], strict=False, policy_id=pid)
    ps = decision_for(plan.egress_inputs, name="api.example.com", address=A("198.51.100.7"))
    assert ps is not None
    d = ps.decide(lay.NP_PROTO_TCP, 80)
    assert (d.allowed, d.tier, d.policy_id) == (True, lay.NP_TIER_ADMIN, 9)
    # the Deny at a lower number wins over the Accept
    first = from_cluster_api(
        cpe("deny-all-1", "deny-all", 5, [{"cidr": "0.0.0.0/0", "action": "Deny"}])
    )
    plan = plan_pod([first, allow], strict=False, policy_id=pid)
    ps = decision_for(plan.egress_inputs, name="api.example.com", address=A("198.51.100.7"))
    assert ps is not None
    assert not ps.decide(lay.NP_PROTO_TCP, 80).allowed


def test_strict_pod_with_only_a_cluster_domain_rule_is_applied() -> None:
    allow = from_cluster_api(
        cpe("cnp-1", "cnp", 10, [{"domainName": "api.example.com", "action": "Accept"}])
    )
    plan = plan_pod([allow], strict=True, policy_id=pid)
    assert plan.egress.state == lay.NP_STATE_POLICIES_APPLIED, "learned entries are consulted"
    ps = decision_for(plan.egress_inputs, name="api.example.com", address=A("fd00::7"))
    assert ps is not None
    assert ps.decide(lay.NP_PROTO_UDP, 9).allowed


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        (pe("bad-1", "anp", [{"domainName": "a.*.example.com"}]), "not a domain name"),
        (cpe("bad-1", "cnp", 1, [{"domainName": "a.example.com", "action": "Deny"}]), "Accept"),
    ],
)
def test_bad_domain_entries_are_refused(obj: dict[str, Any], problem: str) -> None:
    with pytest.raises(PolicyEndpointError, match=problem):
        (from_cluster_api if obj.get("kind") else from_api)(obj)


def test_final_addresses_follow_the_cname_chain() -> None:
    answers = [
        ("www.example.com.", "CNAME", "api.example.com.", 300),
        ("api.example.com.", "A", "192.0.2.1", 60),
        ("api.example.com.", "AAAA", "2001:db8::1", 600),
        ("other.example.com.", "A", "192.0.2.99", 60),
    ]
    assert final_addresses("WWW.example.com", answers) == [
        (A("192.0.2.1"), 60),
        (A("2001:db8::1"), 300),
    ]
    loop = [("a.example.", "CNAME", "b.example.", 5), ("b.example.", "CNAME", "a.example.", 5)]
    assert final_addresses("a.example", loop) == []


async def test_the_cluster_dns_is_the_kube_dns_service(tmp_path: Any) -> None:
    from agent.main import discover_cluster_dns
    from common.kube import KubeClient
    from fakekube import store as fs
    from fakekube.server import FakeKube

    server = FakeKube()
    await server.start()
    server.write_kubeconfig(str(tmp_path / "kubeconfig"))
    kube = await KubeClient.connect(str(tmp_path / "kubeconfig"))
    try:
        assert await discover_cluster_dns(kube) == (), "no Service: nothing steered"
        server.store.create(
            fs.SERVICES,
            "kube-system",
            {
                "metadata": {"name": "kube-dns"},
                "spec": {"clusterIP": "10.100.0.10", "clusterIPs": ["10.100.0.10", "fd00::a"]},
            },
        )
        assert await discover_cluster_dns(kube) == ("10.100.0.10", "fd00::a")
    finally:
        await kube.close()
        await server.stop()
