"""bpf.tiers: Admin, NetworkPolicy, Baseline and the default folded into one trie.

The oracle below reads the verdict rules of docs/cluster-network-policy.md directly
(address containment by ipaddress, rules compared one by one) and shares nothing with
the folding but the data types; the folded trie, walked as the datapath walks it
(longest prefix, then the port set), must agree on every query.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpf import layout as lay
from bpf.codec import inline_portset, inline_value, portset_from_map, portset_to_map
from bpf.errors import RuleLimitError
from bpf.ruleset import CompiledRules, Decision, PeerRule, PortRange, Prefix, compile_rules
from bpf.tiers import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    ClusterRule,
    compile_tiers,
)
from tests.rulesref import reference_allows

TCP, UDP = lay.NP_PROTO_TCP, lay.NP_PROTO_UDP
ADMIN, BASELINE = lay.NP_TIER_ADMIN, lay.NP_TIER_BASELINE
ALLOW, DENY = lay.NP_VERDICT_ALLOW, lay.NP_VERDICT_DENY
V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
DEFAULT_ALLOW = Decision(ALLOW, lay.NP_TIER_DEFAULT, lay.NP_REASON_DEFAULT_ALLOW)
DEFAULT_DENY = Decision(DENY, lay.NP_TIER_DEFAULT, lay.NP_REASON_DEFAULT_DENY)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def net(text: str) -> Prefix:
    return Prefix.of(ipaddress.ip_network(text))


def oracle(
    rules: list[ClusterRule],
    np_rules: list[PeerRule] | None,
    default: Decision,
    addr: Address,
    protocol: int,
    port: int,
) -> tuple[int, int]:
    """(verdict, tier) by the doc's steps, rule by rule."""

    def holds(r: ClusterRule) -> bool:
        n = r.cidr.network()
        return n.version == addr.version and addr in n

    def admits(r: ClusterRule) -> bool:
        return not r.ports or any(
            p.protocol == protocol and p.start <= port <= p.end for p in r.ports
        )

    def tier(t: int) -> tuple[int, int] | None:
        matching = [r for r in rules if r.tier == t and holds(r) and admits(r)]
        if not matching:
            return None
        best = min(matching, key=lambda r: (r.priority, r.action))
        if best.action == ACTION_PASS:
            return None
        return (ALLOW if best.action == ACTION_ACCEPT else DENY, t)

    admin = tier(ADMIN)
    if admin:
        return admin
    if np_rules is not None:
        allowed = reference_allows(np_rules, addr, protocol, port)
        return (ALLOW if allowed else DENY, lay.NP_TIER_NETWORK_POLICY)
    baseline = tier(BASELINE)
    if baseline:
        return baseline
    return (default.verdict, default.tier)


def walk(c: CompiledRules, addr: Address, protocol: int, port: int | None) -> Decision:
    prefix = c.lookup(addr)
    if prefix is None:
        return Decision(DENY, lay.NP_TIER_NETWORK_POLICY, lay.NP_REASON_NO_PEER_MATCH)
    # through the map bytes, as the datapath reads them: the decision inline in the trie
    # value where one decision covers everything, else the port set
    ps = c.entries[prefix]
    value = inline_value(ps)
    if value is not None:
        return inline_portset(value).decide(protocol, port)
    return portset_from_map(portset_to_map(ps)).decide(protocol, port)


def test_admin_deny_beats_accept_at_equal_priority_and_lower_number_wins() -> None:
    rules = [
        ClusterRule(net("10.0.0.0/8"), (), ADMIN, 10, ACTION_ACCEPT, 1),
        ClusterRule(net("10.1.0.0/16"), (PortRange(TCP, 80, 80),), ADMIN, 10, ACTION_DENY, 2),
        ClusterRule(net("10.1.2.0/24"), (PortRange(TCP, 80, 80),), ADMIN, 5, ACTION_ACCEPT, 3),
    ]
    c = compile_tiers(rules, networkpolicy=None, default=DEFAULT_DENY)
    a = ipaddress.ip_address
    assert walk(c, a("10.1.9.9"), TCP, 80) == Decision(DENY, ADMIN, lay.NP_REASON_RULE, 2)
    assert walk(c, a("10.1.9.9"), TCP, 81) == Decision(ALLOW, ADMIN, lay.NP_REASON_RULE, 1)
    assert walk(c, a("10.1.2.3"), TCP, 80) == Decision(ALLOW, ADMIN, lay.NP_REASON_RULE, 3)
    assert walk(c, a("11.0.0.1"), TCP, 80) == DEFAULT_DENY
    assert walk(c, a("fd00::1"), UDP, 53) == DEFAULT_DENY, "::/0 stored: no miss"


def test_networkpolicy_decides_before_baseline_only_where_it_isolates() -> None:
    rules = [ClusterRule(net("0.0.0.0/0"), (), BASELINE, 1, ACTION_DENY, 9)]
    np = compile_rules([PeerRule(ipaddress.ip_network("10.0.0.7/32"), (), (), 4)])
    isolated = compile_tiers(rules, networkpolicy=np, default=DEFAULT_ALLOW)
    a = ipaddress.ip_address
    assert walk(isolated, a("10.0.0.7"), TCP, 1).tier == lay.NP_TIER_NETWORK_POLICY
    assert walk(isolated, a("10.0.0.8"), TCP, 1) == Decision(
        DENY, lay.NP_TIER_NETWORK_POLICY, lay.NP_REASON_NO_PEER_MATCH
    )
    open_ = compile_tiers(rules, networkpolicy=None, default=DEFAULT_ALLOW)
    assert walk(open_, a("10.0.0.7"), TCP, 1) == Decision(DENY, BASELINE, lay.NP_REASON_RULE, 9)


def test_admin_pass_on_a_port_lets_a_later_tier_decide_it() -> None:
    rules = [
        ClusterRule(net("0.0.0.0/0"), (PortRange(TCP, 80, 80),), ADMIN, 1, ACTION_PASS, 1),
        ClusterRule(net("0.0.0.0/0"), (), ADMIN, 2, ACTION_ACCEPT, 2),
    ]
    c = compile_tiers(rules, networkpolicy=None, default=DEFAULT_DENY)
    a = ipaddress.ip_address("192.0.2.1")
    assert walk(c, a, TCP, 80) == DEFAULT_DENY, "the reason survives a port rule"
    assert walk(c, a, TCP, 81).verdict == ALLOW
    assert walk(c, a, 1, 0).verdict == ALLOW, "ICMP: only all-traffic rules match"
    # a later fragment (port unknown) of a protocol whose ports differ: denied
    assert walk(c, a, TCP, None).verdict == DENY
    assert walk(c, a, UDP, None).verdict == ALLOW


def test_more_ranges_than_a_port_set_holds_raise() -> None:
    ports = tuple(PortRange(TCP, p, p) for p in range(1, 1000, 2))
    with pytest.raises(RuleLimitError, match="after folding the tiers"):
        compile_tiers(
            [ClusterRule(net("10.0.0.0/8"), ports, ADMIN, 1, ACTION_DENY, 1)],
            networkpolicy=None,
            default=DEFAULT_ALLOW,
        )


@st.composite
def v4_prefixes(draw: st.DrawFn) -> Prefix:
    length = draw(st.sampled_from([0, 8, 24, 28, 32]))
    offset = draw(st.integers(0, 255))
    return Prefix.of(ipaddress.IPv4Network((V4_BASE + offset, length), strict=False))


port_ranges = st.one_of(
    st.builds(PortRange, st.sampled_from([TCP, UDP]), st.just(0), st.just(65535)),
    st.sampled_from([80, 81, 443]).flatmap(
        lambda p: st.builds(PortRange, st.sampled_from([TCP, UDP]), st.just(p), st.just(p))
    ),
    st.builds(PortRange, st.just(TCP), st.just(79), st.sampled_from([81, 500])),
)
cluster_rules = st.builds(
    ClusterRule,
    v4_prefixes(),
    st.lists(port_ranges, max_size=2).map(tuple),
    st.sampled_from([ADMIN, BASELINE]),
    st.sampled_from([1, 2, 3]),
    st.sampled_from([ACTION_DENY, ACTION_ACCEPT, ACTION_PASS]),
    st.integers(1, 6),
)
np_rules = st.builds(
    PeerRule,
    v4_prefixes().map(lambda p: p.network()),
    st.just(()),
    st.lists(port_ranges, max_size=2).map(tuple),
    st.integers(7, 9),
)


@settings(max_examples=400, deadline=None)
@given(
    rules=st.lists(cluster_rules, max_size=7),
    networkpolicy=st.one_of(st.none(), st.lists(np_rules, max_size=3)),
    default=st.sampled_from([DEFAULT_ALLOW, DEFAULT_DENY]),
    queries=st.lists(
        st.tuples(
            st.integers(0, 255),
            st.sampled_from([TCP, UDP, 1]),
            st.sampled_from([79, 80, 81, 443, 500, 501, 9999]),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_folded_trie_matches_the_doc(
    rules: list[ClusterRule],
    networkpolicy: list[PeerRule] | None,
    default: Decision,
    queries: list[tuple[int, int, int]],
) -> None:
    np = compile_rules(networkpolicy) if networkpolicy is not None else None
    c = compile_tiers(rules, networkpolicy=np, default=default)
    for offset, protocol, port in queries:
        addr = ipaddress.IPv4Address(V4_BASE + offset)
        want = oracle(rules, networkpolicy, default, addr, protocol, port)
        got = walk(c, addr, protocol, port)
        assert (got.verdict, got.tier) == want, (str(addr), protocol, port)
    outside = ipaddress.IPv4Address("192.0.2.1")
    got = walk(c, outside, TCP, 80)
    assert (got.verdict, got.tier) == oracle(rules, networkpolicy, default, outside, TCP, 80)
