"""The pool of empty tries kept in np_rules (bpf.store): a change fills a pooled trie
instead of inserting one into the outer map, packets are judged by what was filled,
a restart takes the unreferenced empty tries back, and a failed fill retires the trie
without touching the record in force."""

from __future__ import annotations

import ipaddress
import itertools
import os

import pytest

from bpf import layout as lay
from bpf import store as store_mod
from bpf.datapath import ALLOW_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.errors import BpfError
from bpf.ruleset import PeerRule, PortRange, compile_rules
from simnode import packets as pk

OK, SHOT = 0, 2
LO = 1
POD = ipaddress.IPv4Address("10.66.0.10")
PEER = ipaddress.IPv4Address("10.66.0.20")
_SPORTS = itertools.count(30000)  # a new flow each time (tracked flows pass whatever the rules)


def ingress(port: int) -> DirectionPolicy:
    rule = PeerRule(
        ipaddress.IPv4Network("10.66.0.0/24"), ports=(PortRange(lay.NP_PROTO_TCP, port, port),)
    )
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compile_rules([rule]))


def verdict(dp: Datapath, dport: int) -> int:
    packet = pk.packet(src=PEER, dst=POD, protocol=pk.TCP, sport=next(_SPORTS), dport=dport)
    return dp.ingress_prog.test_run(packet, ifindex=LO).retval


def outer_ids(dp: Datapath) -> set[int]:
    return {int.from_bytes(k, "little") for k in dp.rules}


def program(dp: Datapath, port: int) -> int:
    dp.program_pods({LO: PodPolicy(7, ingress(port), ALLOW_ALL)})
    record = dp.pod_record(LO)
    assert record is not None
    return int(record.ingress_trie)


def test_a_change_fills_a_pooled_trie_and_inserts_nothing(datapath: Datapath) -> None:
    assert datapath.refill_pool() == store_mod.POOL_SIZE
    pooled = outer_ids(datapath)
    assert len(pooled) == store_mod.POOL_SIZE
    assert all(os.path.exists(datapath.pins.trie(t)) for t in pooled)

    trie = program(datapath, 80)
    assert trie in pooled, "the pod's trie is one of the pool's"
    assert outer_ids(datapath) == pooled, "no trie was inserted into np_rules"
    assert datapath.store.pooled == store_mod.POOL_SIZE - 1
    assert (verdict(datapath, 80), verdict(datapath, 81)) == (OK, SHOT)

    again = program(datapath, 81)  # a change: another pooled trie, the first retires
    assert again in pooled
    assert again != trie
    assert (verdict(datapath, 82), verdict(datapath, 81)) == (SHOT, OK)
    assert datapath.collect_garbage()[0] == 1
    assert trie not in outer_ids(datapath)
    assert not os.path.exists(datapath.pins.trie(trie))

    assert datapath.refill_pool() == 2
    assert datapath.store.pooled == store_mod.POOL_SIZE
    occupied, _ = datapath.occupancy()[lay.MAP_RULES]
    assert occupied == len(outer_ids(datapath)) == store_mod.POOL_SIZE + 1


def test_a_restart_takes_the_empty_tries_back(pin_root: str) -> None:
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 20)
    try:
        dp.refill_pool()
        in_use = program(dp, 80)
        before = outer_ids(dp)
    finally:
        dp.close()
    dp = Datapath.open(pin_root)
    try:
        assert dp.store.pooled == store_mod.POOL_SIZE - 1, "the empty ones are pooled again"
        assert outer_ids(dp) == before
        assert dp.collect_garbage() == (0, 0), "nothing retired: the pod's trie is in use"
        assert (verdict(dp, 80), verdict(dp, 81)) == (OK, SHOT)
        trie = program(dp, 443)
        assert trie in before
        assert trie != in_use
        assert outer_ids(dp) == before
        assert (verdict(dp, 443), verdict(dp, 80)) == (OK, SHOT)
        assert dp.collect_garbage()[0] == 1
    finally:
        dp.close()


def test_a_failed_fill_keeps_the_record_in_force_and_retires_the_trie(
    datapath: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    datapath.refill_pool()
    trie = program(datapath, 80)

    def broken(self: store_mod.RuleStore, *_: object) -> None:
        raise BpfError(12, "fill: out of memory")

    monkeypatch.setattr(store_mod.RuleStore, "_fill", broken)
    with pytest.raises(BpfError):
        program(datapath, 81)
    monkeypatch.undo()
    record = datapath.pod_record(LO)
    assert record is not None
    assert record.ingress_trie == trie
    assert (verdict(datapath, 80), verdict(datapath, 81)) == (OK, SHOT)
    assert datapath.counts()["retired_tries"] == 1, "the spoiled trie waits for collection"
    assert datapath.collect_garbage()[0] == 1
    assert program(datapath, 81) != trie
    assert (verdict(datapath, 80), verdict(datapath, 81)) == (SHOT, OK)


def test_tries_adopted_unread_are_read_later_and_nothing_is_freed_before(pin_root: str) -> None:
    """The agent adopts tries without reading them (a node's hold hundreds of thousands
    of entries) and reads what they reference afterwards: until then no port set is
    collected and no name freed; after, equal rules share the adopted trie again."""
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 20)
    try:
        kept = program(dp, 80)
        dp.program_pods({2: PodPolicy(8, ingress(443), ALLOW_ALL)})  # a second pod
        dp.collect_garbage()
    finally:
        dp.close()
    dp = Datapath.open(pin_root, read_tries=False)
    try:
        assert dp.store.unread == 2
        assert (verdict(dp, 80), verdict(dp, 81)) == (OK, SHOT), "enforcing, unread"
        dp.remove_pods([2])  # its trie and port set are now unused
        assert dp.collect_garbage() == (1, 0), "the trie goes, its port set waits"
        assert dp.free_ids() == (0, 0)
        read = dp.store.read_tries(dp.store.unread_ids(10))
        assert set(read) == {kept}, "the collected trie is read no more"
        dp.store.apply_read(read)
        assert dp.store.unread == 0
        assert dp.collect_garbage() == (0, 1), "now the unused port set goes"
        assert program(dp, 80) == kept, "equal rules share the adopted trie"
    finally:
        dp.close()


def test_a_trie_that_cannot_be_read_blocks_collection_not_the_reader(
    pin_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adopted trie whose entries cannot be read is set apart (logged), so the reader
    does not ask for it forever; what it references stays uncollected."""
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 20)
    try:
        program(dp, 80)
        dp.program_pods({2: PodPolicy(8, ingress(443), ALLOW_ALL)})
        dp.collect_garbage()
    finally:
        dp.close()
    dp = Datapath.open(pin_root, read_tries=False)
    try:
        asked = dp.store.unread_ids(10)
        broken = asked[0]
        real = store_mod.RuleStore._read_trie

        def read(self: store_mod.RuleStore, trie_id: int) -> object:
            if trie_id == broken:
                raise BpfError(5, "read: input/output error")
            return real(self, trie_id)

        monkeypatch.setattr(store_mod.RuleStore, "_read_trie", read)
        dp.store.apply_read(dp.store.read_tries(asked), asked)
        assert dp.store.unread == 0, "nothing left to ask for"
        assert not dp.store.references_known
        dp.remove_pods([2])
        assert dp.collect_garbage()[1] == 0, "no port set is collected"
        assert dp.free_ids() == (0, 0)
        assert (verdict(dp, 80), verdict(dp, 81)) == (OK, SHOT)
    finally:
        dp.close()
