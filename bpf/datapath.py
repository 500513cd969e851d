"""The node's policy datapath: load/adopt the pinned object, program pods atomically.

One loaded pair of programs serves every pod. A pod is a record in ``np_pods`` (keyed by
its host veth's ifindex) naming its per-direction state and rule tries; writing that one
record is the atomic switch of the pod's whole enforcement. Every trie the new records
need is in place before any record changes (bpf.store); ids are named by bpf.registry;
loading and pins are bpf.loading and bpf.pins.

Not thread-safe: one owner (the agent's datapath worker) calls it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from bpf import layout as lay
from bpf.codec import host_filter_record, host_key, inline_portset, meta_name, policy_ids, sum_stats
from bpf.errors import BpfError
from bpf.loading import grace_from_env, load_object
from bpf.maps import Map, TypedMap
from bpf.objects import BpfObject, Program
from bpf.pins import DEFAULT_PIN_ROOT, PinPaths, unpin
from bpf.registry import Registry
from bpf.ruleset import CompiledRules, Portset
from bpf.store import RuleStore

log = structlog.get_logger("bpf.datapath")

U32 = ctypes.c_uint32


@dataclass(frozen=True)
class DirectionPolicy:
    """One direction of a pod: its state and, when POLICIES_APPLIED, its rules."""

    state: int
    rules: CompiledRules | None = None

    def __post_init__(self) -> None:
        if self.state not in lay.STATE_NAMES:
            raise ValueError(f"unknown pod state {self.state}")
        if self.state == lay.NP_STATE_POLICIES_APPLIED and self.rules is None:
            raise ValueError("POLICIES_APPLIED needs rules (use empty rules to deny all)")


ALLOW_ALL = DirectionPolicy(lay.NP_STATE_DEFAULT_ALLOW)
DENY_ALL = DirectionPolicy(lay.NP_STATE_DEFAULT_DENY)


@dataclass(frozen=True)
class PodPolicy:
    pod_id: int
    ingress: DirectionPolicy
    egress: DirectionPolicy
    learned: bool = False  # egress has domain-name rules: consult np_learned
    # digest of what the policy was built from (np_pod_inputs); b"": none kept
    inputs: bytes = b""


@dataclass
class _Record:
    pod_id: int
    ingress_trie: int
    egress_trie: int


class Datapath:
    """The loaded datapath: programs, maps, pod records, the rule store and the names."""

    def __init__(self, obj: BpfObject, pin_root: str) -> None:
        self.obj = obj
        self.pin_root = pin_root
        self.pins = PinPaths(pin_root)
        m = obj.maps
        self.pods: TypedMap[ctypes.c_uint32, lay.NpPod] = TypedMap(m[lay.MAP_PODS], U32, lay.NpPod)
        self.rules: Map = m[lay.MAP_RULES]
        self.portsets: TypedMap[ctypes.c_uint32, lay.NpPortset] = TypedMap(
            m[lay.MAP_PORTSETS], U32, lay.NpPortset
        )
        self.ct: TypedMap[lay.NpCtKey, lay.NpCtValue] = TypedMap(
            m[lay.MAP_CT], lay.NpCtKey, lay.NpCtValue
        )
        self.host_addrs: TypedMap[lay.NpAddr, ctypes.c_uint32] = TypedMap(
            m[lay.MAP_HOST_ADDRS], lay.NpAddr, U32
        )
        self.host_filter: TypedMap[ctypes.c_uint32, lay.NpHostFilter] = TypedMap(
            m[lay.MAP_HOST_FILTER], U32, lay.NpHostFilter
        )
        self.config: TypedMap[ctypes.c_uint32, lay.NpConfig] = TypedMap(
            m[lay.MAP_CONFIG], U32, lay.NpConfig
        )
        self.stats_map: TypedMap[ctypes.c_uint32, lay.NpStats] = TypedMap(
            m[lay.MAP_STATS], U32, lay.NpStats
        )
        self.pod_meta: TypedMap[ctypes.c_uint32, lay.NpPodMeta] = TypedMap(
            m[lay.MAP_POD_META], U32, lay.NpPodMeta
        )
        self.policies: TypedMap[ctypes.c_uint32, lay.NpPolicyMeta] = TypedMap(
            m[lay.MAP_POLICIES], U32, lay.NpPolicyMeta
        )
        self.events: Map = m[lay.MAP_EVENTS]
        self.learned: TypedMap[lay.NpLearnedKey, lay.NpLearnedValue] = TypedMap(
            m[lay.MAP_LEARNED], lay.NpLearnedKey, lay.NpLearnedValue
        )
        self.pod_inputs: TypedMap[ctypes.c_uint32, lay.NpPodInputs] = TypedMap(
            m[lay.MAP_POD_INPUTS], U32, lay.NpPodInputs
        )
        # ifindex -> the digest np_pod_inputs holds for its record (non-zero ones only)
        self._inputs: dict[int, bytes] = {}
        # what each learned entry holds (its port set, if not inline), to release it
        self._learned: dict[tuple[int, lay.Address], Portset] = {}
        self.ingress_prog: Program = obj.programs[lay.PROG_INGRESS]
        self.egress_prog: Program = obj.programs[lay.PROG_EGRESS]
        self._records: dict[int, _Record] = {}
        self.pod_drops: TypedMap[ctypes.c_uint32, lay.NpPodDrops] = TypedMap(
            m[lay.MAP_POD_DROPS], U32, lay.NpPodDrops
        )
        self.names = Registry(
            pod_meta=self.pod_meta,
            policies=self.policies,
            pod_drops=self.pod_drops,
            grace=grace_from_env(),
        )
        self.store = RuleStore(
            rules=self.rules, portsets=self.portsets, names=self.names, pins=self.pins
        )

    # ---- lifecycle ------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        pin_root: str = DEFAULT_PIN_ROOT,
        *,
        ct_entries: int | None = None,
        events_bytes: int | None = None,
        path: str | None = None,
        read_tries: bool = True,
    ) -> Datapath:
        """Load the object, reusing maps pinned under ``pin_root`` (creating them on first
        use), pin the programs, and adopt whatever state the pinned maps hold.

        ``read_tries`` False: the adopted tries' references are left to be read later
        (bpf.store.RuleStore.adopt; the agent reads them on a thread of its own while
        it programs), instead of before this returns.

        Sizes left as None take the pinned map's size (or the default on first use); a
        size that differs from a pinned map's is refused: resizing means recreating the
        map, which would drop its contents."""
        obj = load_object(
            PinPaths(pin_root), ct_entries=ct_entries, events_bytes=events_bytes, path=path
        )
        try:
            dp = cls(obj, pin_root)
            dp._adopt(read_tries=read_tries)
        except BaseException:
            obj.close()
            raise
        return dp

    def close(self) -> None:
        self.store.close_pool()
        self.obj.close()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def unpin(pin_root: str) -> None:
        """Remove every pin under ``pin_root`` (tests and a full uninstall)."""
        unpin(pin_root)

    # ---- adoption -------------------------------------------------------------------
    def _adopt(self, *, read_tries: bool) -> None:
        next_policy = self.store.adopt()
        asked = self.store.unread_ids(self.store.unread) if read_tries else []
        read = self.store.read_tries(asked)
        # ids carried inline by the tries stay unique even if their names were lost (read
        # later, only those whose names survive are known: np_policies is pinned)
        inline = (pid for _, _, policies in read.values() for pid in policies)
        next_policy = max(next_policy, max(inline, default=0) + 1)
        for key, pod in self.pods.items():
            self._set_record(key.value, _Record(pod.pod_id, pod.ingress_trie, pod.egress_trie))
        self.names.adopt(
            floor_pod=max((r.pod_id + 1 for r in self._records.values()), default=1),
            floor_policy=next_policy,
        )
        self.store.reference_adopted_policies()
        self.store.apply_read(read, asked)
        self.store.reclaim_pool()
        self._adopt_inputs()
        self._adopt_learned()
        self.names.retire_unreferenced_policies()
        log.info(
            "datapath.adopted",
            pin_root=self.pin_root,
            pods=len(self._records),
            tries=len(self.store.tries),
            portsets=self.store.sizes()[2],
        )

    def _adopt_inputs(self) -> None:
        """The digests of the records' inputs; entries of interfaces without a record
        are removed."""
        zero = bytes(lay.NP_INPUTS_DIGEST_LEN)
        for key, value in self.pod_inputs.items():
            digest = bytes(value.digest)
            if key.value not in self._records:
                self.pod_inputs.delete(key)
            elif digest != zero:
                self._inputs[key.value] = digest

    def inputs_of(self, ifindex: int) -> bytes:
        """The digest of the inputs the record of ``ifindex`` was built from (b"":
        unknown), as np_pod_inputs holds it."""
        return self._inputs.get(ifindex, b"")

    def _adopt_learned(self) -> None:
        """What pods learned before a restart stays in force until it expires: its
        port sets and policy names are held again."""
        for key, value in self.learned.items():
            address = lay.addr_from(bytes(key.addr), key.family)
            raw = value.decision
            if raw & lay.NP_LPM_INLINE:
                ps = inline_portset(raw)
            elif raw == lay.NP_PORTSET_NONE:
                continue
            else:
                try:
                    ps = self.store.read_portset(raw)
                except BpfError:
                    continue  # its port set is gone: the datapath denies (fail closed)
            self.store.hold(ps)
            self.names.reference_policies(policy_ids(ps), +1)
            self._learned[(key.ifindex, address)] = ps

    def learned_expiries(self) -> dict[tuple[int, lay.Address], int]:
        """Every learned entry's expiry (the datapath's clock), as the map holds it."""
        return {
            (k.ifindex, lay.addr_from(bytes(k.addr), k.family)): v.expires_ns
            for k, v in self.learned.items()
        }

    # ---- names for ids --------------------------------------------------------------
    def register_pod(self, *, namespace: str, name: str, uid: str) -> int:
        """The pod's datapath id (stable for its UID; never another pod's)."""
        return self.names.register_pod(namespace=namespace, name=name, uid=uid)

    def policy_id(self, *, namespace: str, name: str) -> int:
        """The id that port rules carry for a policy (names kept in np_policies)."""
        return self.names.policy_id(namespace=namespace, name=name)

    def retire_pods_except(self, live_uids: Iterable[str]) -> int:
        """Pod ids of UIDs not live start their grace period (see bpf.registry)."""
        return self.names.retire_pods_except(live_uids)

    def free_ids(self) -> tuple[int, int]:
        """Delete the names whose grace period is over; (pods, policies) freed. Not
        while adopted tries are unread: the policies they carry are not counted yet."""
        if not self.store.references_known:
            return 0, 0
        return self.names.sweep(pods_in_records={r.pod_id for r in self._records.values()})

    # ---- programming ----------------------------------------------------------------
    def program_pods(self, pods: Mapping[int, PodPolicy]) -> None:
        """Switch each pod (by host veth ifindex) to its new policy, atomically per pod.

        Every trie the new policies need is in place before any record changes."""
        needed: dict[bytes, CompiledRules] = {}
        for pod in pods.values():
            for d in (pod.ingress, pod.egress):
                if d.state == lay.NP_STATE_POLICIES_APPLIED and d.rules is not None:
                    needed.setdefault(d.rules.digest(), d.rules)
        trie_ids = self.store.install(needed, restore_pins=self.restore_pins)

        records: dict[int, lay.NpPod] = {}
        for ifindex, pod in pods.items():
            records[ifindex] = lay.NpPod(
                pod_id=pod.pod_id,
                ingress_trie=_trie_of(pod.ingress, trie_ids),
                egress_trie=_trie_of(pod.egress, trie_ids),
                ingress_state=pod.ingress.state,
                egress_state=pod.egress.state,
                flags=lay.NP_POD_F_LEARNED if pod.learned else 0,
            )
        # the digests of the records about to change are void first: a crash between
        # the two writes leaves no digest that a restart could trust
        void = [i for i in records if i in self._inputs]
        if void:
            zero = lay.NpPodInputs()
            self.pod_inputs.update_many((U32(i), zero) for i in void)
            for i in void:
                del self._inputs[i]
        # a batch of single-element writes: each pod switches atomically
        self.pods.update_many((U32(i), rec) for i, rec in records.items())
        for ifindex, rec in records.items():
            self._set_record(ifindex, _Record(rec.pod_id, rec.ingress_trie, rec.egress_trie))
        kept = {i: p.inputs for i, p in pods.items() if p.inputs}
        if kept:
            self.pod_inputs.update_many(
                (U32(i), lay.NpPodInputs.from_buffer_copy(d)) for i, d in kept.items()
            )
            self._inputs.update(kept)

    # ---- learned addresses (domain names) --------------------------------------------
    def learn(self, ifindex: int, address: lay.Address, decision: Portset, expires_ns: int) -> None:
        """A pod's new egress flows to ``address`` get ``decision`` until ``expires_ns``
        (the datapath's monotonic clock), if its record has ``learned`` set. The port
        set is held (installed if needed) while the entry lives."""
        value = self.store.hold(decision)
        self.names.reference_policies(policy_ids(decision), +1)
        key = _learned_key(ifindex, address)
        try:
            self.learned.update(key, lay.NpLearnedValue(expires_ns=expires_ns, decision=value))
        except BaseException:
            self.store.release(decision)
            self.names.reference_policies(policy_ids(decision), -1)
            raise
        old = self._learned.pop((ifindex, address), None)
        self._learned[(ifindex, address)] = decision
        if old is not None:
            self.store.release(old)
            self.names.reference_policies(policy_ids(old), -1)

    def forget(self, ifindex: int, address: lay.Address) -> bool:
        """Remove a learned entry (its port set released); False if there was none. An
        entry the kernel already evicted (the map is an LRU) is only released."""
        held = self._learned.pop((ifindex, address), None)
        if held is None:
            return False
        with contextlib.suppress(BpfError):  # ENOENT: evicted under pressure
            self.learned.delete(_learned_key(ifindex, address))
        self.store.release(held)
        self.names.reference_policies(policy_ids(held), -1)
        return True

    def expire_learned(self, before_ns: int) -> tuple[int, int]:
        """Forget every learned entry that expired before ``before_ns`` (the entries'
        clock), and release those the kernel evicted (an LRU under pressure); returns
        (expired, evicted). Connections opened while they were valid go on."""
        live = self.learned_expiries()
        stale = [k for k, expires in live.items() if expires < before_ns]
        evicted = [k for k in self._learned if k not in live]
        expired = sum(self.forget(ifindex, address) for ifindex, address in stale)
        return expired, sum(self.forget(ifindex, address) for ifindex, address in evicted)

    def learned_decision(self, ifindex: int, address: lay.Address) -> Portset | None:
        """What a live learned entry decides for the pod's new flows to ``address``
        (None: none, or expired), read from the map as the datapath reads it."""
        v = self.learned.lookup(_learned_key(ifindex, address))
        if v is None or v.expires_ns <= time.clock_gettime_ns(time.CLOCK_MONOTONIC):
            return None
        if v.decision & lay.NP_LPM_INLINE:
            return inline_portset(v.decision)
        return self.store.read_portset(v.decision)

    def learned_for(self, ifindex: int) -> dict[lay.Address, Portset]:
        return {a: ps for (i, a), ps in self._learned.items() if i == ifindex}

    def remove_pods(self, ifindexes: Iterable[int]) -> None:
        """Forget pods' records (their packets then pass as unknown until detached),
        and what they learned."""
        for ifindex in ifindexes:
            if self._inputs.pop(ifindex, None) is not None:
                self.pod_inputs.delete(U32(ifindex))
            self.pods.delete(U32(ifindex))
            self._set_record(ifindex, None)
            for address in list(self.learned_for(ifindex)):
                self.forget(ifindex, address)

    def _set_record(self, ifindex: int, rec: _Record | None) -> None:
        old = self._records.pop(ifindex, None)
        if rec is not None:
            self._records[ifindex] = rec
            self.store.ref((rec.ingress_trie, rec.egress_trie), +1)
        if old is not None:
            self.store.ref((old.ingress_trie, old.egress_trie), -1)

    def refill_pool(self) -> int:
        """Top up the empty tries kept ready in np_rules (see bpf.store): call when
        programming is quiet, it waits for an RCU grace period."""
        return self.store.refill_pool()

    def collect_garbage(self) -> tuple[int, int]:
        """Remove retired tries, then port sets no trie uses. Returns (tries, portsets)."""
        return self.store.collect_garbage()

    def restore_pins(self) -> list[str]:
        """Pin again whatever of ours lost its pin while we run (someone removed files
        under the pin root): the programs, the maps, the live tries. Enforcement never
        depended on the pins (the programs hold the maps); the CLI, the other node
        processes and a restart do. Returns what was restored."""
        restored: list[str] = []
        self.pins.make_dirs()
        # one listing per directory (this runs every few seconds)
        programs = set(os.listdir(self.pins.programs))
        for name in [n for n in self.obj.programs if n not in programs]:
            self.obj.programs[name].pin(self.pins.program(name))
            restored.append(self.pins.program(name))
        maps = set(os.listdir(self.pins.maps))
        for name in [n for n in self.obj.maps if not n.startswith(".") and n not in maps]:
            self.obj.maps[name].pin(self.pins.map(name))
            restored.append(self.pins.map(name))
        restored += self.store.restore_trie_pins()
        if restored:
            log.warning(
                "datapath.pins_restored",
                count=len(restored),
                paths=restored[:8],
                reason="pins under the pin root were removed while the agent ran",
            )
        return restored

    # ---- reading back ---------------------------------------------------------------
    def read_trie(self, trie_id: int) -> CompiledRules | None:
        """A trie's entries as stored in the kernel (see RuleStore.read_trie)."""
        return self.store.read_trie(trie_id)

    def read_portset(self, portset_id: int) -> Portset:
        return self.store.read_portset(portset_id)

    def policy_name(self, policy_id: int) -> str:
        """namespace/name of a policy id, from the pinned names ("" if unknown)."""
        meta = self.policies.lookup(U32(policy_id)) if policy_id else None
        return meta_name(meta) if meta else ""

    def is_host_address(self, address: lay.Address) -> bool:
        return self.host_addrs.lookup(host_key(address)) is not None

    def pod_record(self, ifindex: int) -> lay.NpPod | None:
        return self.pods.lookup(U32(ifindex))

    def pod_ifindexes(self) -> list[int]:
        return sorted(self._records)

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """table -> (entries in use, capacity), from the bookkeeping (cheap; may be read
        from the event loop: it only takes lengths)."""
        tries, _, portsets = self.store.sizes()
        out = {
            lay.MAP_PODS: (len(self._records), self.pods.raw.max_entries),
            lay.MAP_RULES: (tries + self.store.pooled, self.rules.max_entries),
            lay.MAP_PORTSETS: (portsets, self.portsets.raw.max_entries),
        }
        out.update(self.names.occupancy())
        return out

    def counts(self) -> dict[str, int]:
        """Live tries, port sets and their references (bookkeeping, for status output;
        may be read from the event loop, see RuleStore.sizes)."""
        tries, retired, portsets = self.store.sizes()
        return {
            "pods": len(self._records),
            "tries": tries,
            "portsets": portsets,
            "retired_tries": retired,
        }

    # ---- node-wide settings ---------------------------------------------------------
    def set_event_flags(self, *, emit_deny: bool, emit_allow: bool) -> None:
        flags = (lay.NP_CFG_EMIT_DENY if emit_deny else 0) | (
            lay.NP_CFG_EMIT_ALLOW if emit_allow else 0
        )
        self.config.update(U32(0), lay.NpConfig(flags=flags))

    def set_host_addresses(self, addresses: Iterable[lay.Address]) -> None:
        """The node's own addresses: traffic between them and any pod always passes.

        The filter (np_host_filter) covers every address in the map at every moment: it
        covers old and new before the map changes, and only the new after."""
        want = {bytes(host_key(a)) for a in addresses}
        have = {bytes(k) for k in self.host_addrs}
        self.host_filter.update(U32(0), host_filter_record(want | have))
        for raw in have - want:
            self.host_addrs.raw.delete(raw)
        for raw in want - have:
            self.host_addrs.raw.update(raw, bytes(U32(1)))
        self.host_filter.update(U32(0), host_filter_record(want))

    def stats(self) -> dict[str, int]:
        """Datapath counters summed over CPUs."""
        return sum_stats(self.stats_map)


def _learned_key(ifindex: int, address: lay.Address) -> lay.NpLearnedKey:
    key = lay.NpLearnedKey(ifindex=ifindex, family=lay.addr_family(address))
    ctypes.memmove(key.addr, lay.addr_bytes(address), 16)
    return key


def _trie_of(d: DirectionPolicy, ids: Mapping[bytes, int]) -> int:
    if d.state != lay.NP_STATE_POLICIES_APPLIED or d.rules is None:
        return lay.NP_TRIE_NONE
    return ids[d.rules.digest()]
