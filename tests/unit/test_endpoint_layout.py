"""Laying a resolved policy out into PolicyEndpoints: the paired layout and the AWS
controller's (independent packing, entries kept where they are)."""

from __future__ import annotations

from typing import Any

from resolver.layout import Group, Held, Plan, Resolution, keys_of, packed, paired


def res(*, pods: int, ingress: int, egress: int, groups: int = 1) -> Resolution:
    def entries(prefix: str, n: int) -> list[dict[str, Any]]:
        return [{"cidr": f"{prefix}.{i // 250}.{i % 250}"} for i in range(n)]

    return Resolution(
        name="p",
        namespace="x",
        types=["Ingress", "Egress"],
        pod_selector={},
        groups=[
            Group(
                label="" if g == 0 else str(g),
                pods=[
                    {
                        "podIP": f"10.{g}.0.{i}",
                        "hostIP": "172.31.0.1",
                        "name": f"g{g}-{i}",
                        "namespace": "x",
                    }
                    for i in range(pods)
                ],
                ingress=entries(f"11.{g}", ingress),
            )
            for g in range(groups)
        ],
        egress=entries("12.0", egress),
    )


def joined(plan: Plan, group: str = "") -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"pods": set(), "ingress": set(), "egress": set()}
    for _, d in plan.writes:
        if d.group != group:
            continue
        out["pods"] |= {p["name"] for p in d.spec["podSelectorEndpoints"]}
        out["ingress"] |= {e["cidr"] for e in d.spec["ingress"]}
        out["egress"] |= {e["cidr"] for e in d.spec["egress"]}
    return out


def held_of(plan: Plan) -> list[Held]:
    return [
        Held(name or f"new-{i}", d.group, keys_of(d.spec))
        for i, (name, d) in enumerate(plan.writes)
    ]


def test_controller_layout_packs_each_kind_independently() -> None:
    r = res(pods=5, ingress=3, egress=7)
    plan = packed(r, 2, [])
    assert all(name is None for name, _ in plan.writes)
    sizes = [
        (len(d.spec["podSelectorEndpoints"]), len(d.spec["ingress"]), len(d.spec["egress"]))
        for _, d in plan.writes
    ]
    # ingress fills two objects, egress tops them up then needs two more, pods top up all
    # four and need one more holding only pods
    assert sizes == [(2, 2, 2), (2, 1, 2), (1, 0, 2), (0, 0, 1)]
    assert all(max(s) <= 2 for s in sizes)
    got = joined(plan)
    assert len(got["pods"]) == 5
    assert len(got["ingress"]) == 3
    assert len(got["egress"]) == 7


def test_new_objects_hold_one_kind_when_existing_ones_are_full() -> None:
    r = res(pods=2, ingress=2, egress=0)
    first = packed(r, 2, [])
    assert len(first.writes) == 1
    grown = res(pods=4, ingress=4, egress=0)
    plan = packed(grown, 2, held_of(first))
    kinds = [
        tuple(bool(d.spec[k]) for k in ("podSelectorEndpoints", "ingress", "egress"))
        for _, d in plan.writes
    ]
    assert kinds == [(True, True, False), (True, True, False)]
    assert plan.writes[0][0] == "new-0", "the existing object is kept"
    assert plan.writes[0][1].spec == first.writes[0][1].spec, "its entries stay where they are"


def test_removed_entries_leave_and_empty_objects_are_deleted() -> None:
    r = res(pods=4, ingress=4, egress=0)
    first = packed(r, 2, [])
    smaller = res(pods=1, ingress=1, egress=0)
    plan = packed(smaller, 2, held_of(first))
    assert len(plan.writes) + len(plan.deletes) == 2, "no new object"
    assert all(name is not None for name, _ in plan.writes)
    assert 1 <= len(plan.writes) <= 2
    assert joined(plan) == {"pods": {"g0-0"}, "ingress": {"11.0.0.0"}, "egress": set()}
    nothing = packed(res(pods=0, ingress=0, egress=0), 2, held_of(first))
    assert [name for name, _ in nothing.writes] == ["new-0"], "a policy keeps one object"
    assert nothing.deletes == ["new-1"]


def test_an_unchanged_policy_plans_the_same_objects() -> None:
    r = res(pods=7, ingress=5, egress=3, groups=2)
    first = packed(r, 3, [])
    again = packed(r, 3, held_of(first))
    assert [(n, d.spec) for n, d in again.writes] == [
        (f"new-{i}", d.spec) for i, (_, d) in enumerate(first.writes)
    ]
    assert again.deletes == []


def test_target_groups_are_packed_apart_and_each_carries_the_egress() -> None:
    r = res(pods=3, ingress=2, egress=2, groups=2)
    for plan in (packed(r, 1, []), packed(r, 200, [])):
        for group in ("", "1"):
            got = joined(plan, group)
            assert len(got["pods"]) == 3
            assert len(got["ingress"]) == 2
            assert len(got["egress"]) == 2
        assert {d.group for _, d in plan.writes} == {"", "1"}
    stale = packed(res(pods=3, ingress=2, egress=2, groups=1), 200, held_of(packed(r, 200, [])))
    assert stale.deletes == ["new-1"], "the vanished group's object goes"


def test_paired_layout_lists_every_pod_with_every_rule() -> None:
    r = res(pods=5, ingress=3, egress=1)
    specs = paired(r, 2)
    assert len(specs) == 3 * 2
    for d in specs:
        assert len(d.spec["podSelectorEndpoints"]) <= 2
        assert len(d.spec["ingress"]) <= 2
