"""bpf.ruleset: flattening peer rules into LPM entries with exact NetworkPolicy semantics."""

from __future__ import annotations

import ipaddress
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpf.errors import RuleLimitError
from bpf.layout import NP_MAX_PORT_RULES, NP_PROTO_ANY, NP_PROTO_SCTP, NP_PROTO_TCP, NP_PROTO_UDP
from bpf.ruleset import (
    CompiledRules,
    PeerRule,
    PortRange,
    PortRule,
    Portset,
    Prefix,
    compile_grouped,
    compile_rules,
    normalise_ports,
)
from tests.rulesref import reference_allows

net = ipaddress.ip_network
ip = ipaddress.ip_address
TCP, UDP, SCTP = NP_PROTO_TCP, NP_PROTO_UDP, NP_PROTO_SCTP


def compiled_allows(c: CompiledRules, addr: str, protocol: int, port: int | None) -> bool:
    prefix = c.lookup(ip(addr))
    return prefix is not None and c.entries[prefix].allows(protocol, port) is not None


CASES = [
    pytest.param(
        [PeerRule(net("10.0.0.0/8"))],
        [("10.1.2.3", TCP, 80, True), ("11.0.0.1", TCP, 80, False), ("10.9.9.9", 1, 0, True)],
        id="cidr without ports allows every protocol and port",
    ),
    pytest.param(
        [PeerRule(net("10.0.0.0/8"), excepts=(net("10.1.0.0/16"),))],
        [
            ("10.2.0.1", TCP, 80, True),
            ("10.1.0.1", TCP, 80, False),
            ("10.1.255.255", UDP, 53, False),
        ],
        id="except carves a hole",
    ),
    pytest.param(
        [
            PeerRule(net("10.0.0.0/8"), ports=(PortRange(TCP, 80, 80),)),
            PeerRule(net("10.1.2.0/24"), ports=(PortRange(TCP, 443, 443),)),
        ],
        [
            ("10.1.2.3", TCP, 443, True),
            ("10.1.2.3", TCP, 80, True),
            ("10.3.0.1", TCP, 443, False),
            ("10.3.0.1", TCP, 80, True),
        ],
        id="longest match keeps the ports of broader cidrs",
    ),
    pytest.param(
        [
            PeerRule(
                net("10.0.0.0/8"), excepts=(net("10.1.0.0/16"),), ports=(PortRange(TCP, 80, 80),)
            ),
            PeerRule(net("10.1.2.0/24"), ports=(PortRange(TCP, 443, 443),)),
        ],
        [
            ("10.1.2.3", TCP, 443, True),
            ("10.1.2.3", TCP, 80, False),
            ("10.1.3.1", TCP, 80, False),
            ("10.2.0.1", TCP, 80, True),
        ],
        id="a broader cidr's ports do not reach into its except",
    ),
    pytest.param(
        [
            PeerRule(net("10.0.0.0/8"), excepts=(net("10.1.0.0/16"),)),
            PeerRule(net("10.0.0.0/8"), ports=(PortRange(UDP, 53, 53),)),
        ],
        [("10.1.0.1", UDP, 53, True), ("10.1.0.1", TCP, 53, False), ("10.5.0.1", TCP, 1, True)],
        id="an except of one rule does not cancel another rule on the same cidr",
    ),
    pytest.param(
        [PeerRule(net("10.0.0.0/8"), ports=(PortRange(TCP, 8000, 8010),))],
        [
            ("10.0.0.1", TCP, 8000, True),
            ("10.0.0.1", TCP, 8010, True),
            ("10.0.0.1", TCP, 8011, False),
            ("10.0.0.1", UDP, 8005, False),
        ],
        id="endPort range is inclusive and protocol specific",
    ),
    pytest.param(
        [PeerRule(net("10.0.0.0/8"), ports=(PortRange(UDP),))],
        [
            ("10.0.0.1", UDP, 1, True),
            ("10.0.0.1", UDP, None, True),
            ("10.0.0.1", TCP, 1, False),
            ("10.0.0.1", TCP, None, False),
        ],
        id="any port of one protocol, also for fragments with unknown ports",
    ),
    pytest.param(
        [
            PeerRule(net("10.0.0.0/8"), ports=(PortRange(TCP, 0, 1000),)),
            PeerRule(net("10.0.0.0/16"), ports=(PortRange(TCP, 1001, 65535),)),
        ],
        [("10.0.0.1", TCP, None, True), ("10.1.0.1", TCP, None, False)],
        id="full coverage assembled from two cidrs allows unknown ports",
    ),
    pytest.param(
        [PeerRule(net("fd00::/64")), PeerRule(net("10.0.0.0/8"), ports=(PortRange(TCP, 80, 80),))],
        [
            ("fd00::1", TCP, 443, True),
            ("fd01::1", TCP, 443, False),
            ("10.0.0.1", TCP, 80, True),
            ("10.0.0.1", TCP, 81, False),
        ],
        id="both families in one trie",
    ),
    pytest.param(
        [PeerRule(net("::/0"))],
        [("10.0.0.1", TCP, 80, False), ("2001:db8::1", TCP, 80, True)],
        id="::/0 does not match IPv4",
    ),
    pytest.param(
        [PeerRule(net("0.0.0.0/0")), PeerRule(net("::/0"))],
        [("10.0.0.1", TCP, 80, True), ("2001:db8::1", UDP, 5, True)],
        id="allow all of both families",
    ),
    pytest.param(
        [PeerRule(net("10.0.0.5/32"), ports=(PortRange(SCTP, 9, 9),))],
        [("10.0.0.5", SCTP, 9, True), ("10.0.0.5", TCP, 9, False)],
        id="sctp",
    ),
    pytest.param(
        [],
        [("10.0.0.1", TCP, 80, False)],
        id="no rules deny everything",
    ),
]


@pytest.mark.parametrize(("rules", "queries"), CASES)
def test_semantics(rules: list[PeerRule], queries: list[tuple[str, int, int | None, bool]]) -> None:
    compiled = compile_rules(rules)
    for addr, protocol, port, expect in queries:
        assert reference_allows(rules, ip(addr), protocol, port) is expect, (addr, port)
        assert compiled_allows(compiled, addr, protocol, port) is expect, (addr, protocol, port)


def test_redundant_entries_are_dropped() -> None:
    compiled = compile_rules(
        [
            PeerRule(net("10.0.0.0/8"), ports=(PortRange(TCP, 80, 80),)),
            PeerRule(net("10.1.0.0/16"), ports=(PortRange(TCP, 80, 80),)),
        ]
    )
    assert [str(p) for p in compiled.entries] == ["10.0.0.0/8"]


def test_except_without_an_allowing_ancestor_is_not_stored() -> None:
    compiled = compile_rules([PeerRule(net("10.0.0.0/8"), excepts=(net("10.1.0.0/16"),))])
    assert {str(p): ps.allows_nothing for p, ps in compiled.entries.items()} == {
        "10.0.0.0/8": False,
        "10.1.0.0/16": True,
    }


def test_except_outside_its_cidr_is_ignored() -> None:
    compiled = compile_rules([PeerRule(net("10.0.0.0/8"), excepts=(net("11.0.0.0/8"),))])
    assert [str(p) for p in compiled.entries] == ["10.0.0.0/8"]


def test_cidrs_of_several_lengths_inherit_only_where_one_contains_another() -> None:
    """Disjoint CIDRs of mixed lengths each keep their own ports (the one-pass path);
    one inside another (found among the shorter lengths present, either family) gets
    both."""
    p80, p443 = (PortRange(TCP, 80, 80),), (PortRange(TCP, 443, 443),)
    disjoint = [
        PeerRule(net("10.0.0.0/28"), ports=p80),
        PeerRule(net("10.0.1.0/24"), ports=p443),
        PeerRule(net("10.0.2.7/32"), ports=p80),
        PeerRule(net("fd00::/64"), ports=p443),
        PeerRule(net("fd00:1::1/128"), ports=p80),
    ]
    compiled = compile_rules(disjoint)
    assert {str(p): ps.allows(TCP, 80) is not None for p, ps in compiled.entries.items()} == {
        "10.0.0.0/28": True,
        "10.0.1.0/24": False,
        "10.0.2.7/32": True,
        "fd00::/64": False,
        "fd00:1::1/128": True,
    }
    for nested in (
        PeerRule(net("10.0.1.9/32"), ports=p80),
        PeerRule(net("fd00::9/128"), ports=p80),
    ):
        inner = str(nested.cidr.network_address)  # type: ignore[union-attr]
        compiled = compile_rules([*disjoint, nested])
        assert compiled_allows(compiled, inner, TCP, 80), inner
        assert compiled_allows(compiled, inner, TCP, 443), f"{inner} inherits its /24 or /64"
        outer = "10.0.1.10" if "." in inner else "fd00::10"
        assert compiled_allows(compiled, outer, TCP, 443)
        assert not compiled_allows(compiled, outer, TCP, 80)


def test_bare_host_rules() -> None:
    compiled = compile_rules([PeerRule(net("10.0.0.7/32")), PeerRule(net("fd00::7/128"))])
    assert compiled_allows(compiled, "10.0.0.7", TCP, 1)
    assert not compiled_allows(compiled, "10.0.0.8", TCP, 1)
    assert compiled_allows(compiled, "fd00::7", UDP, 1)


def test_attribution_lowest_policy_id_wins_overlaps() -> None:
    ps = normalise_ports([(7, (PortRange(TCP, 100, 200),)), (3, (PortRange(TCP, 150, 300),))])
    assert ps.rules == (PortRule(TCP, 100, 149, 7), PortRule(TCP, 150, 300, 3))
    assert ps.allows(TCP, 120) == 7
    assert ps.allows(TCP, 180) == 3


def test_adjacent_ranges_of_one_policy_merge() -> None:
    ps = normalise_ports(
        [(1, (PortRange(UDP, 10, 19), PortRange(UDP, 20, 29), PortRange(UDP, 25, 40)))]
    )
    assert ps.rules == (PortRule(UDP, 10, 40, 1),)


def test_full_coverage_becomes_one_rule() -> None:
    ps = normalise_ports([(1, (PortRange(TCP, 0, 99),)), (2, (PortRange(TCP, 100, 65535),))])
    assert ps.rules == (PortRule(TCP, 0, 65535, 1),)
    assert ps.allows(TCP, None) == 1


def test_any_protocol_wins() -> None:
    ps = normalise_ports([(2, (PortRange(TCP, 80, 80),)), (5, ())])
    assert ps == Portset(any_policy=5)
    assert ps.allows(47, 0) == 5


def test_many_ports_per_cidr_are_all_kept() -> None:
    ports = tuple(PortRange(TCP, p, p) for p in range(1000, 1000 + 4 * NP_MAX_PORT_RULES, 2))
    with pytest.raises(RuleLimitError, match=r"10.0.0.0/8: 512 distinct port ranges"):
        compile_rules([PeerRule(net("10.0.0.0/8"), ports=ports)])
    kept = ports[:NP_MAX_PORT_RULES]
    compiled = compile_rules([PeerRule(net("10.0.0.0/8"), ports=kept)])
    (ps,) = compiled.entries.values()
    assert len(ps.rules) == NP_MAX_PORT_RULES
    assert all(compiled_allows(compiled, "10.0.0.1", TCP, p.start) for p in kept)
    assert not compiled_allows(compiled, "10.0.0.1", TCP, 1001)


def test_merging_keeps_contiguous_port_lists_within_limits() -> None:
    ports = tuple(PortRange(TCP, p, p) for p in range(2000, 2600))
    compiled = compile_rules([PeerRule(net("10.0.0.0/8"), ports=ports)])
    (ps,) = compiled.entries.values()
    assert ps.rules == (PortRule(TCP, 2000, 2599, 0),)


def test_port_range_validation() -> None:
    with pytest.raises(ValueError, match="invalid port range"):
        PortRange(TCP, 90, 80)
    with pytest.raises(ValueError, match="unsupported protocol"):
        PortRange(47)
    with pytest.raises(ValueError, match="every port"):
        PortRange(NP_PROTO_ANY, 80, 80)


# ---- property: compiled tries agree with the reference semantics ---------------------
V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))


@st.composite
def v4_networks(draw: st.DrawFn) -> ipaddress.IPv4Network:
    length = draw(st.integers(min_value=24, max_value=32))
    offset = draw(st.integers(min_value=0, max_value=255))
    return ipaddress.IPv4Network((V4_BASE + offset, length), strict=False)


port_ranges = st.one_of(
    st.builds(PortRange, st.sampled_from([TCP, UDP]), st.just(0), st.just(65535)),
    st.sampled_from([80, 81, 443, 8080]).flatmap(
        lambda p: st.builds(PortRange, st.sampled_from([TCP, UDP]), st.just(p), st.just(p))
    ),
    st.builds(PortRange, st.sampled_from([TCP, UDP]), st.just(8000), st.sampled_from([8005, 8010])),
)


@st.composite
def peer_rules(draw: st.DrawFn) -> PeerRule:
    cidr = draw(v4_networks())
    excepts = tuple(
        e for e in draw(st.lists(v4_networks(), max_size=2)) if e.subnet_of(cidr) and e != cidr
    )
    ports = tuple(draw(st.lists(port_ranges, max_size=3)))
    return PeerRule(cidr, excepts, ports, policy_id=draw(st.integers(1, 4)))


@settings(max_examples=300, deadline=None)
@given(
    rules=st.lists(peer_rules(), max_size=6),
    queries=st.lists(
        st.tuples(
            st.integers(0, 255),
            st.sampled_from([TCP, UDP, 1]),
            st.sampled_from([80, 81, 443, 8000, 8007, 8080, 9999, None]),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_compiled_matches_reference(
    rules: list[PeerRule], queries: list[tuple[int, int, int | None]]
) -> None:
    compiled = compile_rules(rules)
    for offset, protocol, port in queries:
        addr = str(ipaddress.IPv4Address(V4_BASE + offset))
        expect = reference_allows(rules, ip(addr), protocol, port)
        assert compiled_allows(compiled, addr, protocol, port) is expect, (addr, protocol, port)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 12), st.integers(1, 5)),
        min_size=1,
        max_size=25,
    )
)
def test_port_labels_match_a_port_by_port_reading(spans: list[tuple[int, int, int]]) -> None:
    """Each port is labelled with the lowest policy id of the ranges covering it."""
    from bpf.ruleset import _label_ranges

    ranges = [(s, s + w, p) for s, w, p in spans]
    got = _label_ranges(list(ranges))
    by_port = {}
    for port in range(60):
        owners = [p for s, e, p in ranges if s <= port <= e]
        if owners:
            by_port[port] = min(owners)
    flat = {port: pol for s, e, pol in got for port in range(s, e + 1)}
    assert flat == by_port
    assert all(a[1] < b[0] for a, b in itertools.pairwise(got)), "disjoint, sorted"
    assert all(not (a[2] == b[2] and a[1] + 1 == b[0]) for a, b in itertools.pairwise(got)), (
        "adjacent ranges merged"
    )


def test_ten_thousand_ports_on_one_cidr_raise_or_truncate_to_what_fits() -> None:
    rules = [
        PeerRule(
            ipaddress.ip_network("10.0.0.0/8"),
            ports=tuple(PortRange(NP_PROTO_TCP, p, p) for p in range(1, 20001, 2)),
        )
    ]
    with pytest.raises(RuleLimitError, match="10000 distinct port ranges"):
        compile_rules(rules)
    cut = compile_rules(rules, truncate=True)
    (prefix,) = cut.entries
    assert cut.truncated == [prefix]
    ps = cut.entries[prefix]
    assert len(ps.rules) == NP_MAX_PORT_RULES
    assert ps.allows(NP_PROTO_TCP, 1) is not None
    assert ps.allows(NP_PROTO_TCP, 19999) is None, "what does not fit is not allowed"
    assert ps.allows(NP_PROTO_TCP, 2) is None
    assert compile_rules(rules[:1][0:0], truncate=True).truncated == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 4),
            st.lists(port_ranges, max_size=3).map(tuple),
            st.lists(v4_networks(), max_size=5),
        ),
        max_size=4,
    ),
    st.booleans(),
)
def test_rules_given_grouped_compile_as_the_rules_they_stand_for(
    groups: list[tuple[int, tuple[PortRange, ...], list[ipaddress.IPv4Network]]],
    truncate: bool,
) -> None:
    """compile_grouped takes (policy id, ports, prefixes) where compile_rules takes one
    rule per prefix: the same entries (nested prefixes too, through the general path),
    the same truncation, the same error."""
    grouped = [(pid, ports, [Prefix.of(n) for n in nets]) for pid, ports, nets in groups]
    rules = [PeerRule(p, (), ports, pid) for pid, ports, ps in grouped for p in ps]
    try:
        expect = compile_rules(rules, truncate=truncate)
    except RuleLimitError as exc:
        with pytest.raises(RuleLimitError, match=re.escape(str(exc))):
            compile_grouped(grouped, truncate=truncate)
        return
    got = compile_grouped(grouped, truncate=truncate)
    assert got.entries == expect.entries
    assert got.truncated == expect.truncated
    assert got.digest() == expect.digest()


def test_grouped_rules_over_the_port_limit_are_cut_and_named() -> None:
    many = tuple(PortRange(TCP, p, p) for p in range(1000, 1000 + 4 * NP_MAX_PORT_RULES, 2))
    grouped = [(1, many, [Prefix.of(net("10.0.0.0/8"))])]
    with pytest.raises(RuleLimitError):
        compile_grouped(grouped)
    cut = compile_grouped(grouped, truncate=True)
    assert cut.truncated == [Prefix.of(net("10.0.0.0/8"))]
