"""Names for the datapath's ids: pods (``np_pod_meta``) and policies (``np_policies``).

Every id has an owner and an end:

- a **pod id** belongs to one pod UID. When the UID is no longer live (the pod was
  deleted, or re-created under the same name with a new UID) the id *retires*; after
  ``GRACE`` seconds, if no pod record still carries it, its name entry is deleted;
- a **policy id** belongs to one policy name. Installed port sets reference it (their
  rules carry it); when the last such port set is collected the id retires and, after
  ``GRACE`` seconds, its name entry is deleted. Used again before then, it simply stays.

Why a grace period: decision events carry ids, and the flow-log shipper names them when
it drains the ring buffer, normally milliseconds later. ``GRACE`` (60 s) covers a
shipper that is busy or restarting; an event older than that is logged with its id and
no name, never with another object's name.

Ids are never reused: each map's key 0 (id 0 means "none" everywhere) holds the next id
to hand out, written before any entry that uses it, so a restart never hands out an id
again, even one whose entry was deleted before the restart. Adoption keeps every named
id; those no longer live retire when the agent has listed the cluster
(:meth:`Registry.retire_pods_except`) or collected garbage.

Not thread-safe: the datapath's owner (the agent's worker thread) calls it.
"""

from __future__ import annotations

import ctypes
import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from bpf import layout as lay
from bpf.codec import meta_ref
from bpf.errors import BpfError
from bpf.maps import BPF_NOEXIST, TypedMap

log = structlog.get_logger("bpf.registry")

GRACE = 60.0  # seconds a retired id keeps its name (see the module docstring)
WATERMARK_KEY = 0
_MARK = b"next:"
U32 = ctypes.c_uint32


class TableFullError(BpfError):
    """A table the agent writes is full: nothing more fits until entries are freed."""

    def __init__(self, table: str, capacity: int) -> None:
        super().__init__(28, f"map {table}: full ({capacity} entries)")  # ENOSPC
        self.table = table
        self.capacity = capacity


@dataclass
class _Retiring:
    id: int
    deadline: float


def _watermark(raw: bytes) -> int:
    text = raw.split(b"\0", 1)[0]
    if text.startswith(_MARK) and text[len(_MARK) :].isdigit():
        return int(text[len(_MARK) :])
    return 0


class Registry:
    def __init__(
        self,
        *,
        pod_meta: TypedMap[ctypes.c_uint32, lay.NpPodMeta],
        policies: TypedMap[ctypes.c_uint32, lay.NpPolicyMeta],
        pod_drops: TypedMap[ctypes.c_uint32, lay.NpPodDrops] | None = None,
        clock: Callable[[], float] = time.monotonic,
        grace: float = GRACE,
    ) -> None:
        self.pod_meta = pod_meta
        self.policies = policies
        # each pod id's denial counters (np_pod_drops): created and deleted with the id
        self.pod_drops = pod_drops
        self.clock = clock
        self.grace = grace
        self.pod_capacity = pod_meta.raw.max_entries - 1  # key 0 holds the watermark
        self.policy_capacity = policies.raw.max_entries - 1
        self._pods: dict[str, int] = {}  # uid -> id (live or retiring)
        self._pod_names: dict[int, str] = {}  # id -> uid
        self._policies: dict[tuple[str, str], int] = {}  # (namespace, name) -> id
        self._policy_names: dict[int, tuple[str, str]] = {}
        self._policy_refs: dict[int, int] = {}  # id -> installed port sets
        self._retiring_pods: dict[str, _Retiring] = {}  # uid ->
        self._retiring_policies: dict[int, float] = {}  # id -> deadline
        self._next_pod = 1
        self._next_policy = 1

    # ---- adoption -------------------------------------------------------------------
    def adopt(self, *, floor_pod: int = 1, floor_policy: int = 1) -> None:
        """Read the pinned names and watermarks. ``floor_*``: ids seen in use elsewhere
        (records, port sets), so that none is handed out again even if its name was lost."""
        self._next_pod = floor_pod
        self._next_policy = floor_policy
        for key, meta in self.pod_meta.items():
            if key.value == WATERMARK_KEY:
                self._next_pod = max(self._next_pod, _watermark(bytes(meta.uid)))
                continue
            uid = meta.uid.decode()
            self._pods[uid] = key.value
            self._pod_names[key.value] = uid
            self._next_pod = max(self._next_pod, key.value + 1)
        if self.pod_drops is not None:  # ids named before the counters existed get theirs
            counted = {k.value for k in self.pod_drops}
            for pod_id in set(self._pod_names) - counted:
                self._count_drops(pod_id)
            for pod_id in counted - set(self._pod_names):
                self.pod_drops.delete(U32(pod_id))  # an id whose name is gone
        for key, pol in self.policies.items():
            if key.value == WATERMARK_KEY:
                self._next_policy = max(self._next_policy, _watermark(bytes(pol.name)))
                continue
            name = meta_ref(pol)
            self._policies[name] = key.value
            self._policy_names[key.value] = name
            self._policy_refs.setdefault(key.value, 0)
            self._next_policy = max(self._next_policy, key.value + 1)

    # ---- pods -----------------------------------------------------------------------
    def register_pod(self, *, namespace: str, name: str, uid: str) -> int:
        """The pod's id (stable for its UID; never another pod's)."""
        pod_id = self._pods.get(uid)
        if pod_id is not None:
            self._retiring_pods.pop(uid, None)
            return pod_id
        if len(self._pods) >= self.pod_capacity:
            raise TableFullError(lay.MAP_POD_META, self.pod_capacity)
        pod_id = self._next_pod
        self._next_pod += 1
        self.pod_meta.update(
            U32(WATERMARK_KEY), lay.NpPodMeta(uid=_MARK + str(self._next_pod).encode())
        )
        self.pod_meta.update(
            U32(pod_id),
            lay.NpPodMeta(
                namespace_=namespace.encode()[:63], name=name.encode()[:255], uid=uid.encode()[:39]
            ),
        )
        self._pods[uid] = pod_id
        self._pod_names[pod_id] = uid
        self._count_drops(pod_id)
        return pod_id

    def _count_drops(self, pod_id: int) -> None:
        """The id's counters, zero unless they exist already (a re-registration)."""
        if self.pod_drops is None:
            return
        try:
            self.pod_drops.update(U32(pod_id), lay.NpPodDrops(), flags=BPF_NOEXIST)
        except BpfError as exc:
            if exc.errno != errno.EEXIST:
                raise

    def pod_id(self, uid: str) -> int | None:
        return self._pods.get(uid)

    def retire_pods_except(self, live_uids: Iterable[str]) -> int:
        """Every pod id whose UID is not live starts its grace period. Returns how many
        started now."""
        live = set(live_uids)
        deadline = self.clock() + self.grace
        started = 0
        for uid, pod_id in self._pods.items():
            if uid not in live and uid not in self._retiring_pods:
                self._retiring_pods[uid] = _Retiring(pod_id, deadline)
                started += 1
        for uid in [u for u in self._retiring_pods if u in live]:
            del self._retiring_pods[uid]  # back (a re-list that briefly missed it)
        return started

    # ---- policies -------------------------------------------------------------------
    def policy_id(self, *, namespace: str, name: str) -> int:
        """The id that port rules carry for a policy."""
        key = (namespace, name)
        pid = self._policies.get(key)
        if pid is not None:
            return pid
        if len(self._policies) >= self.policy_capacity:
            raise TableFullError(lay.MAP_POLICIES, self.policy_capacity)
        pid = self._next_policy
        self._next_policy += 1
        self.policies.update(
            U32(WATERMARK_KEY), lay.NpPolicyMeta(name=_MARK + str(self._next_policy).encode())
        )
        self.policies.update(
            U32(pid), lay.NpPolicyMeta(namespace_=namespace.encode()[:63], name=name.encode()[:255])
        )
        self._policies[key] = pid
        self._policy_names[pid] = key
        self._policy_refs[pid] = 0
        # unreferenced until a port set carrying it is installed: retires if none is
        self._retiring_policies[pid] = self.clock() + self.grace
        return pid

    def reference_policies(self, ids: Iterable[int], delta: int) -> None:
        """Installed (+1) or collected (-1) port sets carrying these policy ids."""
        now = self.clock()
        for pid in ids:
            if pid not in self._policy_refs:
                continue  # a name lost before adoption: nothing to free
            refs = self._policy_refs[pid] + delta
            self._policy_refs[pid] = refs
            if refs > 0:
                self._retiring_policies.pop(pid, None)
            elif pid not in self._retiring_policies:
                self._retiring_policies[pid] = now + self.grace

    def retire_unreferenced_policies(self) -> None:
        """After adoption: names no installed port set carries start their grace."""
        deadline = self.clock() + self.grace
        for pid, refs in self._policy_refs.items():
            if refs <= 0:
                self._retiring_policies.setdefault(pid, deadline)

    # ---- the end of ids ---------------------------------------------------------------
    def sweep(self, *, pods_in_records: set[int]) -> tuple[int, int]:
        """Delete the names whose grace period is over (a pod id still carried by a
        record waits). Returns (pods, policies) freed."""
        now = self.clock()
        pods = [
            uid
            for uid, r in self._retiring_pods.items()
            if r.deadline <= now and r.id not in pods_in_records
        ]
        for uid in pods:
            pod_id = self._retiring_pods.pop(uid).id
            self.pod_meta.delete(U32(pod_id))
            if self.pod_drops is not None:
                self.pod_drops.delete(U32(pod_id))
            del self._pods[uid]
            self._pod_names.pop(pod_id, None)
        policies = [
            pid
            for pid, deadline in self._retiring_policies.items()
            if deadline <= now and self._policy_refs.get(pid, 0) <= 0
        ]
        for pid in policies:
            del self._retiring_policies[pid]
            self.policies.delete(U32(pid))
            name = self._policy_names.pop(pid, None)
            if name is not None:
                self._policies.pop(name, None)
            self._policy_refs.pop(pid, None)
        if pods or policies:
            log.info("registry.freed", pods=len(pods), policies=len(policies))
        return len(pods), len(policies)

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """table -> (entries, capacity)."""
        return {
            lay.MAP_POD_META: (len(self._pods), self.pod_capacity),
            lay.MAP_POLICIES: (len(self._policies), self.policy_capacity),
        }
