"""The strict-mode gate's nftables transaction (the privileged leak tests run it)."""

from __future__ import annotations

import pytest

from agent.gate import TABLE, GateError, ruleset


def test_one_transaction_replaces_the_set_and_the_rules() -> None:
    script = ruleset(("eni", "vlan"), [7, 3, 7])
    lines = script.splitlines()
    # the set is flushed and refilled in the same transaction: no window where an armed
    # interface is shut, and stale ifindexes of a previous run go
    assert lines.index(f"flush set inet {TABLE} armed") < lines.index(
        f"add element inet {TABLE} armed {{ 3, 7 }}"
    )
    assert f'add rule inet {TABLE} forward iifname "eni*" iif != @armed counter drop' in lines
    assert f'add rule inet {TABLE} forward oifname "eni*" oif != @armed counter drop' in lines
    # the VPC CNI's VLAN links share the vlan prefix and are exempt by name
    assert (
        f'add rule inet {TABLE} forward iifname "vlan*" iifname != "vlan.eth.*" '
        "iif != @armed counter drop"
    ) in lines


def test_nothing_armed_adds_no_element() -> None:
    assert "add element" not in ruleset(("eni",), [])


@pytest.mark.parametrize("prefix", ["", 'a"b', "x y", "a*", "a;b"])
def test_prefixes_nft_cannot_match_are_refused(prefix: str) -> None:
    with pytest.raises(GateError):
        ruleset((prefix,), [])
