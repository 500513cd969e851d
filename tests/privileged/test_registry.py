"""The lifecycle of the datapath's ids, on real pinned maps with small capacities: pod and
policy ids end after their grace period, are never handed out twice (not even across a
restart), a full table is an error for the one caller, and removed pins come back."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
from collections.abc import Iterator

import pytest

from bpf import layout as lay
from bpf.datapath import ALLOW_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.maps import Map, TypedMap
from bpf.registry import TableFullError
from bpf.ruleset import Decision, PeerRule, PortRange, Prefix, compile_rules
from bpf.tiers import ACTION_DENY, ClusterRule, compile_tiers

SMALL = 8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NP_MAP_SIZES", f"{lay.MAP_POD_META}={SMALL},{lay.MAP_POLICIES}={SMALL}")
    monkeypatch.delenv("NP_ID_GRACE", raising=False)


def _open(pin_root: str, clock: Clock) -> Datapath:
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 16)
    dp.names.clock = clock
    return dp


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def dp(small: None, pin_root: str, clock: Clock) -> Iterator[Datapath]:
    d = _open(pin_root, clock)
    try:
        yield d
    finally:
        d.close()


def _pod_names(dp: Datapath) -> dict[int, str]:
    return {k.value: v.uid.decode() for k, v in dp.pod_meta.items() if k.value != 0}


def _policy_names(dp: Datapath) -> dict[int, str]:
    return {k.value: v.name.decode() for k, v in dp.policies.items() if k.value != 0}


def test_pod_ids_end_after_grace_and_are_never_reused(dp: Datapath, clock: Clock) -> None:
    capacity = SMALL - 1  # key 0 holds the watermark
    ids = [dp.register_pod(namespace="ns", name="job", uid=f"uid-{i}") for i in range(capacity)]
    assert len(set(ids)) == capacity
    assert dp.register_pod(namespace="ns", name="job", uid="uid-0") == ids[0]  # stable
    with pytest.raises(TableFullError) as full:
        dp.register_pod(namespace="ns", name="job", uid="uid-new")
    assert full.value.table == lay.MAP_POD_META
    assert dp.occupancy()[lay.MAP_POD_META] == (capacity, capacity)

    # every UID but the last is gone: nothing is freed before the grace period ends
    assert dp.retire_pods_except({f"uid-{capacity - 1}"}) == capacity - 1
    clock.now += dp.names.grace - 1
    assert dp.free_ids() == (0, 0)
    assert len(_pod_names(dp)) == capacity  # late flow-log events still find the names
    clock.now += 2
    assert dp.free_ids() == (capacity - 1, 0)
    assert _pod_names(dp) == {ids[-1]: f"uid-{capacity - 1}"}

    fresh = dp.register_pod(namespace="ns", name="job", uid="uid-new")
    assert fresh not in ids
    assert fresh > max(ids)
    assert dp.occupancy()[lay.MAP_POD_META] == (2, capacity)


def _counted(dp: Datapath) -> set[int]:
    return {k.value for k in dp.pod_drops}


def test_drop_counters_live_and_end_with_the_pod_id(
    dp: Datapath, clock: Clock, pin_root: str
) -> None:
    """np_pod_drops holds an entry for every named pod id, from its registration to its
    end, and none after: churn past the table's capacity leaves no entry behind, and a
    restart gives ids named before the counters existed theirs and drops orphans."""
    for round_ in range(3 * SMALL):  # past the table's capacity, many times over
        ids = [dp.register_pod(namespace="ns", name="job", uid=f"r{round_}-{i}") for i in range(3)]
        assert _counted(dp) == set(_pod_names(dp))
        assert set(ids) <= _counted(dp)
        dp.pod_drops.update(ctypes.c_uint32(ids[0]), lay.NpPodDrops(ingress_packets=5))
        dp.register_pod(namespace="ns", name="job", uid=f"r{round_}-0")  # again: kept
        kept = dp.pod_drops.lookup(ctypes.c_uint32(ids[0]))
        assert kept is not None
        assert kept.ingress_packets == 5
        dp.retire_pods_except(set())
        clock.now += dp.names.grace + 1
        dp.free_ids()
        assert _counted(dp) == set() == set(_pod_names(dp))
    live = dp.register_pod(namespace="ns", name="web", uid="uid-web")
    dp.pod_drops.delete(ctypes.c_uint32(live))  # as pins written before the map existed
    dp.pod_drops.update(ctypes.c_uint32(live + 100), lay.NpPodDrops())  # an orphan
    dp.close()
    again = _open(pin_root, clock)
    try:
        assert _counted(again) == {live}
    finally:
        again.close()


def test_a_pod_id_still_in_a_record_waits(dp: Datapath, clock: Clock) -> None:
    pod_id = dp.register_pod(namespace="ns", name="web", uid="uid-web")
    dp.program_pods({4242: PodPolicy(pod_id, ALLOW_ALL, ALLOW_ALL)})
    dp.retire_pods_except(set())
    clock.now += dp.names.grace + 1
    assert dp.free_ids() == (0, 0)  # no record may point at a freed id
    dp.remove_pods([4242])
    assert dp.free_ids() == (1, 0)
    assert _pod_names(dp) == {}


def test_a_pod_back_within_grace_keeps_its_id(dp: Datapath, clock: Clock) -> None:
    pod_id = dp.register_pod(namespace="ns", name="web", uid="uid-web")
    dp.retire_pods_except(set())  # a re-list briefly missed it
    dp.retire_pods_except({"uid-web"})  # and it is back
    clock.now += dp.names.grace + 1
    assert dp.free_ids() == (0, 0)
    assert dp.register_pod(namespace="ns", name="web", uid="uid-web") == pod_id


def _rules(*policy_ids: int) -> DirectionPolicy:
    rules = [
        PeerRule(
            ipaddress.ip_network(f"10.9.{i}.0/24"),
            ports=(PortRange(lay.NP_PROTO_TCP, 80 + i, 80 + i),),
            policy_id=pid,
        )
        for i, pid in enumerate(policy_ids)
    ]
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compile_rules(rules))


def test_policy_ids_end_when_no_rule_carries_them(dp: Datapath, clock: Clock) -> None:
    a = dp.policy_id(namespace="ns", name="a")
    b = dp.policy_id(namespace="ns", name="b")
    pod_id = dp.register_pod(namespace="ns", name="web", uid="uid-web")
    dp.program_pods({4242: PodPolicy(pod_id, _rules(a, b), ALLOW_ALL)})
    clock.now += dp.names.grace + 1
    assert dp.free_ids() == (0, 0)  # both carried by an installed port set
    dp.program_pods({4242: PodPolicy(pod_id, _rules(a), ALLOW_ALL)})
    dp.collect_garbage()
    assert dp.free_ids() == (0, 0)  # b's grace starts when its last port set goes
    clock.now += dp.names.grace + 1
    assert dp.free_ids() == (0, 1)
    assert _policy_names(dp) == {a: "a"}
    # a policy name that is registered but never installed ends too
    c = dp.policy_id(namespace="ns", name="c")
    clock.now += dp.names.grace + 1
    assert dp.free_ids() == (0, 1)
    assert c not in _policy_names(dp)
    assert dp.policy_id(namespace="ns", name="c") > c  # a new id, never c again


def test_policy_table_full_then_freed(dp: Datapath, clock: Clock) -> None:
    for i in range(SMALL - 1):
        dp.policy_id(namespace="ns", name=f"p{i}")
    with pytest.raises(TableFullError) as full:
        dp.policy_id(namespace="ns", name="one-more")
    assert full.value.table == lay.MAP_POLICIES
    clock.now += dp.names.grace + 1
    assert dp.free_ids() == (0, SMALL - 1)
    assert dp.policy_id(namespace="ns", name="one-more") >= SMALL


def test_restart_never_hands_out_an_id_again(small: None, pin_root: str, clock: Clock) -> None:
    dp = _open(pin_root, clock)
    try:
        first = [dp.register_pod(namespace="ns", name="p", uid=f"u{i}") for i in range(3)]
        pol = dp.policy_id(namespace="ns", name="gone")
        dp.retire_pods_except({"u2"})
        clock.now += dp.names.grace + 1
        assert dp.free_ids() == (2, 1)  # u0, u1 and the policy: their names deleted
    finally:
        dp.close()
    dp = _open(pin_root, clock)
    try:
        assert _pod_names(dp) == {first[2]: "u2"}  # adopted: only what was kept
        again = dp.register_pod(namespace="ns", name="p", uid="u0")
        assert again > max(first)  # u0 was freed: a new id, never an old one
        assert dp.register_pod(namespace="ns", name="p", uid="u2") == first[2]
        assert dp.policy_id(namespace="ns", name="gone") > pol
        # adopted ids of pods that are no longer live are pruned after the first listing
        dp.retire_pods_except({"u0"})
        clock.now += dp.names.grace + 1
        assert dp.free_ids()[0] == 1
        assert set(_pod_names(dp).values()) == {"u0"}
    finally:
        dp.close()


def test_removed_pins_come_back(dp: Datapath, pin_root: str) -> None:
    pod_id = dp.register_pod(namespace="ns", name="web", uid="uid-web")
    pid = dp.policy_id(namespace="ns", name="a")
    dp.program_pods({4242: PodPolicy(pod_id, _rules(pid), ALLOW_ALL)})
    tries = os.listdir(os.path.join(pin_root, "tries"))
    assert tries
    # someone removes the pins while the agent runs
    shutil.rmtree(os.path.join(pin_root, "tries"))
    os.unlink(os.path.join(pin_root, "maps", lay.MAP_PODS))
    # the next change still works, and re-creates what was removed
    dp.program_pods(
        {
            4242: PodPolicy(pod_id, _rules(pid, pid + 0), ALLOW_ALL),
            4243: PodPolicy(pod_id, _rules(), ALLOW_ALL),
        }
    )
    assert os.path.exists(os.path.join(pin_root, "maps", lay.MAP_PODS))
    for trie in tries:
        assert os.path.exists(os.path.join(pin_root, "tries", trie))
    assert dp.restore_pins() == []  # nothing left to restore
    # another process (the CLI, conntrack) opens the pin and sees the live record
    with Map.from_pin(os.path.join(pin_root, "maps", lay.MAP_PODS)) as raw:
        pods = TypedMap(raw, lay.u32, lay.NpPod)
        assert pods.lookup(lay.u32(4242)) is not None


def test_an_upgrade_that_grows_the_counters_recreates_them(pin_root: str) -> None:
    """A node upgraded from a version whose np_stats had fewer counters: the old pin
    would make libbpf refuse the load; counters are disposable, so it is recreated."""
    from bpf.maps import MAP_TYPE_PERCPU_ARRAY

    os.makedirs(os.path.join(pin_root, "maps"))
    old_size = ctypes.sizeof(lay.NpStats) - 16
    with Map.create(
        map_type=MAP_TYPE_PERCPU_ARRAY,
        name=lay.MAP_STATS,
        key_size=4,
        value_size=old_size,
        max_entries=1,
    ) as old:
        old.pin(os.path.join(pin_root, "maps", lay.MAP_STATS))
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 16)
    try:
        assert dp.stats()["ct_revoked"] == 0
        with Map.from_pin(os.path.join(pin_root, "maps", lay.MAP_STATS)) as pinned:
            assert pinned.raw_value_size == ctypes.sizeof(lay.NpStats)
    finally:
        dp.close()


def _admin_deny(policy_id: int) -> DirectionPolicy:
    """An Admin Deny of all traffic from 10/8: folded, its prefixes carry the decision
    inline in the trie (no port set)."""
    folded = compile_tiers(
        [
            ClusterRule(
                Prefix.of(ipaddress.ip_network("10.0.0.0/8")),
                (),
                lay.NP_TIER_ADMIN,
                1,
                ACTION_DENY,
                policy_id,
            )
        ],
        networkpolicy=None,
        default=Decision(lay.NP_VERDICT_ALLOW, lay.NP_TIER_DEFAULT, lay.NP_REASON_DEFAULT_ALLOW),
    )
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, folded)


def test_inline_decisions_hold_their_policy_names_through_churn_and_restart(
    small: None, pin_root: str, clock: Clock
) -> None:
    dp = _open(pin_root, clock)
    try:
        pod_id = dp.register_pod(namespace="ns", name="web", uid="uid-web")
        # churn past the policy table's capacity: each round a new cluster policy
        for i in range(SMALL * 3):
            pid = dp.policy_id(namespace="", name=f"cnp-{i}")
            ingress = _admin_deny(pid)
            dp.program_pods({4242: PodPolicy(pod_id, ingress, ALLOW_ALL)})
            dp.collect_garbage()
            clock.now += dp.names.grace + 1
            dp.free_ids()
            assert _policy_names(dp) == {pid: f"cnp-{i}"}, "the live one kept, the last freed"
            assert list(dp.portsets.items()) == [], "decisions inline: no port set"
            rec = dp.pod_record(4242)
            assert rec is not None
            assert dp.read_trie(rec.ingress_trie) == ingress.rules
    finally:
        dp.close()
    dp = _open(pin_root, clock)  # a restart adopts the trie and what it carries inline
    try:
        clock.now += dp.names.grace + 1
        dp.free_ids()
        assert _policy_names(dp) == {pid: f"cnp-{SMALL * 3 - 1}"}
        assert dp.policy_id(namespace="", name="next") > pid
    finally:
        dp.close()
