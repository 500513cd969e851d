"""agent.rulepack.parse_packed against the exact path it stands in for: common.policyendpoint's
parse_rule for each entry, then pack. Same rules, in the same groups and order, or the
same error."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import rulepack
from agent.rulepack import PackedRules, pack, parse_packed
from bpf.layout import NP_PROTO_TCP, NP_PROTO_UDP
from bpf.ruleset import PortRange, Prefix
from common.policyendpoint import Rule, parse_rule

WHERE = "spec.ingress"


def parse_rules(entries: Any, where: str) -> list[Rule]:
    """The exact path: every entry validated into a Rule, in order (FQDN entries none)."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: must be a list")
    parsed = (parse_rule(entry, f"{where}.{i}") for i, entry in enumerate(entries))
    return [rule for rule in parsed if rule is not None]


def exact(entries: Any) -> PackedRules | str:
    try:
        return pack(parse_rules(entries, WHERE))
    except ValueError as exc:
        return f"ValueError: {exc}"


def fast(entries: Any) -> PackedRules | str:
    try:
        return parse_packed(entries, WHERE)
    except ValueError as exc:
        return f"ValueError: {exc}"


@st.composite
def cidr_texts(draw: st.DrawFn) -> Any:
    v6 = draw(st.booleans())
    bits = 128 if v6 else 32
    value = draw(st.integers(0, (1 << bits) - 1))
    if v6:
        addr = ":".join(f"{value >> s & 0xFFFF:x}" for s in range(112, -1, -16))
    else:
        addr = ".".join(str(value >> s & 0xFF) for s in (24, 16, 8, 0))
    length = draw(
        st.one_of(
            st.just(""),
            st.integers(0, bits + 2).map(lambda n: f"/{n}"),
            st.sampled_from(["/", "/x", "/-1", "/ 8", "/٣", "/08"]),
        )
    )
    text = addr + length
    return draw(
        st.one_of(
            st.just(text),
            st.just(f" {text}"),
            st.just(f"{text}\n"),
            st.sampled_from(
                ["", " ", "10.0.0", "1.2.3.4.5/8", "fe80::1%eth0", "::ffff:1.2.3.4/120"]
            ),
            st.sampled_from([None, 10, ["10.0.0.0/8"]]),
        )
    )


port_values = st.one_of(
    st.none(),
    st.integers(-1, 65536),
    st.sampled_from([0, 1, 80, 443, 65535, True, False, 80.0, "80", "http", "٣", [80]]),
)
port_items = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "", None, "ICMP", 6, ["TCP"]]),
            "port": port_values,
            "endPort": port_values,
        },
    ),
    st.sampled_from(["TCP", 80, None]),
)
port_lists = st.one_of(
    st.lists(port_items, max_size=3),
    st.sampled_from([None, {}, {"port": 80}, "TCP"]),
)


@st.composite
def entries(draw: st.DrawFn) -> Any:
    entry: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        entry["cidr"] = draw(cidr_texts())
    if not draw(st.integers(0, 5)):
        entry["except"] = draw(
            st.one_of(st.lists(cidr_texts(), max_size=2), st.sampled_from([None, [], "x"]))
        )
    if draw(st.booleans()):
        entry["ports"] = draw(port_lists)
    if not draw(st.integers(0, 9)):
        entry["domainName"] = draw(st.sampled_from(["example.com", "", None]))
    return draw(
        st.one_of(st.just(entry), st.just(entry), st.just(entry), st.sampled_from(["x", 1]))
    )


@settings(max_examples=600, deadline=None)
@given(st.lists(entries(), max_size=8))
def test_packing_in_one_pass_gives_what_validating_then_packing_gives(items: list[Any]) -> None:
    assert fast(items) == exact(items)


@settings(max_examples=100, deadline=None)
@given(st.lists(entries(), max_size=8), st.lists(entries(), max_size=8))
def test_a_port_list_remembered_from_one_object_changes_nothing_for_the_next(
    first: list[Any], second: list[Any]
) -> None:
    fast(first)
    assert fast(second) == exact(second)


@pytest.mark.parametrize(
    "text",
    ["10.0.0.0/33", "::/129", "10.0.0.0/32", "::1/128", "10.0.0.255/0", "::/0", "10.0.0.0/1 "],
)
def test_prefix_lengths_at_and_past_the_family_s_bits(text: str) -> None:
    items = [{"cidr": "10.0.0.0/8"}, {"cidr": text}]
    assert fast(items) == exact(items)


@pytest.mark.parametrize(
    "ports",
    [
        [{"protocol": ["TCP"], "port": 80}],
        [{"protocol": 6, "port": 80}],
        [{"protocol": "TCP", "port": [80]}],
        [{"protocol": "TCP", "port": "80"}],
        [{"protocol": "TCP", "port": 80, "endPort": 79}],
        [{"port": 80}, "TCP"],
        {"port": 80},
    ],
)
def test_odd_port_lists_are_judged_as_the_exact_path_judges_them(ports: Any) -> None:
    items = [{"cidr": "10.0.0.0/8", "ports": [{"protocol": "TCP", "port": 80}]}]
    items.append({"cidr": "10.0.0.0/8", "ports": ports})
    assert fast(items) == exact(items)


def test_a_port_equal_to_a_remembered_one_is_still_refused_when_it_is_not_a_number() -> None:
    ok = parse_packed([{"cidr": "10.0.0.0/8", "ports": [{"protocol": "TCP", "port": 1}]}], WHERE)
    assert [r.ports for r in ok] == [(PortRange(NP_PROTO_TCP, 1, 1),)]
    for bad in (True, 1.0):  # both == 1, and hash as 1
        with pytest.raises(ValueError, match=r"^spec\.ingress\.0\.ports\.0\.port: "):
            parse_packed(
                [{"cidr": "10.0.0.0/8", "ports": [{"protocol": "TCP", "port": bad}]}], WHERE
            )


def test_what_it_remembers_of_port_lists_is_bounded() -> None:
    many = [
        {"cidr": "10.0.0.0/8", "ports": [{"protocol": "UDP", "port": n}]}
        for n in range(1, 3 * rulepack._PORT_LISTS_MAX)
    ]
    packed = parse_packed(many, WHERE)
    assert len(packed) == len(many)
    assert 0 < len(rulepack._PORT_LISTS) <= rulepack._PORT_LISTS_MAX


def test_rules_come_out_grouped_by_port_list_in_the_order_first_seen() -> None:
    items = [
        {"cidr": "10.0.0.1/8"},
        {"cidr": "fd00::1/64", "ports": [{"port": 53, "protocol": "UDP"}]},
        {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]},
        {"cidr": " 192.168.0.7 "},
        {"domainName": "example.com"},
        {"cidr": "11.0.0.0/8", "ports": [{"protocol": "UDP", "port": 53}]},
    ]
    packed = parse_packed(items, WHERE)
    assert packed == exact(items)
    udp53 = (PortRange(NP_PROTO_UDP, 53, 53),)
    assert [ports for ports, _ in packed.groups] == [(), udp53]
    v4 = int(ipaddress.IPv4Address("10.0.0.0"))
    rules = [(Prefix.of(r.cidr), r.ports, len(r.excepts)) for r in packed]
    assert [(p.length, p.value, ports, excepts) for p, ports, excepts in rules] == [
        (8, v4, (), 0),
        (32, int(ipaddress.IPv4Address("192.168.0.7")), (), 0),
        (64, int(ipaddress.IPv6Address("fd00::")), udp53, 0),
        (8, int(ipaddress.IPv4Address("11.0.0.0")), udp53, 0),
        (16, int(ipaddress.IPv4Address("10.1.0.0")), (), 1),
    ]


def test_no_list_is_no_rules_and_anything_else_is_refused() -> None:
    assert parse_packed(None, WHERE) == PackedRules() == exact(None)
    assert fast({"cidr": "10.0.0.0/8"}) == exact({"cidr": "10.0.0.0/8"})
    assert fast("x") == "ValueError: spec.ingress: must be a list"
