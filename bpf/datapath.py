"""The node's policy datapath: load/adopt the pinned object, program pods atomically.

One loaded pair of programs serves every pod. A pod is a record in ``np_pods`` (keyed by
its host veth's ifindex) naming its per-direction state and rule tries; writing that one
record is the atomic switch of the pod's whole enforcement.

Tries (``np_rules`` inner LPM maps) and port sets (``np_portsets``) are immutable and
interned by content: pods with equal rules share one trie, equal port sets are stored
once. Changing a pod builds any missing tries first (one batched insert into the outer
map, which costs one RCU grace period however many tries it carries), then switches the
record. Tries and port sets no longer referenced are *retired*, and removed by
:meth:`Datapath.collect_garbage`: the batched delete from the outer map returns only
after an RCU grace period (the kernel waits for running programs on map-in-map
updates), after which no program can still be reading the retired port sets.

Not thread-safe: one owner (the agent's datapath worker) calls it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources

import structlog

from bpf import layout as lay
from bpf.errors import BpfError
from bpf.maps import BPF_F_NO_PREALLOC, MAP_TYPE_LPM_TRIE, Map, TypedMap
from bpf.objects import BpfObject, Program
from bpf.registry import GRACE, Registry
from bpf.ruleset import NOTHING, CompiledRules, PortRule, Portset, Prefix

log = structlog.get_logger("bpf.datapath")

DEFAULT_PIN_ROOT = "/sys/fs/bpf/netpol"
TRIES_DIR = "tries"  # <pin_root>/tries/<trie id>: every live rule trie, pinned
U32 = ctypes.c_uint32


OBJECT_ENV = "NP_BPF_OBJECT"


def object_path() -> str:
    """The prebuilt object shipped with the package, or the one ``$NP_BPF_OBJECT``
    names (a datapath build to roll out or test: its maps must keep the layouts of
    bpf/np.h, which the pinned maps are checked against at load)."""
    return os.environ.get(OBJECT_ENV) or str(resources.files("bpf").joinpath(lay.OBJECT_FILE))


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


@dataclass
class _Trie:
    id: int
    digest: bytes
    portsets: frozenset[int]
    refs: int = 0


@dataclass
class _PortsetRef:
    id: int
    refs: int = 0


@dataclass
class _Record:
    pod_id: int
    ingress_trie: int
    egress_trie: int


class Datapath:
    """The loaded datapath: programs, maps, and the interning of tries and port sets."""

    def __init__(self, obj: BpfObject, pin_root: str) -> None:
        self.obj = obj
        self.pin_root = pin_root
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
        self.ingress_prog: Program = obj.programs[lay.PROG_INGRESS]
        self.egress_prog: Program = obj.programs[lay.PROG_EGRESS]

        self._tries: dict[int, _Trie] = {}
        self._trie_by_key: dict[bytes, int] = {}
        self._portsets: dict[Portset, _PortsetRef] = {}
        self._portset_by_id: dict[int, Portset] = {}
        self._records: dict[int, _Record] = {}
        self.names = Registry(
            pod_meta=self.pod_meta, policies=self.policies, grace=_grace_from_env()
        )
        self._next_trie = 1
        self._next_portset = 1

    # ---- lifecycle ------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        pin_root: str = DEFAULT_PIN_ROOT,
        *,
        ct_entries: int | None = None,
        events_bytes: int | None = None,
        path: str | None = None,
    ) -> Datapath:
        """Load the object, reusing maps pinned under ``pin_root`` (creating them on first
        use), pin the programs, and adopt whatever state the pinned maps hold.

        Sizes left as None take the pinned map's size (or the default on first use); a
        size that differs from a pinned map's is refused: resizing means recreating the
        map, which would drop its contents."""
        if ct_entries is not None and not (
            lay.NP_CT_MIN_ENTRIES <= ct_entries <= lay.NP_CT_MAX_ENTRIES
        ):
            raise ValueError(
                f"conntrack table size {ct_entries} outside "
                f"{lay.NP_CT_MIN_ENTRIES}..{lay.NP_CT_MAX_ENTRIES}"
            )
        map_dir = os.path.join(pin_root, "maps")
        sizes = {
            name: size
            for name, size in (
                (lay.MAP_CT, _sized(map_dir, lay.MAP_CT, ct_entries, "conntrack table size")),
                (
                    lay.MAP_EVENTS,
                    _sized(map_dir, lay.MAP_EVENTS, events_bytes, "event ring buffer size"),
                ),
            )
            if size is not None
        }
        _recreate_stale_counters(map_dir)
        for name, size in _sizes_from_env().items():
            # a pinned map keeps its size (the test build's small tables survive restarts)
            sizes.setdefault(name, _sized(map_dir, name, None, name) or size)
        obj = BpfObject.load(path or object_path(), map_pin_dir=map_dir, max_entries=sizes)
        try:
            prog_dir = os.path.join(pin_root, "programs")
            os.makedirs(prog_dir, mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(pin_root, TRIES_DIR), mode=0o700, exist_ok=True)
            for prog in obj.programs.values():
                prog.pin(os.path.join(prog_dir, prog.name))
            dp = cls(obj, pin_root)
            dp._adopt()
        except BaseException:
            obj.close()
            raise
        return dp

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def unpin(pin_root: str) -> None:
        """Remove every pin under ``pin_root``. Maps and programs live on while attached
        or open elsewhere; this is for tests and a full uninstall."""
        shutil.rmtree(pin_root, ignore_errors=True)

    # ---- adoption -------------------------------------------------------------------
    def _adopt(self) -> None:
        next_policy = 1
        for key, ps in self.portsets.items():
            portset = portset_from_map(ps)
            self._portsets[portset] = _PortsetRef(key.value)
            self._portset_by_id[key.value] = portset
            self._next_portset = max(self._next_portset, key.value + 1)
            # policy ids in use, even if their names were lost (np_policies not recovered)
            next_policy = max(next_policy, max(_policy_ids(portset), default=0) + 1)
        live: set[int] = set()
        for raw_key in list(self.rules):
            trie_id = int.from_bytes(raw_key, "little")
            entries = self.read_trie(trie_id)
            if entries is None:
                continue
            live.add(trie_id)
            if not os.path.exists(self._trie_pin(trie_id)):
                self._pin_trie(trie_id)  # state from before tries were pinned
            trie = _Trie(trie_id, entries.digest(), frozenset(self._ids_of(entries)))
            self._tries[trie_id] = trie
            self._trie_by_key[trie.digest] = trie_id
            for ps_id in trie.portsets:
                self._portset_ref(ps_id).refs += 1
            self._next_trie = max(self._next_trie, trie_id + 1)
        for name in os.listdir(os.path.join(self.pin_root, TRIES_DIR)):
            if not name.isdigit() or int(name) not in live:
                # retired by a process that stopped before unpinning it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pin_root, TRIES_DIR, name))
        for key, pod in self.pods.items():
            rec = _Record(pod.pod_id, pod.ingress_trie, pod.egress_trie)
            self._records[key.value] = rec
            for trie_id in (pod.ingress_trie, pod.egress_trie):
                if trie_id in self._tries:
                    self._tries[trie_id].refs += 1
        self.names.adopt(
            floor_pod=max((r.pod_id + 1 for r in self._records.values()), default=1),
            floor_policy=next_policy,
        )
        for portset in self._portsets:
            self.names.reference_policies(_policy_ids(portset), +1)
        self.names.retire_unreferenced_policies()
        log.info(
            "datapath.adopted",
            pin_root=self.pin_root,
            pods=len(self._records),
            tries=len(self._tries),
            portsets=len(self._portsets),
        )

    def _portset_ref(self, portset_id: int) -> _PortsetRef:
        return self._portsets[self._portset_by_id[portset_id]]

    def _ids_of(self, compiled: CompiledRules) -> Iterable[int]:
        for ps in compiled.entries.values():
            if not ps.allows_nothing:
                yield self._portsets[ps].id

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
        """Delete the names whose grace period is over; (pods, policies) freed."""
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
        trie_ids = self._install_tries(needed)

        records: dict[int, lay.NpPod] = {}
        for ifindex, pod in pods.items():
            records[ifindex] = lay.NpPod(
                pod_id=pod.pod_id,
                ingress_trie=_trie_of(pod.ingress, trie_ids),
                egress_trie=_trie_of(pod.egress, trie_ids),
                ingress_state=pod.ingress.state,
                egress_state=pod.egress.state,
            )
        # a batch of single-element writes: each pod switches atomically
        self.pods.update_many((U32(i), rec) for i, rec in records.items())
        for ifindex, rec in records.items():
            self._set_record(ifindex, _Record(rec.pod_id, rec.ingress_trie, rec.egress_trie))

    def remove_pods(self, ifindexes: Iterable[int]) -> None:
        """Forget pods' records (their packets then pass as unknown until detached)."""
        for ifindex in ifindexes:
            self.pods.delete(U32(ifindex))
            self._set_record(ifindex, None)

    def _set_record(self, ifindex: int, rec: _Record | None) -> None:
        old = self._records.pop(ifindex, None)
        if rec is not None:
            self._records[ifindex] = rec
            for t in (rec.ingress_trie, rec.egress_trie):
                if t in self._tries:
                    self._tries[t].refs += 1
        if old is not None:
            for t in (old.ingress_trie, old.egress_trie):
                if t in self._tries:
                    self._tries[t].refs -= 1

    def _install_tries(self, needed: Mapping[bytes, CompiledRules]) -> dict[bytes, int]:
        ids: dict[bytes, int] = {}
        new: list[tuple[int, CompiledRules, Map]] = []
        installed = False
        try:
            for key, compiled in needed.items():
                if key in self._trie_by_key:
                    ids[key] = self._trie_by_key[key]
                    continue
                trie_id = self._next_trie
                self._next_trie += 1
                self._install_portsets(compiled)
                built = self._build_trie(trie_id, compiled)
                new.append((trie_id, compiled, built))
                # pinned: explain, the CLI and a restarted agent open it by path, which
                # needs no CAP_SYS_ADMIN (opening a map by id does)
                try:
                    built.pin(self._trie_pin(trie_id))
                except BpfError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    self.restore_pins()  # the tries directory was removed: re-create
                    built.pin(self._trie_pin(trie_id))
                ids[key] = trie_id
            if new:
                self.rules.update_batch(
                    b"".join(bytes(U32(t)) for t, _, _ in new),
                    b"".join(bytes(U32(m.fd)) for _, _, m in new),
                )
                installed = True
                for trie_id, compiled, _ in new:
                    key = compiled.digest()
                    trie = _Trie(trie_id, key, frozenset(self._ids_of(compiled)))
                    self._tries[trie_id] = trie
                    self._trie_by_key[key] = trie_id
                    for ps_id in trie.portsets:
                        self._portset_ref(ps_id).refs += 1
        finally:
            for trie_id, _, m in new:
                m.close()  # the outer map holds its own reference
                if not installed:
                    self._unpin_trie(trie_id)
        return ids

    def restore_pins(self) -> list[str]:
        """Pin again whatever of ours lost its pin while we run (someone removed files
        under the pin root): the programs, the maps, the live tries. Enforcement never
        depended on the pins (the programs hold the maps); the CLI, the other node
        processes and a restart do. Returns what was restored."""
        restored: list[str] = []
        for sub in ("maps", "programs", TRIES_DIR):
            os.makedirs(os.path.join(self.pin_root, sub), mode=0o700, exist_ok=True)
        for name, prog in self.obj.programs.items():
            path = os.path.join(self.pin_root, "programs", name)
            if not os.path.exists(path):
                prog.pin(path)
                restored.append(path)
        for name, m in self.obj.maps.items():
            path = os.path.join(self.pin_root, "maps", name)
            if not name.startswith(".") and not os.path.exists(path):
                m.pin(path)
                restored.append(path)
        for trie_id in list(self._tries):
            path = self._trie_pin(trie_id)
            if not os.path.exists(path):
                self._pin_trie(trie_id)
                restored.append(path)
        if restored:
            log.warning(
                "datapath.pins_restored",
                count=len(restored),
                paths=restored[:8],
                reason="pins under the pin root were removed while the agent ran",
            )
        return restored

    def _trie_pin(self, trie_id: int) -> str:
        return os.path.join(self.pin_root, TRIES_DIR, str(trie_id))

    def _pin_trie(self, trie_id: int) -> None:
        raw = self.rules.lookup(bytes(U32(trie_id)))
        if raw is None:
            return
        with Map.from_id(int.from_bytes(raw, "little")) as inner:
            inner.pin(self._trie_pin(trie_id))

    def _unpin_trie(self, trie_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._trie_pin(trie_id))

    def _build_trie(self, trie_id: int, compiled: CompiledRules) -> Map:
        trie = Map.create(
            map_type=MAP_TYPE_LPM_TRIE,
            name=f"np_t_{trie_id}",
            key_size=ctypes.sizeof(lay.NpLpmKey),
            value_size=ctypes.sizeof(lay.NpLpmValue),
            max_entries=max(1, len(compiled.entries)),
            flags=BPF_F_NO_PREALLOC,
        )
        try:
            ids = self._portsets
            keys = b"".join(
                _LPM_KEY.pack(
                    NP_PREFIX_BITS + p.length, p.family, p.value.to_bytes(_WIDTH[p.family], "big")
                )
                for p in compiled.entries
            )
            values = b"".join(
                _U32.pack(lay.NP_PORTSET_NONE if ps.allows_nothing else ids[ps].id)
                for ps in compiled.entries.values()
            )
            trie.update_batch(keys, values)
        except BaseException:
            trie.close()
            raise
        return trie

    def _install_portsets(self, compiled: CompiledRules) -> None:
        keys = bytearray()
        values = bytearray()
        added: list[Portset] = []
        for ps in set(compiled.entries.values()):
            if ps.allows_nothing or ps in self._portsets:
                continue
            ps_id = self._next_portset
            self._next_portset += 1
            keys += bytes(U32(ps_id))
            values += bytes(portset_to_map(ps))
            self._portsets[ps] = _PortsetRef(ps_id)
            self._portset_by_id[ps_id] = ps
            added.append(ps)
        self.portsets.raw.update_batch(bytes(keys), bytes(values))
        for ps in added:
            self.names.reference_policies(_policy_ids(ps), +1)

    def collect_garbage(self) -> tuple[int, int]:
        """Remove retired tries, then port sets no trie uses. Returns (tries, portsets)."""
        retired = [t for t in self._tries.values() if t.refs <= 0]
        if retired:
            # one batched delete: the kernel waits an RCU grace period before returning
            self.rules.delete_batch(b"".join(bytes(U32(t.id)) for t in retired))
            for t in retired:
                self._unpin_trie(t.id)
                del self._tries[t.id]
                del self._trie_by_key[t.digest]
                for ps_id in t.portsets:
                    self._portset_ref(ps_id).refs -= 1
        unused = [(ps, ref) for ps, ref in self._portsets.items() if ref.refs <= 0]
        if unused:
            self.portsets.raw.delete_batch(b"".join(bytes(U32(ref.id)) for _, ref in unused))
            for ps, ref in unused:
                del self._portsets[ps]
                del self._portset_by_id[ref.id]
                self.names.reference_policies(_policy_ids(ps), -1)
        return len(retired), len(unused)

    # ---- reading back ---------------------------------------------------------------
    def read_trie(self, trie_id: int) -> CompiledRules | None:
        """A trie's entries as stored in the kernel, port sets included: read from the
        maps, not from this object's bookkeeping (what explain and the CLI show)."""
        raw = self.rules.lookup(bytes(U32(trie_id)))
        if raw is None:
            return None
        inner_id = int.from_bytes(raw, "little")
        out = CompiledRules()
        portsets: dict[int, Portset] = {}
        try:
            inner = Map.from_pin(self._trie_pin(trie_id))
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            inner = Map.from_id(inner_id)  # not pinned (yet): needs CAP_SYS_ADMIN
        with inner:
            for k, v in inner.items():
                key = lay.NpLpmKey.from_buffer_copy(k)
                ps_id = lay.NpLpmValue.from_buffer_copy(v).portset_id
                if ps_id not in portsets:
                    portsets[ps_id] = self.read_portset(ps_id)
                out.entries[prefix_from_key(key)] = portsets[ps_id]
        return out

    def read_portset(self, portset_id: int) -> Portset:
        if portset_id == lay.NP_PORTSET_NONE:
            return NOTHING
        raw = self.portsets.lookup(U32(portset_id))
        if raw is None:
            raise BpfError(2, f"port set {portset_id} referenced by a trie is missing")
        return portset_from_map(raw)

    def policy_name(self, policy_id: int) -> str:
        """namespace/name of a policy id, from the pinned names ("" if unknown)."""
        meta = self.policies.lookup(U32(policy_id)) if policy_id else None
        return f"{meta.namespace_.decode()}/{meta.name.decode()}" if meta else ""

    def is_host_address(self, address: lay.Address) -> bool:
        return self.host_addrs.lookup(host_key(address)) is not None

    def pod_record(self, ifindex: int) -> lay.NpPod | None:
        return self.pods.lookup(U32(ifindex))

    def pod_ifindexes(self) -> list[int]:
        return sorted(self._records)

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """table -> (entries in use, capacity), from the bookkeeping (cheap; may be read
        from the event loop: it only takes lengths)."""
        out = {
            lay.MAP_PODS: (len(self._records), self.pods.raw.max_entries),
            lay.MAP_RULES: (len(self._tries), self.rules.max_entries),
            lay.MAP_PORTSETS: (len(self._portsets), self.portsets.raw.max_entries),
        }
        out.update(self.names.occupancy())
        return out

    def counts(self) -> dict[str, int]:
        """Live tries, port sets and their references (bookkeeping, for status output).
        Read from the event loop while the worker thread may change the tables: the trie
        table is copied in one C-level call (under the GIL) before it is walked."""
        tries = list(self._tries.values())
        return {
            "pods": len(self._records),
            "tries": len(tries),
            "portsets": len(self._portsets),
            "retired_tries": sum(1 for t in tries if t.refs <= 0),
        }

    # ---- node-wide settings ---------------------------------------------------------
    def set_event_flags(self, *, emit_deny: bool, emit_allow: bool) -> None:
        flags = (lay.NP_CFG_EMIT_DENY if emit_deny else 0) | (
            lay.NP_CFG_EMIT_ALLOW if emit_allow else 0
        )
        self.config.update(U32(0), lay.NpConfig(flags=flags))

    def set_host_addresses(self, addresses: Iterable[lay.Address]) -> None:
        """The node's own addresses: traffic between them and any pod always passes."""
        want = {bytes(host_key(a)) for a in addresses}
        have = {bytes(k) for k in self.host_addrs}
        for raw in have - want:
            self.host_addrs.raw.delete(raw)
        for raw in want - have:
            self.host_addrs.raw.update(raw, bytes(U32(1)))

    def stats(self) -> dict[str, int]:
        """Datapath counters summed over CPUs."""
        totals = dict.fromkeys((f[0] for f in lay.NpStats._fields_), 0)
        for cpu in self.stats_map.lookup_percpu(U32(0)):
            for name in totals:
                totals[name] += getattr(cpu, name)
        return totals


def _policy_ids(portset: Portset) -> set[int]:
    ids = {r.policy_id for r in portset.rules}
    if portset.any_policy is not None:
        ids.add(portset.any_policy)
    ids.discard(0)
    return ids


SIZES_ENV = "NP_MAP_SIZES"  # tests only: "np_pod_meta=32,np_policies=32" (small capacities)
GRACE_ENV = "NP_ID_GRACE"  # tests only: seconds a retired id keeps its name


def _sizes_from_env() -> dict[str, int]:
    out: dict[str, int] = {}
    for part in os.environ.get(SIZES_ENV, "").split(","):
        name, sep, value = part.strip().partition("=")
        if sep and value.isdigit():
            out[name] = int(value)
    return out


def _grace_from_env() -> float:
    try:
        return float(os.environ.get(GRACE_ENV, GRACE))
    except ValueError:
        return GRACE


# Maps whose contents may be dropped when their layout changed between versions (an
# upgrade that adds a counter): the pin is removed and the map created anew. Every other
# map holds enforcement state; a layout change there is refused by libbpf at load.
_DISPOSABLE = {lay.MAP_STATS: lay.NpStats}


def _recreate_stale_counters(map_dir: str) -> None:
    for name, struct_type in _DISPOSABLE.items():
        path = os.path.join(map_dir, name)
        if not os.path.exists(path):
            continue
        with Map.from_pin(path) as pinned:
            have = pinned.raw_value_size
        want = ctypes.sizeof(struct_type)
        if have != want:
            os.unlink(path)
            log.warning(
                "datapath.map_recreated",
                map=name,
                old_value_size=have,
                new_value_size=want,
                reason="layout changed by an upgrade; its counters start again from zero",
            )


class PinnedSizeError(ValueError):
    """A requested map size differs from the size of the map already pinned."""


def _sized(map_dir: str, name: str, wanted: int | None, what: str) -> int | None:
    path = os.path.join(map_dir, name)
    if not os.path.exists(path):
        return wanted
    with Map.from_pin(path) as pinned:
        have = pinned.max_entries
    if wanted is not None and wanted != have:
        raise PinnedSizeError(
            f"{what} {wanted} differs from {have} of the map pinned at {path}; it cannot "
            f"change while the map exists (remove the pin, e.g. by rebooting the node, "
            f"or keep {have})"
        )
    return have


# ---- conversions between models and map structs ---------------------------------------
_LPM_KEY = lay.packer(lay.NpLpmKey)
_U32 = struct.Struct("<I")
_WIDTH = {lay.NP_FAMILY_IPV4: 4, lay.NP_FAMILY_IPV6: 16}
NP_PREFIX_BITS = lay.NP_LPM_FAMILY_BITS
assert _LPM_KEY.size == ctypes.sizeof(lay.NpLpmKey)


def _trie_of(d: DirectionPolicy, ids: Mapping[bytes, int]) -> int:
    if d.state != lay.NP_STATE_POLICIES_APPLIED or d.rules is None:
        return lay.NP_TRIE_NONE
    return ids[d.rules.digest()]


def lpm_key(prefix: Prefix) -> lay.NpLpmKey:
    width = 4 if prefix.family == lay.NP_FAMILY_IPV4 else 16
    key = lay.NpLpmKey(prefixlen=lay.NP_LPM_FAMILY_BITS + prefix.length, family=prefix.family)
    ctypes.memmove(key.addr, prefix.value.to_bytes(width, "big"), width)
    return key


def prefix_from_key(key: lay.NpLpmKey) -> Prefix:
    width = 4 if key.family == lay.NP_FAMILY_IPV4 else 16
    value = int.from_bytes(bytes(key.addr)[:width], "big")
    return Prefix(key.family, key.prefixlen - lay.NP_LPM_FAMILY_BITS, value)


def host_key(address: lay.Address) -> lay.NpAddr:
    key = lay.NpAddr(family=lay.addr_family(address))
    ctypes.memmove(key.addr, lay.addr_bytes(address), 16)
    return key


def portset_to_map(ps: Portset) -> lay.NpPortset:
    out = lay.NpPortset()
    if ps.any_policy is not None:
        out.flags = lay.NP_PORTSET_F_ANY
        out.any_policy = ps.any_policy
        return out
    out.count = len(ps.rules)
    for i, r in enumerate(ps.rules):
        out.rules[i] = lay.NpPortRule(
            policy_id=r.policy_id, start_port=r.start, end_port=r.end, protocol=r.protocol
        )
    return out


def portset_from_map(raw: lay.NpPortset) -> Portset:
    if raw.flags & lay.NP_PORTSET_F_ANY:
        return Portset(any_policy=raw.any_policy)
    rules = tuple(
        PortRule(r.protocol, r.start_port, r.end_port, r.policy_id)
        for r in raw.rules[: min(raw.count, lay.NP_MAX_PORT_RULES)]
    )
    return Portset(rules=rules)
