"""The interned store of rule tries and port sets.

Tries (``np_rules`` inner LPM maps) and port sets (``np_portsets``) are immutable and
interned by content: pods with equal rules share one trie, equal port sets are stored
once. :meth:`RuleStore.install` builds missing tries (one batched insert into the outer
map, which costs one RCU grace period however many tries it carries); a trie no record
uses any more is *retired* (``refs`` 0) and removed by :meth:`RuleStore.collect_garbage`:
the batched delete from the outer map returns only after an RCU grace period, after
which no program can still be reading the retired port sets. Policy ids carried by port
sets are referenced in the registry while the port set lives.

Inserting into the outer map waits for an RCU grace period (several ms) inside the
syscall. To keep that wait out of a change's path, a pool of empty tries is kept in
``np_rules`` already (:meth:`RuleStore.refill_pool`, when programming is quiet): a new
rule set fills a pooled trie, which no record points at yet, and the pod record then
points at it. Only when the pool is empty (a burst, a cold start) is a trie inserted on
the path, batched as before. Pooled tries are pinned like the others; after a restart
the unreferenced empty ones return to the pool.

Not thread-safe: the datapath's owner calls it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from bpf import layout as lay
from bpf.codec import (
    U32_PACK,
    inline_portset,
    inline_value,
    lpm_key_bytes,
    policy_ids,
    portset_from_map,
    portset_to_map,
    prefix_from_key,
)
from bpf.errors import BpfError
from bpf.maps import BPF_F_NO_PREALLOC, MAP_TYPE_LPM_TRIE, Map, TypedMap
from bpf.pins import PinPaths
from bpf.registry import Registry
from bpf.ruleset import NOTHING, CompiledRules, Portset, Prefix

log = structlog.get_logger("bpf.store")
_ANY_PREFIX = Prefix(lay.NP_FAMILY_IPV4, 0, 0)
U32 = ctypes.c_uint32
POOL_SIZE = 32  # empty tries kept ready in np_rules
# A pooled trie's capacity: a limit only (BPF_F_NO_PREALLOC allocates per entry). Larger
# rule sets get a trie of their own size, inserted on the path.
POOL_TRIE_ENTRIES = 1 << 20
_EMPTY_DIGEST = CompiledRules().digest()


@dataclass
class Trie:
    id: int
    digest: bytes
    portsets: frozenset[int]
    refs: int = 0
    # policy ids its entries carry inline (no port set: see NP_LPM_INLINE), referenced
    # in the registry while the trie lives
    policies: frozenset[int] = frozenset()


@dataclass
class _PortsetRef:
    id: int
    refs: int = 0


class RuleStore:
    def __init__(
        self,
        *,
        rules: Map,
        portsets: TypedMap[ctypes.c_uint32, lay.NpPortset],
        names: Registry,
        pins: PinPaths,
    ) -> None:
        self.rules = rules
        self.portsets = portsets
        self.names = names
        self.pins = pins
        self.tries: dict[int, Trie] = {}
        self._trie_by_key: dict[bytes, int] = {}
        self._portsets: dict[Portset, _PortsetRef] = {}
        self._portset_by_id: dict[int, Portset] = {}
        self._next_trie = 1
        self._next_portset = 1
        # empty tries already in np_rules, unreferenced, ready to be filled (id, map)
        self._pool: list[tuple[int, Map]] = []
        # adopted tries whose references are not read yet (see adopt), and those that
        # could not be read
        self._unread: set[int] = set()
        self._unreadable: set[int] = set()

    # ---- adoption -------------------------------------------------------------------
    def adopt(self) -> int:
        """Take over the pinned tries and port sets; returns the lowest policy id never
        used by the port sets (ids stay unique even if their names were lost).

        Tries are not read here (a node's tries hold hundreds of thousands of entries:
        seconds of reading): each is known by its id, and an empty one as such (one key
        read). What the others reference (their port sets, their inline policies, their
        content digest) is read after adoption (:meth:`read_tries`, off the worker
        thread, then :meth:`apply_read`); until every trie is read, no port set is
        collected and pods needing equal rules build a trie of their own."""
        next_policy = 1
        for key, ps in self.portsets.items():
            portset = portset_from_map(ps)
            self._portsets[portset] = _PortsetRef(key.value)
            self._portset_by_id[key.value] = portset
            self._next_portset = max(self._next_portset, key.value + 1)
            next_policy = max(next_policy, max(policy_ids(portset), default=0) + 1)
        live: set[int] = set()
        for raw_key in list(self.rules):
            trie_id = int.from_bytes(raw_key, "little")
            if not os.path.exists(self.pins.trie(trie_id)):
                self._pin_trie(trie_id)  # state from before tries were pinned
            try:
                inner = Map.from_pin(self.pins.trie(trie_id))
            except BpfError:
                continue  # gone meanwhile
            with inner:
                empty = next(iter(inner), None) is None
            live.add(trie_id)
            if empty:
                trie = Trie(trie_id, _EMPTY_DIGEST, frozenset())
                self._trie_by_key.setdefault(trie.digest, trie_id)
            else:
                trie = Trie(trie_id, b"unread:%d" % trie_id, frozenset())
                self._unread.add(trie_id)
            self.tries[trie_id] = trie
            self._next_trie = max(self._next_trie, trie_id + 1)
        for name in os.listdir(self.pins.tries):
            if not name.isdigit() or int(name) not in live:
                # retired by a process that stopped before unpinning it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pins.tries, name))
        return next_policy

    @property
    def unread(self) -> int:
        """Adopted tries whose references are not read yet (see adopt)."""
        return len(self._unread)

    @property
    def references_known(self) -> bool:
        """Every trie's references are counted: port sets and names may be freed."""
        return not self._unread and not self._unreadable

    def unread_ids(self, limit: int) -> list[int]:
        return sorted(self._unread)[:limit]

    def read_tries(self, ids: Iterable[int]) -> dict[int, tuple[bytes, set[int], set[int]]]:
        """(digest, port-set ids, inline policy ids) of each trie, read from the kernel
        only: no bookkeeping is touched, so any thread may call it. A trie gone
        meanwhile (collected) is left out."""
        out: dict[int, tuple[bytes, set[int], set[int]]] = {}
        for trie_id in ids:
            try:
                read = self._read_trie(trie_id)
            except BpfError:
                continue
            if read is not None:
                entries, portsets, inline = read
                out[trie_id] = (entries.digest(), portsets, inline)
        return out

    def apply_read(
        self, read: Mapping[int, tuple[bytes, set[int], set[int]]], asked: Iterable[int] = ()
    ) -> None:
        """What read_tries found becomes the tries' bookkeeping (the owner's thread). A
        trie ``asked`` for that is still here but could not be read is set apart: what it
        references stays unknown, so port sets and names stay uncollected (logged)."""
        for trie_id in asked:
            if trie_id not in read and trie_id in self.tries and trie_id in self._unread:
                self._unread.discard(trie_id)
                self._unreadable.add(trie_id)
                log.error(
                    "store.trie_unreadable",
                    trie=trie_id,
                    effect="port sets and policy names are not collected until a restart",
                )
        for trie_id, (digest, portsets, inline) in read.items():
            trie = self.tries.get(trie_id)
            if trie is None or trie_id not in self._unread:
                continue
            self._unread.discard(trie_id)
            trie.digest, trie.portsets, trie.policies = (
                digest,
                frozenset(portsets),
                frozenset(inline),
            )
            self._trie_by_key.setdefault(digest, trie_id)
            for ps_id in portsets:
                self._portset_ref(ps_id).refs += 1
            self.names.reference_policies(inline, +1)
        # ids asked for but gone (collected meanwhile) are read no more
        self._unread &= set(self.tries)

    def reclaim_pool(self) -> int:
        """After adoption, once the records' references are counted: the unreferenced
        empty tries of a pool's size return to the pool (no outer-map write)."""
        for trie_id, trie in list(self.tries.items()):
            if trie.refs > 0 or trie.digest != _EMPTY_DIGEST or len(self._pool) >= POOL_SIZE:
                continue
            try:
                inner = Map.from_pin(self.pins.trie(trie_id))
            except BpfError:
                continue
            if inner.max_entries != POOL_TRIE_ENTRIES:
                inner.close()
                continue
            del self.tries[trie_id]
            if self._trie_by_key.get(trie.digest) == trie_id:
                del self._trie_by_key[trie.digest]
            self._pool.append((trie_id, inner))
        return len(self._pool)

    def refill_pool(self, size: int = POOL_SIZE) -> int:
        """Top the pool up to ``size`` empty tries: one batched insert (one RCU grace
        period). Returns how many were added. The agent runs the three steps apart, the
        middle one off the datapath worker (see agent.enforcer, "trie-pool")."""
        made = self.make_pooled(self.reserve_pool_ids(size))
        self.add_pooled(made)
        return len(made)

    def reserve_pool_ids(self, size: int = POOL_SIZE) -> list[int]:
        """Trie ids for the tries the pool lacks (the owner's thread)."""
        ids = list(range(self._next_trie, self._next_trie + max(0, size - len(self._pool))))
        self._next_trie += len(ids)
        return ids

    def make_pooled(self, ids: list[int]) -> list[tuple[int, Map]]:
        """Create, pin and insert empty tries under ``ids``: touches only the kernel and
        no bookkeeping, so it may run on any thread (the insert waits for an RCU grace
        period). A trie made but never added is an unreferenced empty trie: a restart
        takes it back (reclaim_pool)."""
        made: list[tuple[int, Map]] = []
        inserted = False
        try:
            for trie_id in ids:
                m = self._create_trie(trie_id, POOL_TRIE_ENTRIES)
                made.append((trie_id, m))
                m.pin(self.pins.trie(trie_id))
            if made:
                self.rules.update_batch(
                    b"".join(bytes(U32(t)) for t, _ in made),
                    b"".join(bytes(U32(m.fd)) for _, m in made),
                )
            inserted = True
        finally:
            if not inserted:
                for trie_id, m in made:
                    m.close()
                    self._unpin_trie(trie_id)
        return made

    def add_pooled(self, made: list[tuple[int, Map]]) -> None:
        """The tries make_pooled inserted join the pool (the owner's thread)."""
        self._pool.extend(made)

    @property
    def pooled(self) -> int:
        return len(self._pool)

    def close_pool(self) -> None:
        """Close the pool's descriptors (the tries stay in np_rules, pinned)."""
        for _, m in self._pool:
            m.close()
        self._pool.clear()

    def reference_adopted_policies(self) -> None:
        """The policies the adopted port sets carry (the tries' inline ones are
        referenced once the tries are read: apply_read)."""
        for portset in self._portsets:
            self.names.reference_policies(policy_ids(portset), +1)

    def _new_trie(self, trie_id: int, compiled: CompiledRules) -> Trie:
        """The bookkeeping of a trie built here: the port sets it references and the
        policies it carries inline."""
        portsets: set[int] = set()
        policies: set[int] = set()
        for ps in set(compiled.entries.values()):
            if inline_value(ps) is not None:
                policies |= policy_ids(ps)
            elif not ps.allows_nothing:
                portsets.add(self._portsets[ps].id)
        return Trie(trie_id, compiled.digest(), frozenset(portsets), policies=frozenset(policies))

    # ---- references from pod records ------------------------------------------------
    def ref(self, trie_ids: Iterable[int], delta: int) -> None:
        for t in trie_ids:
            if t in self.tries:
                self.tries[t].refs += delta

    # ---- installing -----------------------------------------------------------------
    def install(
        self, needed: Mapping[bytes, CompiledRules], restore_pins: Callable[[], object]
    ) -> dict[bytes, int]:
        """Trie ids for each needed rule set (by digest), building those missing."""
        ids: dict[bytes, int] = {}
        new: list[tuple[int, CompiledRules, Map]] = []
        installed = False
        try:
            for key, compiled in needed.items():
                if key in self._trie_by_key:
                    ids[key] = self._trie_by_key[key]
                    continue
                self._install_portsets(compiled)
                if self._pool and len(compiled.entries) <= POOL_TRIE_ENTRIES:
                    ids[key] = self._fill_pooled(compiled)
                    continue
                trie_id = self._next_trie
                self._next_trie += 1
                built = self._build_trie(trie_id, compiled)
                new.append((trie_id, compiled, built))
                # pinned: explain, the CLI and a restarted agent open it by path, which
                # needs no CAP_SYS_ADMIN (opening a map by id does)
                try:
                    built.pin(self.pins.trie(trie_id))
                except BpfError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    restore_pins()  # the tries directory was removed: re-create
                    built.pin(self.pins.trie(trie_id))
                ids[key] = trie_id
            if new:
                self.rules.update_batch(
                    b"".join(bytes(U32(t)) for t, _, _ in new),
                    b"".join(bytes(U32(m.fd)) for _, _, m in new),
                )
                installed = True
                for trie_id, compiled, _ in new:
                    self._record_trie(trie_id, compiled)
        finally:
            for trie_id, _, m in new:
                m.close()  # the outer map holds its own reference
                if not installed:
                    self._unpin_trie(trie_id)
        return ids

    def _fill_pooled(self, compiled: CompiledRules) -> int:
        """A pooled trie filled with ``compiled`` (no record points at it yet), recorded
        as live. If filling fails it leaves the pool as a retired trie (it may hold part
        of the entries), which collect_garbage removes."""
        trie_id, m = self._pool.pop()
        try:
            self._fill(m, compiled)
        except BaseException:
            self.tries[trie_id] = Trie(trie_id, b"spoiled:%d" % trie_id, frozenset())
            self._trie_by_key[self.tries[trie_id].digest] = trie_id
            raise
        finally:
            m.close()
        self._record_trie(trie_id, compiled)
        return trie_id

    def _record_trie(self, trie_id: int, compiled: CompiledRules) -> None:
        """A trie now in np_rules with ``compiled``: live, its port sets and inline
        policies referenced."""
        trie = self._new_trie(trie_id, compiled)
        self.tries[trie_id] = trie
        self._trie_by_key[trie.digest] = trie_id
        for ps_id in trie.portsets:
            self._portset_ref(ps_id).refs += 1
        self.names.reference_policies(trie.policies, +1)

    @staticmethod
    def _create_trie(trie_id: int, max_entries: int) -> Map:
        return Map.create(
            map_type=MAP_TYPE_LPM_TRIE,
            name=f"np_t_{trie_id}",
            key_size=ctypes.sizeof(lay.NpLpmKey),
            value_size=ctypes.sizeof(lay.NpLpmValue),
            max_entries=max(1, max_entries),
            flags=BPF_F_NO_PREALLOC,
        )

    def _fill(self, trie: Map, compiled: CompiledRules) -> None:
        if not compiled.entries:
            return
        entries = compiled.entries
        # a rule set has few distinct port sets: each one's value packed once (by
        # identity: hashing a port set costs more than the lookup saves)
        packed: dict[int, bytes] = {}
        for ps in entries.values():
            if id(ps) not in packed:
                packed[id(ps)] = U32_PACK.pack(self._value(ps))
        keys = b"".join(map(lpm_key_bytes, entries))
        values = b"".join([packed[id(ps)] for ps in entries.values()])
        trie.update_batch(keys, values)

    def _build_trie(self, trie_id: int, compiled: CompiledRules) -> Map:
        trie = self._create_trie(trie_id, len(compiled.entries))
        try:
            self._fill(trie, compiled)
        except BaseException:
            trie.close()
            raise
        return trie

    def _value(self, ps: Portset) -> int:
        """A trie entry's np_lpm_value: the decision inline, no port set, or its id."""
        inline = inline_value(ps)
        if inline is not None:
            return inline
        return lay.NP_PORTSET_NONE if ps.allows_nothing else self._portsets[ps].id

    def _install_portsets(self, compiled: CompiledRules) -> None:
        keys = bytearray()
        values = bytearray()
        added: list[Portset] = []
        for ps in set(compiled.entries.values()):
            if ps.allows_nothing or ps in self._portsets or inline_value(ps) is not None:
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
            self.names.reference_policies(policy_ids(ps), +1)

    def _portset_ref(self, portset_id: int) -> _PortsetRef:
        return self._portsets[self._portset_by_id[portset_id]]

    # ---- port sets held by learned addresses ---------------------------------------
    def hold(self, ps: Portset) -> int:
        """The np_lpm_value-style decision for ``ps`` (inline, or its port set's id,
        installed if needed and held until :meth:`release`)."""
        inline = inline_value(ps)
        if inline is not None:
            return inline
        if ps.allows_nothing:
            return lay.NP_PORTSET_NONE
        self._install_portsets(CompiledRules(entries={_ANY_PREFIX: ps}))
        ref = self._portsets[ps]
        ref.refs += 1
        return ref.id

    def release(self, ps: Portset) -> None:
        if inline_value(ps) is not None or ps.allows_nothing:
            return
        ref = self._portsets.get(ps)
        if ref is not None:
            ref.refs -= 1  # freed by collect_garbage once no trie or entry holds it

    # ---- the end of tries and port sets -------------------------------------------
    def collect_garbage(self) -> tuple[int, int]:
        """Remove retired tries, then port sets no trie uses. Returns (tries, portsets)."""
        retired = [t for t in self.tries.values() if t.refs <= 0]
        if retired:
            # one batched delete: the kernel waits an RCU grace period before returning
            self.rules.delete_batch(b"".join(bytes(U32(t.id)) for t in retired))
            for t in retired:
                self._unpin_trie(t.id)
                del self.tries[t.id]
                if self._trie_by_key.get(t.digest) == t.id:
                    del self._trie_by_key[t.digest]
                self._unread.discard(t.id)  # an unread trie referenced nothing yet
                self._unreadable.discard(t.id)
                for ps_id in t.portsets:
                    self._portset_ref(ps_id).refs -= 1
                self.names.reference_policies(t.policies, -1)
        if not self.references_known:
            return len(retired), 0  # port sets' references are not all known yet
        unused = [(ps, ref) for ps, ref in self._portsets.items() if ref.refs <= 0]
        if unused:
            self.portsets.raw.delete_batch(b"".join(bytes(U32(ref.id)) for _, ref in unused))
            for ps, ref in unused:
                del self._portsets[ps]
                del self._portset_by_id[ref.id]
                self.names.reference_policies(policy_ids(ps), -1)
        return len(retired), len(unused)

    # ---- pins ---------------------------------------------------------------------
    def restore_trie_pins(self) -> list[str]:
        """Pin the live tries whose pin is gone (one listing of the directory)."""
        present = set(os.listdir(self.pins.tries))
        restored = []
        for trie_id in [t for t in self.tries if str(t) not in present]:
            self._pin_trie(trie_id)
            restored.append(self.pins.trie(trie_id))
        return restored

    def _pin_trie(self, trie_id: int) -> None:
        raw = self.rules.lookup(bytes(U32(trie_id)))
        if raw is None:
            return
        with Map.from_id(int.from_bytes(raw, "little")) as inner:
            inner.pin(self.pins.trie(trie_id))

    def _unpin_trie(self, trie_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pins.trie(trie_id))

    # ---- reading back -------------------------------------------------------------
    def read_trie(self, trie_id: int) -> CompiledRules | None:
        """A trie's entries as stored in the kernel, port sets included: read from the
        maps, not from this object's bookkeeping (what explain and the CLI show)."""
        read = self._read_trie(trie_id)
        return read[0] if read is not None else None

    def _read_trie(self, trie_id: int) -> tuple[CompiledRules, set[int], set[int]] | None:
        """(entries, port-set ids referenced, policy ids carried inline)."""
        raw = self.rules.lookup(bytes(U32(trie_id)))
        if raw is None:
            return None
        inner_id = int.from_bytes(raw, "little")
        out = CompiledRules()
        portsets: dict[int, Portset] = {}
        inline: set[int] = set()
        try:
            inner = Map.from_pin(self.pins.trie(trie_id))
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            inner = Map.from_id(inner_id)  # not pinned (yet): needs CAP_SYS_ADMIN
        with inner:
            for k, v in inner.items():
                key = lay.NpLpmKey.from_buffer_copy(k)
                ps_id = lay.NpLpmValue.from_buffer_copy(v).portset_id
                if ps_id not in portsets:
                    if ps_id & lay.NP_LPM_INLINE:
                        portsets[ps_id] = inline_portset(ps_id)
                        inline |= policy_ids(portsets[ps_id])
                    else:
                        portsets[ps_id] = self.read_portset(ps_id)
                out.entries[prefix_from_key(key)] = portsets[ps_id]
        ids = {i for i in portsets if i != lay.NP_PORTSET_NONE and not i & lay.NP_LPM_INLINE}
        return out, ids, inline

    def read_portset(self, portset_id: int) -> Portset:
        if portset_id == lay.NP_PORTSET_NONE:
            return NOTHING
        raw = self.portsets.lookup(U32(portset_id))
        if raw is None:
            raise BpfError(2, f"port set {portset_id} referenced by a trie is missing")
        return portset_from_map(raw)

    # ---- bookkeeping ----------------------------------------------------------------
    def sizes(self) -> tuple[int, int, int]:
        """(live tries, retired tries, port sets). May be read from the event loop while
        the owner changes the tables: the trie table is copied in one C-level call (under
        the GIL) before it is walked."""
        tries = list(self.tries.values())
        return len(tries), sum(1 for t in tries if t.refs <= 0), len(self._portsets)
