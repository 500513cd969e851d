"""The enforcer's pure parts: PolicyEndpoint compaction, desired state, the cache."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.cache import Cache
from agent.desired import pod_directions
from agent.endpoints import Endpoints, from_api
from bpf import layout as lay
from bpf.ruleset import PortRange
from common.kube import WatchEvent
from common.policyendpoint import PolicyEndpointError

NODE_IP = "172.31.255.1"


def pe(name: str, *, pods: list[tuple[str, str, str]], isolation: list[str] | None = None,
       ingress: list[dict[str, Any]] | None = None, egress: list[dict[str, Any]] | None = None,
       policy: str = "p", namespace: str = "default", generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "generation": generation,
                     "annotations": {"networking.k8s.aws/last-change-trigger-time":
                                     "2026-01-02T03:04:05.123456789Z"}},
        "spec": {
            "policyRef": {"name": policy, "namespace": namespace},
            "podIsolation": isolation if isolation is not None else [],
            "podSelectorEndpoints": [{"podIP": ip, "hostIP": host, "name": n,
                                      "namespace": namespace} for n, ip, host in pods],
            "ingress": ingress, "egress": egress,
        },
    }


def test_compaction_of_a_policyendpoint() -> None:
    ep = from_api(pe("web-1", pods=[("a", "10.0.0.1", NODE_IP)], isolation=["Ingress"],
                     ingress=[{"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"],
                               "ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP"}]},
                              {"cidr": "10.9.9.9"}],
                     egress=[{"domainName": "example.com"}]))
    assert ep.policy == ("default", "p")
    assert ep.isolate_ingress
    assert ep.isolate_egress, "an entry in a direction isolates it, even an FQDN one"
    rules = sorted(ep.ingress, key=lambda r: str(r.cidr))
    assert [str(r.cidr) for r in rules] == ["10.1.0.0/16", "10.9.9.9/32"]
    assert [str(e) for e in rules[0].excepts] == ["10.1.2.0/24"]
    assert rules[0].ports == (PortRange(lay.NP_PROTO_TCP, 80, 90),
                              PortRange(lay.NP_PROTO_UDP, 0, 65535))
    assert rules[1].ports == ()
    assert len(ep.ingress) == 2
    # kept compact: the plain /32 packed, the rule with an except as it is
    assert [len(packed) for _, packed in ep.ingress.groups] == [18]
    assert list(ep.egress) == [], "FQDN rules are not enforced on the NetworkPolicy path"
    assert ep.trigger_time is not None
    assert ep.trigger_time == pytest.approx(1767323045.123456, abs=1e-3)


def test_egress_entries_isolate_egress_even_without_pod_isolation() -> None:
    ep = from_api(pe("e-1", pods=[], egress=[{"cidr": "0.0.0.0/0"}]))
    assert ep.isolate_egress
    assert not ep.isolate_ingress


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"cidr": "10.0.0.0/33"}, id="prefix too long"),
        pytest.param({"cidr": "10.0.0.0/8", "ports": [{"port": 0}]}, id="port zero"),
        pytest.param({"cidr": "10.0.0.0/8", "ports": [{"port": "http"}]},
                     id="unresolved named port"),
        pytest.param({"cidr": "10.0.0.0/8", "ports": [{"endPort": 80}]}, id="endPort alone"),
        pytest.param({"cidr": "10.0.0.0/8", "ports": [{"protocol": "icmp"}]}, id="bad protocol"),
        pytest.param({}, id="no cidr"),
    ],
)
def test_invalid_entries_are_rejected_with_the_field(entry: dict[str, Any]) -> None:
    with pytest.raises(PolicyEndpointError) as exc:
        from_api(pe("bad-1", pods=[], ingress=[entry]))
    assert exc.value.reason.startswith("spec.ingress.0")


def ids(ref: tuple[str, str]) -> int:
    return {"p": 1, "q": 2}.get(ref[1], 9)


def states(endpoints: list[Endpoints], *, strict: bool) -> tuple[str, str]:
    ing, egr = pod_directions(endpoints, strict=strict, policy_id=ids)
    return lay.STATE_NAMES[ing.state], lay.STATE_NAMES[egr.state]


@pytest.mark.parametrize(
    ("strict", "pes", "expect"),
    [
        pytest.param(False, [], ("DEFAULT_ALLOW", "DEFAULT_ALLOW"), id="standard without policy"),
        pytest.param(True, [], ("DEFAULT_DENY", "DEFAULT_DENY"), id="strict without policy"),
        pytest.param(True, [{"isolation": ["Ingress"]}], ("POLICIES_APPLIED", "DEFAULT_ALLOW"),
                     id="strict with an ingress policy allows the other direction"),
        pytest.param(False, [{"isolation": ["Ingress", "Egress"]}],
                     ("POLICIES_APPLIED", "POLICIES_APPLIED"), id="isolated without rules"),
        pytest.param(False, [{"isolation": []}, {"isolation": ["Egress"]}],
                     ("DEFAULT_ALLOW", "POLICIES_APPLIED"), id="union of isolation"),
    ],
)
def test_desired_states(strict: bool, pes: list[dict[str, Any]], expect: tuple[str, str]) -> None:
    endpoints = [from_api(pe(f"x-{i}", pods=[("a", "10.0.0.1", NODE_IP)], **kw))
                 for i, kw in enumerate(pes)]
    assert states(endpoints, strict=strict) == expect


def test_union_of_rules_carries_each_policys_id() -> None:
    one = from_api(pe("p-1", policy="p", pods=[], isolation=["Ingress"],
                      ingress=[{"cidr": "10.0.0.0/8", "ports": [{"port": 80}]}]))
    two = from_api(pe("q-1", policy="q", pods=[], isolation=["Ingress"],
                      ingress=[{"cidr": "10.1.0.0/16", "ports": [{"port": 443}]}]))
    ingress, _ = pod_directions([one, two], strict=False, policy_id=ids)
    assert ingress.rules is not None
    c = ingress.rules
    prefix = c.lookup(ipaddress.ip_address("10.1.2.3"))
    assert prefix is not None
    ps = c.entries[prefix]
    assert ps.allows(lay.NP_PROTO_TCP, 80) == 1
    assert ps.allows(lay.NP_PROTO_TCP, 443) == 2


def test_cache_keeps_only_what_concerns_this_node() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    pods = cache.pods_consumer()
    endpoints = cache.endpoints_consumer()
    pods.replace([{"metadata": {"name": "a", "namespace": "default", "uid": "u1"},
                   "spec": {}, "status": {"podIP": "10.0.0.1"}}])
    endpoints.replace([
        pe("here-1", pods=[("a", "10.0.0.1", NODE_IP)]),
        pe("elsewhere-1", pods=[("z", "10.9.0.1", "172.31.0.99")]),
        pe("soon-1", pods=[("b", "10.0.0.2", NODE_IP)]),  # a pod not seen yet, on this node
    ])
    assert set(cache.endpoints) == {("default", "here-1"), ("default", "soon-1")}
    assert cache.take_dirty() == {("default", "a")}
    pods.apply(WatchEvent("ADDED", {"metadata": {"name": "b", "namespace": "default"},
                                    "spec": {}, "status": {"podIP": "10.0.0.2"}}))
    assert [e.name for e in cache.endpoints_for(("default", "b"))] == ["soon-1"]


def test_cache_rejection_keeps_the_last_accepted_version() -> None:
    seen: list[tuple[str, str, str]] = []
    cache = Cache(node_addresses=lambda: {NODE_IP},
                  on_rejected=lambda ns, n, why: seen.append((ns, n, why)))
    pods, endpoints = cache.pods_consumer(), cache.endpoints_consumer()
    pods.replace([{"metadata": {"name": "a", "namespace": "default"}, "spec": {},
                   "status": {"podIP": "10.0.0.1"}}])
    good = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], ingress=[{"cidr": "10.0.0.0/8"}])
    endpoints.replace([good])
    cache.take_dirty()
    bad = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], ingress=[{"cidr": "nonsense"}],
             generation=2)
    endpoints.apply(WatchEvent("MODIFIED", bad))
    assert cache.endpoints[("default", "p-1")].generation == 1
    assert cache.take_dirty() == set(), "nothing to reprogram"
    assert seen == [("default", "p-1", "spec.ingress.0.cidr: invalid CIDR 'nonsense'")]
    assert cache.rejected == {("default", "p-1"): "spec.ingress.0.cidr: invalid CIDR 'nonsense'"}
    endpoints.apply(WatchEvent("DELETED", bad))
    assert cache.endpoints == {}
    assert cache.take_dirty() == {("default", "a")}


def test_an_empty_list_still_wakes_the_enforcer() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    cache.pods_consumer().replace([])
    cache.endpoints_consumer().replace([])
    assert cache.pods_synced
    assert cache.endpoints_synced
    assert cache.changed.is_set()
