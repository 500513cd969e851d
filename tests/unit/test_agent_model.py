"""The enforcer's pure parts: PolicyEndpoint compaction, desired state, the cache."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from agent.cache import Cache
from agent.desired import pod_directions
from agent.endpoints import Endpoints, from_api
from bpf import layout as lay
from bpf.ruleset import PortRange
from common.kube import WatchEvent
from common.policyendpoint import GROUP_ANNOTATION, PolicyEndpointError

NODE_IP = "172.31.255.1"


def full_state(consumer: Any, items: list[dict[str, Any]]) -> None:
    """A (re)list delivering ``items``, as list_watch does."""
    consumer.begin()
    for obj in items:
        consumer.add(obj)
    consumer.end()


def pe(
    name: str,
    *,
    pods: list[tuple[str, str, str]],
    isolation: list[str] | None = None,
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
    policy: str = "p",
    namespace: str = "default",
    generation: int = 1,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generation": generation,
            "annotations": {
                "networking.k8s.aws/last-change-trigger-time": "2026-01-02T03:04:05.123456789Z"
            },
        },
        "spec": {
            "policyRef": {"name": policy, "namespace": namespace},
            "podIsolation": isolation if isolation is not None else [],
            "podSelectorEndpoints": [
                {"podIP": ip, "hostIP": host, "name": n, "namespace": namespace}
                for n, ip, host in pods
            ],
            "ingress": ingress,
            "egress": egress,
        },
    }


def test_compaction_of_a_policyendpoint() -> None:
    ep = from_api(
        pe(
            "web-1",
            pods=[("a", "10.0.0.1", NODE_IP)],
            isolation=["Ingress"],
            ingress=[
                {
                    "cidr": "10.1.0.0/16",
                    "except": ["10.1.2.0/24"],
                    "ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP"}],
                },
                {"cidr": "10.9.9.9"},
            ],
            egress=[{"domainName": "example.com"}],
        )
    )
    assert ep.policy == ("default", "p")
    assert ep.isolate_ingress
    assert ep.isolate_egress, "an entry in a direction isolates it, even an FQDN one"
    rules = sorted(ep.ingress, key=lambda r: str(r.cidr))
    assert [str(r.cidr) for r in rules] == ["10.1.0.0/16", "10.9.9.9/32"]
    assert [str(e) for e in rules[0].excepts] == ["10.1.2.0/24"]
    assert rules[0].ports == (
        PortRange(lay.NP_PROTO_TCP, 80, 90),
        PortRange(lay.NP_PROTO_UDP, 0, 65535),
    )
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
        pytest.param(
            {"cidr": "10.0.0.0/8", "ports": [{"port": "http"}]}, id="unresolved named port"
        ),
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
        pytest.param(
            True,
            [{"isolation": ["Ingress"]}],
            ("POLICIES_APPLIED", "DEFAULT_ALLOW"),
            id="strict with an ingress policy allows the other direction",
        ),
        pytest.param(
            False,
            [{"isolation": ["Ingress", "Egress"]}],
            ("POLICIES_APPLIED", "POLICIES_APPLIED"),
            id="isolated without rules",
        ),
        pytest.param(
            False,
            [{"isolation": []}, {"isolation": ["Egress"]}],
            ("DEFAULT_ALLOW", "POLICIES_APPLIED"),
            id="union of isolation",
        ),
    ],
)
def test_desired_states(strict: bool, pes: list[dict[str, Any]], expect: tuple[str, str]) -> None:
    endpoints = [
        from_api(pe(f"x-{i}", pods=[("a", "10.0.0.1", NODE_IP)], **kw)) for i, kw in enumerate(pes)
    ]
    assert states(endpoints, strict=strict) == expect


def test_union_of_rules_carries_each_policys_id() -> None:
    one = from_api(
        pe(
            "p-1",
            policy="p",
            pods=[],
            isolation=["Ingress"],
            ingress=[{"cidr": "10.0.0.0/8", "ports": [{"port": 80}]}],
        )
    )
    two = from_api(
        pe(
            "q-1",
            policy="q",
            pods=[],
            isolation=["Ingress"],
            ingress=[{"cidr": "10.1.0.0/16", "ports": [{"port": 443}]}],
        )
    )
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
    full_state(
        pods,
        [
            {
                "metadata": {"name": "a", "namespace": "default", "uid": "u1"},
                "spec": {},
                "status": {"podIP": "10.0.0.1"},
            }
        ],
    )
    full_state(
        endpoints,
        [
            pe("here-1", policy="here", pods=[("a", "10.0.0.1", NODE_IP)]),
            pe("elsewhere-1", policy="elsewhere", pods=[("z", "10.9.0.1", "172.31.0.99")]),
            pe("elsewhere-2", policy="elsewhere", pods=[], ingress=[{"cidr": "10.0.0.0/8"}]),
            # a pod not seen yet, on this node
            pe("soon-1", policy="soon", pods=[("b", "10.0.0.2", NODE_IP)]),
        ],
    )
    assert set(cache.endpoints) == {("default", "here-1"), ("default", "soon-1")}
    assert set(cache.stubs) == {("default", "elsewhere-1"), ("default", "elsewhere-2")}
    assert cache.take_dirty() == {("default", "a")}
    pods.apply(
        WatchEvent(
            "ADDED",
            {
                "metadata": {"name": "b", "namespace": "default"},
                "spec": {},
                "status": {"podIP": "10.0.0.2"},
            },
        )
    )
    assert [e.name for e in cache.endpoints_for(("default", "b"))] == ["soon-1"]


def _local(cache: Cache, *pods: tuple[str, str, str]) -> None:
    full_state(
        cache.pods_consumer(),
        [
            {
                "metadata": {"name": n, "namespace": ns, "uid": f"u-{n}"},
                "spec": {},
                "status": {"podIP": ip},
            }
            for ns, n, ip in pods
        ],
    )


def test_a_policy_split_into_pod_and_rule_chunks_is_joined() -> None:
    """The AWS controller's layout: pods in one object, the ingress entries in another."""
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "web", "10.0.0.1"))
    full_state(
        cache.endpoints_consumer(),
        [
            pe(
                "allow-ok-abc12",
                policy="allow-ok",
                isolation=["Ingress"],
                pods=[("web", "10.0.0.1", NODE_IP)],
            ),
            pe(
                "allow-ok-def34",
                policy="allow-ok",
                isolation=["Ingress"],
                pods=[],
                ingress=[{"cidr": "10.0.0.9"}],
            ),
        ],
    )
    got = cache.endpoints_for(("default", "web"))
    assert [e.name for e in got] == ["allow-ok-abc12", "allow-ok-def34"]
    ingress, egress = pod_directions(got, strict=False, policy_id=ids)
    assert ingress.rules is not None
    assert ingress.rules.lookup(ipaddress.ip_address("10.0.0.9")) is not None
    assert lay.STATE_NAMES[egress.state] == "DEFAULT_ALLOW"
    assert cache.incomplete(("default", "web")) == []


def test_rule_chunk_before_pod_chunk_is_fetched_and_the_pod_waits() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "web", "10.0.0.1"))
    endpoints = cache.endpoints_consumer()
    full_state(endpoints, [])
    rules = pe("p-rules", pods=[], isolation=["Ingress"], ingress=[{"cidr": "10.0.0.9"}])
    rules["metadata"]["resourceVersion"] = "7"
    endpoints.apply(WatchEvent("ADDED", rules))
    assert set(cache.stubs) == {("default", "p-rules")}, "no local pod: a stub only"
    assert not cache.fetch_needed.is_set()
    endpoints.apply(
        WatchEvent(
            "ADDED", pe("p-pods", pods=[("web", "10.0.0.1", NODE_IP)], isolation=["Ingress"])
        )
    )
    web = ("default", "web")
    assert cache.incomplete(web) == [("default", "p-rules")]
    assert cache.fetch_needed.is_set()
    assert cache.take_fetch() == {("default", "p-rules")}
    stale = pe("p-rules", pods=[], isolation=["Ingress"], ingress=[{"cidr": "10.0.0.8"}])
    stale["metadata"]["resourceVersion"] = "6"
    cache.fetched(("default", "p-rules"), stale)
    assert cache.incomplete(web), "an answer older than the watch's version is not used"
    assert cache.take_fetch() == {("default", "p-rules")}
    cache.take_dirty()
    cache.fetched(("default", "p-rules"), rules)
    assert cache.incomplete(web) == []
    assert web in cache.take_dirty()
    assert [e.name for e in cache.endpoints_for(web)] == ["p-pods", "p-rules"]


def test_a_policy_that_stops_selecting_local_pods_becomes_stubs() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "web", "10.0.0.1"))
    endpoints = cache.endpoints_consumer()
    full_state(
        endpoints,
        [
            pe("p-pods", pods=[("web", "10.0.0.1", NODE_IP)]),
            pe("p-rules", pods=[], ingress=[{"cidr": "10.0.0.9"}]),
        ],
    )
    assert set(cache.endpoints) == {("default", "p-pods"), ("default", "p-rules")}
    endpoints.apply(WatchEvent("MODIFIED", pe("p-pods", pods=[], generation=2)))
    assert cache.endpoints == {}
    assert set(cache.stubs) == {("default", "p-pods"), ("default", "p-rules")}
    endpoints.apply(WatchEvent("DELETED", pe("p-rules", pods=[])))
    endpoints.apply(WatchEvent("DELETED", pe("p-pods", pods=[])))
    assert (cache.stubs, cache.policies, cache.listing) == ({}, {}, {})


def test_only_the_objects_own_namespace_selects() -> None:
    ignored: list[str] = []
    cache = Cache(node_addresses=lambda: {NODE_IP}, on_ignored=ignored.append)
    _local(cache, ("default", "a", "10.0.0.1"), ("other-ns", "d", "10.0.0.4"))
    evil = pe("evil-1", namespace="evil", pods=[], isolation=["Ingress"])
    evil["spec"]["podSelectorEndpoints"] = [
        {"podIP": "10.0.0.1", "hostIP": NODE_IP, "name": "a", "namespace": "default"}
    ]
    mixed = pe("d-1", pods=[], isolation=["Ingress"])
    mixed["spec"]["podSelectorEndpoints"] = [
        {"podIP": "10.0.0.4", "hostIP": NODE_IP, "name": "d", "namespace": "other-ns"}
    ]
    full_state(cache.endpoints_consumer(), [evil, mixed])
    assert cache.endpoints_for(("default", "a")) == []
    assert cache.endpoints_for(("other-ns", "d")) == []
    assert ignored == ["foreign-namespace", "foreign-namespace"]


def test_an_entry_under_another_address_is_not_a_selection() -> None:
    ignored: list[str] = []
    cache = Cache(node_addresses=lambda: {NODE_IP}, on_ignored=ignored.append)
    _local(cache, ("default", "b", "10.0.0.2"))
    full_state(
        cache.endpoints_consumer(),
        [pe("x-1", pods=[("b", "10.0.0.77", "172.31.0.99")], isolation=["Ingress"])],
    )
    assert cache.endpoints_for(("default", "b")) == []
    assert cache.endpoints_for(("default", "b")) == []
    assert ignored == ["address-mismatch"], "logged and counted once per object version"


def test_hostnetwork_entries_are_skipped() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "h", NODE_IP))
    full_state(
        cache.endpoints_consumer(),
        [pe("h-1", pods=[("h", NODE_IP, NODE_IP)], isolation=["Ingress"])],
    )
    assert cache.endpoints_for(("default", "h")) == []


def test_policyref_in_another_namespace_is_rejected() -> None:
    seen: list[str] = []
    cache = Cache(node_addresses=lambda: {NODE_IP}, on_rejected=lambda ns, n, why: seen.append(why))
    obj = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)])
    obj["spec"]["policyRef"]["namespace"] = "elsewhere"
    full_state(cache.endpoints_consumer(), [obj])
    assert cache.endpoints == {}
    assert seen
    assert seen[0].startswith("spec.policyRef.namespace")


def test_objects_of_one_policy_name_in_two_namespaces_are_not_joined() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "a", "10.0.0.1"), ("other", "c", "10.0.0.3"))
    full_state(
        cache.endpoints_consumer(),
        [
            pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], isolation=["Ingress"]),
            pe(
                "p-2",
                namespace="other",
                pods=[("c", "10.0.0.3", NODE_IP)],
                isolation=["Ingress"],
                ingress=[{"cidr": "10.9.0.0/16"}],
            ),
        ],
    )
    assert [e.name for e in cache.endpoints_for(("default", "a"))] == ["p-1"]


def test_target_groups_of_one_policy_are_joined_apart() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "a", "10.0.0.1"), ("default", "b", "10.0.0.2"))
    one = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], ingress=[{"cidr": "10.1.0.0/16"}])
    two = pe("p-2", pods=[("b", "10.0.0.2", NODE_IP)], ingress=[{"cidr": "10.2.0.0/16"}])
    two["metadata"]["annotations"][GROUP_ANNOTATION] = "1"
    full_state(cache.endpoints_consumer(), [one, two])
    assert [e.name for e in cache.endpoints_for(("default", "a"))] == ["p-1"]
    assert [e.name for e in cache.endpoints_for(("default", "b"))] == ["p-2"]


def test_cache_rejection_keeps_the_last_accepted_version() -> None:
    seen: list[tuple[str, str, str]] = []
    cache = Cache(
        node_addresses=lambda: {NODE_IP}, on_rejected=lambda ns, n, why: seen.append((ns, n, why))
    )
    pods, endpoints = cache.pods_consumer(), cache.endpoints_consumer()
    full_state(
        pods,
        [
            {
                "metadata": {"name": "a", "namespace": "default"},
                "spec": {},
                "status": {"podIP": "10.0.0.1"},
            }
        ],
    )
    good = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], ingress=[{"cidr": "10.0.0.0/8"}])
    full_state(endpoints, [good])
    cache.take_dirty()
    bad = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], ingress=[{"cidr": "nonsense"}], generation=2)
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
    full_state(cache.pods_consumer(), [])
    full_state(cache.endpoints_consumer(), [])
    assert cache.pods_synced
    assert not cache.endpoints_synced, "ClusterPolicyEndpoints not listed yet"
    full_state(cache.endpoints_consumer(cluster=True), [])
    assert cache.endpoints_synced
    assert cache.changed.is_set()


def _with_selector(obj: dict[str, Any], selector: Any) -> dict[str, Any]:
    obj["spec"]["podSelector"] = selector
    return obj


def _labelled(name: str, labels: dict[str, str], ip: str = "") -> dict[str, Any]:
    """A local Pod object with labels (no address yet unless ``ip``)."""
    return {
        "metadata": {"name": name, "namespace": "default", "uid": f"u-{name}", "labels": labels},
        "spec": {},
        "status": {"podIP": ip} if ip else {},
    }


def test_a_new_pod_is_selected_by_labels_until_an_object_lists_it() -> None:
    """A pod the CNI sets up has no address: no object can list it yet. The policies of
    its namespace whose podSelector matches its labels select it, the objects of a
    policy kept only as stubs are fetched, and once an object lists the pod the
    listings alone decide."""
    cache = Cache(node_addresses=lambda: {NODE_IP})
    pods = cache.pods_consumer()
    full_state(pods, [])
    endpoints = cache.endpoints_consumer()
    web = _with_selector(
        pe(
            "web-a",
            pods=[("web-1", "10.0.0.1", "172.31.0.9")],
            isolation=["Ingress"],
            ingress=[{"cidr": "10.0.0.9"}],
            policy="web",
        ),
        {"matchLabels": {"app": "web"}},
    )
    web["metadata"]["resourceVersion"] = "3"
    other = _with_selector(
        pe("db-a", pods=[("db-1", "10.0.0.2", "172.31.0.9")], policy="db"),
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]},
    )
    full_state(endpoints, [web, other])
    assert set(cache.stubs) == {("default", "web-a"), ("default", "db-a")}
    new = ("default", "web-2")
    pods.apply(
        WatchEvent(
            "ADDED",
            _labelled("web-2", {"app": "web"}),
        )
    )
    assert cache.selecting(new) == [("default", "web", "")]
    assert cache.incomplete(new) == [("default", "web-a")], "the stub is fetched first"
    assert cache.take_fetch() == {("default", "web-a")}
    cache.fetched(("default", "web-a"), web)
    assert cache.incomplete(new) == []
    assert [e.name for e in cache.endpoints_for(new)] == ["web-a"]
    # the controller lists it under another policy: listings decide from now on
    endpoints.apply(
        WatchEvent("ADDED", pe("any-a", pods=[("web-2", "10.0.0.3", NODE_IP)], policy="any"))
    )
    pods.apply(
        WatchEvent(
            "MODIFIED",
            _labelled("web-2", {"app": "web"}, ip="10.0.0.3"),
        )
    )
    assert cache.selecting(new) == [("default", "any", "")]
    # listed: its labels select nothing any more
    assert cache.by_labels(("default", "web-2")) == []


def test_a_cluster_listing_does_not_end_selection_by_networkpolicy_labels() -> None:
    """A ClusterPolicyEndpoint listing a new pod (its subject is every pod, say) joins
    its rules; the pod's NetworkPolicies still select it by labels until one of their
    own objects lists it."""
    cache = Cache(node_addresses=lambda: {NODE_IP})
    pods = cache.pods_consumer()
    full_state(pods, [_labelled("web-2", {"app": "web"}, ip="10.0.0.3")])
    web = _with_selector(
        pe("web-a", pods=[("web-1", "10.0.0.1", NODE_IP)], isolation=["Ingress"], policy="web"),
        {"matchLabels": {"app": "web"}},
    )
    full_state(cache.endpoints_consumer(), [web])
    guard = {
        "kind": "ClusterPolicyEndpoint",
        "metadata": {"name": "guard-abcde", "generation": 1},
        "spec": {
            "policyRef": {"name": "guard"},
            "tier": "Admin",
            "priority": 5,
            "subject": {"namespaces": {}},
            "podSelectorEndpoints": [
                {"podIP": "10.0.0.3", "hostIP": NODE_IP, "name": "web-2", "namespace": "default"}
            ],
            "ingress": [{"cidr": "10.9.0.0/16", "action": "Deny"}],
        },
    }
    full_state(cache.endpoints_consumer(cluster=True), [guard])
    new = ("default", "web-2")
    assert cache.selecting(new) == [("", "guard", ""), ("default", "web", "")]
    kinds = sorted((e.name, e.cluster is not None) for e in cache.endpoints_for(new))
    assert kinds == [("guard-abcde", True), ("web-a", False)]


@pytest.mark.parametrize(
    "selector",
    [None, {"matchExpressions": [{"key": "app", "operator": "Near"}]}, {"matchLabels": "x"}],
)
def test_absent_or_invalid_selectors_select_no_unlisted_pod(selector: Any) -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "lonely", ""))
    obj = pe("p-a", pods=[("other", "10.0.0.7", NODE_IP)], isolation=["Ingress"])
    if selector is not None:
        obj["spec"]["podSelector"] = selector
    try:
        full_state(cache.endpoints_consumer(), [obj])
    except PolicyEndpointError:
        return
    assert cache.selecting(("default", "lonely")) == []


def test_selector_index_ends_with_the_policys_last_object() -> None:
    cache = Cache(node_addresses=lambda: {NODE_IP})
    _local(cache, ("default", "web", "10.0.0.1"))
    endpoints = cache.endpoints_consumer()
    obj = _with_selector(pe("p-a", pods=[("web", "10.0.0.1", NODE_IP)]), {})
    full_state(endpoints, [obj])
    assert cache.selectors
    assert cache.by_namespace
    endpoints.apply(WatchEvent("DELETED", obj))
    assert (cache.selectors, cache.by_namespace) == ({}, {})


def _digest(*objs: dict[str, Any], strict: bool = False, policy_ids: Any = ids) -> bytes:
    from agent.programming import inputs_digest

    return inputs_digest([from_api(o) for o in objs], strict=strict, policy_id=policy_ids)


def test_the_inputs_digest_changes_with_what_a_record_is_built_from() -> None:
    """A restarted agent keeps a record whose inputs hash the same (np_pod_inputs): so
    the digest must differ whenever the compiled record could."""
    pod = [("a", "10.0.0.1", NODE_IP)]
    rule = [{"cidr": "10.1.0.0/16"}]
    base = pe("p-1", pods=pod, ingress=rule)
    same = _digest(base)
    assert len(same) == lay.NP_INPUTS_DIGEST_LEN
    assert _digest(pe("p-1", pods=pod, ingress=rule)) == same, "deterministic"
    other_uid = pe("p-1", pods=pod, ingress=rule)
    other_uid["metadata"]["uid"] = "another"
    changed = [
        _digest(pe("p-1", pods=pod, ingress=rule, generation=2)),  # a new spec
        _digest(other_uid),  # deleted and created again
        _digest(base, strict=True),  # the pod's mode
        _digest(base, policy_ids=lambda ref: 77),  # its policy's id
        _digest(base, pe("p-2", pods=pod, ingress=rule)),  # one more object selects it
        _digest(),  # none any more
    ]
    assert same not in changed
    assert len(set(changed)) == len(changed)
    # the order objects arrive in does not matter
    two = pe("p-2", pods=pod, ingress=rule)
    assert _digest(base, two) == _digest(two, base)


def test_no_inputs_digest_is_kept_for_domain_name_rules() -> None:
    """What a pod with domain-name rules learns needs its compiled inputs: compiled on
    every restart."""
    obj = pe("p-1", pods=[("a", "10.0.0.1", NODE_IP)], egress=[{"domainName": "example.com"}])
    assert _digest(obj) == b""


@pytest.mark.parametrize("seed", range(4))
def test_the_unlisted_pods_of_each_namespace_follow_pods_and_listings_through_churn(
    seed: int,
) -> None:
    """The index of pods no PolicyEndpoint lists (what label selection considers) agrees,
    after every change, with what scanning every pod and its listings finds."""
    rng = random.Random(seed)
    cache = Cache(node_addresses=lambda: {NODE_IP})
    pods, endpoints = cache.pods_consumer(), cache.endpoints_consumer()
    names = [(ns, f"pod{i}") for ns in ("a", "b") for i in range(6)]

    def pod(ns: str, name: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": ns, "uid": f"u-{ns}-{name}"},
            "spec": {},
            "status": {"podIP": f"10.0.{ord(ns)}.{int(name[3:]) + 1}"},
        }

    def scanned() -> dict[str, set[tuple[str, str]]]:
        out: dict[str, set[tuple[str, str]]] = {}
        for ref in cache.pods:
            if not any(k[0] for k in cache.listing.get(ref, ())):
                out.setdefault(ref[0], set()).add(ref)
        return out

    for _ in range(300):
        ns, name = rng.choice(names)
        step = rng.randrange(4)
        if step == 0:
            pods.apply(WatchEvent("ADDED", pod(ns, name)))
        elif step == 1:
            pods.apply(WatchEvent("DELETED", pod(ns, name)))
        else:
            listed = rng.sample([n for n_ns, n in names if n_ns == ns], rng.randrange(3))
            ip = {n: pod(ns, n)["status"]["podIP"] for n in listed}
            obj = pe(
                f"pe{rng.randrange(4)}",
                namespace=ns,
                policy=f"p{rng.randrange(2)}",
                pods=[(n, ip[n], NODE_IP) for n in listed],
                isolation=["Ingress"],
            )
            endpoints.apply(WatchEvent("DELETED" if step == 3 and not listed else "MODIFIED", obj))
        assert cache.unlisted == scanned()
    assert any(cache.listing.values())  # the churn did list pods
