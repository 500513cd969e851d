"""Keep every (Cluster)NetworkPolicy's (Cluster)PolicyEndpoints equal to its resolution.

ClusterNetworkPolicies are handled like NetworkPolicies: key ("", name) (no
NetworkPolicy has an empty namespace), their ClusterPolicyEndpoints written with the
same layouts, and resolved again on any pod, namespace or service change.

Four watches feed a snapshot of the cluster (NetworkPolicies, Pods, Namespaces,
Services) and of the PolicyEndpoints this resolver owns (by ownerReference; their specs
are kept as digests only). Changes are debounced, and only the policies a change can
affect are resolved again: a policy when it changes; the policies of a namespace when
one of its pods changes (their targets); and, on any pod, namespace or service change,
the policies whose rules depend on other objects (selector peers, named ports without
peers). Only objects whose content changed are written: updated in place with their
resourceVersion, created when a policy needs more of them, deleted when it needs fewer.
An object is never deleted and recreated just to change it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from common.clusterpolicyendpoint import KIND as CLUSTER_KIND
from common.clusterpolicyendpoint import POLICY_KIND as CLUSTER_POLICY_KIND
from common.kube import (
    CLUSTER_POLICY_ENDPOINTS,
    POLICY_ENDPOINTS,
    KubeClient,
    KubeError,
    Resource,
    WatchEvent,
)
from common.policyendpoint import API_VERSION, GROUP_ANNOTATION, KIND, TRIGGER_ANNOTATION
from common.watching import Replacing
from resolver.cluster import cluster_resolution
from resolver.layout import KINDS, Desired, Held, Layout, Plan, keys_of, packed, paired
from resolver.metrics import CLUSTER_POLICY_TYPE, POLICY_TYPE, ResolverMetrics
from resolver.resolve import APPLICATION_KIND, World, pod_from, resolution, service_from
from resolver.validate import InvalidPolicy

log = structlog.get_logger("resolver")

Obj = dict[str, Any]
Key = tuple[str, str]
MANAGED_BY = ("app.kubernetes.io/managed-by", "np-resolver")


def _key(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _endpoints_resource(namespace: str) -> Resource:
    """Where a policy's objects live: cluster-scoped for a ClusterNetworkPolicy."""
    return POLICY_ENDPOINTS if namespace else CLUSTER_POLICY_ENDPOINTS


ENDPOINT_KINDS = ("policyendpoints", "clusterpolicyendpoints")
POLICY_KIND_OF = {
    "networkpolicies": "NetworkPolicy",
    "applicationnetworkpolicies": APPLICATION_KIND,
    "clusternetworkpolicies": CLUSTER_POLICY_KIND,
}
OWNER_KINDS = ("NetworkPolicy", APPLICATION_KIND, CLUSTER_POLICY_KIND)
POLICY_KINDS = ("networkpolicies", "clusternetworkpolicies")


def _rv(obj: Obj) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class ResolverStats:
    writes: int = 0
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    conflicts: int = 0
    errors: int = 0
    invalid: int = 0
    bugs: int = 0  # policies whose resolution raised: a resolver bug, logged
    batches: int = 0
    observed_rv: int = 0
    last_batch_ms: float = 0.0


@dataclass
class Resolver:
    kube: KubeClient
    debounce: float = 0.05
    layout: Layout = "paired"
    chunk_size: int = 200
    metrics: ResolverMetrics = field(default_factory=ResolverMetrics)
    world: World = field(default_factory=World)
    policies: dict[Key, Obj] = field(default_factory=dict)
    owned: dict[str, dict[Key, Obj]] = field(default_factory=dict)  # policy uid -> PEs
    stats: ResolverStats = field(default_factory=ResolverStats)
    synced: dict[str, bool] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    _first_change: float = 0.0
    # policies to resolve at the next round (everything after a (re)list)
    dirty: set[Key] = field(default_factory=set)
    all_dirty: bool = True
    _by_namespace: dict[str, set[Key]] = field(default_factory=dict)
    _world_bound: set[Key] = field(default_factory=set)  # depend on pods/namespaces/services

    # ---- consumers --------------------------------------------------------------------
    def consumer(self, kind: str) -> _Consumer:
        self.synced[kind] = False
        return _Consumer(self, kind)

    def _observe(self, obj: Obj) -> None:
        self.stats.observed_rv = max(self.stats.observed_rv, _rv(obj))

    def _touch(self) -> None:
        if not self.changed.is_set():
            self._first_change = time.time()
        self.changed.set()
        self.idle.clear()

    def _set(self, kind: str, obj: Obj, deleted: bool) -> None:
        self._observe(obj)
        key = _key(obj)
        if kind in ENDPOINT_KINDS:
            self._set_endpoints(key, obj, deleted)
            return  # our own writes do not trigger a resolution
        if kind in POLICY_KIND_OF:
            obj.setdefault("kind", POLICY_KIND_OF[kind])  # list items may omit it
        {
            "networkpolicies": self._set_policy,
            "applicationnetworkpolicies": self._set_policy,
            "clusternetworkpolicies": self._set_policy,
            "pods": self._set_pod,
            "namespaces": self._set_namespace,
            "services": self._set_service,
        }[kind](key, obj, deleted)
        self._touch()

    def _set_policy(self, key: Key, obj: Obj, deleted: bool) -> None:
        self._by_namespace.setdefault(key[0], set()).discard(key)
        self._world_bound.discard(key)
        if deleted:
            self.policies.pop(key, None)
        else:
            self.policies[key] = obj
            self._by_namespace[key[0]].add(key)
            if not key[0] or _depends_on_world(obj):  # a cluster policy's subjects do
                self._world_bound.add(key)
        self.dirty.add(key)

    def _set_pod(self, key: Key, obj: Obj, deleted: bool) -> None:
        if deleted:
            self.world.pods.pop(key, None)
        else:
            self.world.pods[key] = pod_from(obj)
        self.dirty |= self._by_namespace.get(key[0], set()) | self._world_bound

    def _set_namespace(self, key: Key, obj: Obj, deleted: bool) -> None:
        if deleted:
            self.world.namespaces.pop(key[1], None)
        else:
            self.world.namespaces[key[1]] = dict((obj.get("metadata") or {}).get("labels") or {})
        self.dirty |= self._world_bound

    def _set_service(self, key: Key, obj: Obj, deleted: bool) -> None:
        if deleted:
            self.world.services.pop(key, None)
        else:
            self.world.services[key] = service_from(obj)
        self.dirty |= self._world_bound

    def _set_endpoints(self, key: Key, obj: Obj, deleted: bool) -> None:
        owner = _owner_uid(obj)
        if owner is None:
            return  # not ours
        bucket = self.owned.setdefault(owner, {})
        if deleted:
            bucket.pop(key, None)
        elif _rv(obj) >= _rv(bucket.get(key, {})):
            bucket[key] = _compact(obj)

    # ---- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while not all(self.synced.values()):
            await self.changed.wait()
            self.changed.clear()
            await asyncio.sleep(0.01)
        log.info("resolver.synced", policies=len(self.policies), pods=len(self.world.pods))
        self.changed.set()
        while True:
            await self.changed.wait()
            await asyncio.sleep(self.debounce)
            self.changed.clear()
            trigger = self._first_change or time.time()
            self._first_change = 0.0
            started = time.monotonic()
            await self._sync_all(trigger)
            self.stats.batches += 1
            self.stats.last_batch_ms = round((time.monotonic() - started) * 1000, 2)
            if not self.changed.is_set():
                self.idle.set()

    async def _sync_all(self, trigger: float) -> None:
        live = {p["metadata"].get("uid", "") for p in self.policies.values()}
        keys = set(self.policies) if self.all_dirty else self.dirty & set(self.policies)
        self.dirty, self.all_dirty = set(), False
        counts = Counter(str(p.get("kind") or POLICY_TYPE) for p in self.policies.values())
        for policy_type in (POLICY_TYPE, APPLICATION_KIND, CLUSTER_POLICY_TYPE):
            self.metrics.objects.labels(policy_type).set(counts[policy_type])
        for key in sorted(keys):
            policy = self.policies.get(key)
            if policy is None:
                continue
            kind = str(policy.get("kind") or POLICY_TYPE)
            started = time.monotonic()
            result = "error"
            try:
                await self._sync_policy(policy, trigger)
                result = "success"
            except InvalidPolicy as exc:
                # not retried until it changes; its current objects stay as they are
                self.stats.invalid += 1
                log.error("resolver.policy_invalid", policy=f"{key[0]}/{key[1]}", error=str(exc))
            except _Retry:
                self.dirty.add(key)
                self.changed.set()
            except KubeError as exc:
                self.stats.errors += 1
                log.warning("resolver.sync_failed", policy=f"{key[0]}/{key[1]}", error=str(exc))
                self.dirty.add(key)
                self.changed.set()  # try again at the next round
                await asyncio.sleep(0.2)
            except Exception:  # a bug in the resolver, not bad input: loud, and contained
                self.stats.bugs += 1
                log.exception(
                    "resolver.bug",
                    policy=f"{key[0]}/{key[1]}",
                    effect="this policy's objects stay as they were",
                )
            finally:
                self.metrics.reconciliations.labels(kind, result).inc()
                self.metrics.reconcile_duration.labels(kind).observe(time.monotonic() - started)
        for uid in [u for u in self.owned if u not in live]:
            for ns, name in list(self.owned.get(uid, {})):
                await self._delete(ns, name, uid)  # orphans of deleted policies

    async def _sync_policy(self, policy: Obj, trigger: float) -> None:
        meta = policy["metadata"]
        uid = meta.get("uid", "")
        namespace = meta.get("namespace", "")
        if namespace:
            res = resolution(policy, self.world)
        else:
            res = cluster_resolution(policy, self.world)
        current = sorted(self.owned.get(uid, {}).values(), key=lambda o: o["metadata"]["name"])
        by_name = {o["metadata"]["name"]: o for o in current}
        if self.layout == "controller":
            plan = packed(
                res,
                self.chunk_size,
                [Held(o["metadata"]["name"], _group(o), o.get(HELD_KEYS) or {}) for o in current],
            )
        else:
            desired = paired(res, self.chunk_size)
            plan = Plan(
                writes=[
                    (o["metadata"]["name"] if o else None, d)
                    for d, o in zip(desired, [*current, *[None] * len(desired)], strict=False)
                ],
                deletes=[o["metadata"]["name"] for o in current[len(desired) :]],
            )
        updates = [
            (by_name[n], d)
            for n, d in plan.writes
            if n is not None
            and (by_name[n].get(SPEC_DIGEST) != _digest(d.spec) or _group(by_name[n]) != d.group)
        ]
        # objects that only gain entries are written before those that lose some, and
        # deletions come last: an entry moving between objects is never missing
        updates.sort(
            key=lambda u: bool(
                (u[0].get(HELD_KEYS) or {})
                and any(u[0][HELD_KEYS].get(k, frozenset()) - keys_of(u[1].spec)[k] for k in KINDS)
            )
        )
        for existing, d in updates:
            await self._update(existing, d, trigger)
        for name, d in plan.writes:
            if name is None:
                await self._create(policy, d, trigger)
        for name in plan.deletes:
            await self._delete(namespace, name, uid)

    # ---- writes -----------------------------------------------------------------------
    async def _create(self, policy: Obj, desired: Desired, trigger: float) -> None:
        meta = policy["metadata"]
        namespace = meta.get("namespace", "")
        owner_kind = str(
            policy.get("kind") or ("NetworkPolicy" if namespace else CLUSTER_POLICY_KIND)
        )
        owner_api = "networking.k8s.io/v1" if owner_kind == "NetworkPolicy" else API_VERSION
        spec = desired.spec
        annotations = {TRIGGER_ANNOTATION: _rfc3339(trigger)}
        if desired.group:
            annotations[GROUP_ANNOTATION] = desired.group
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND if namespace else CLUSTER_KIND,
            "metadata": {
                "generateName": f"{meta['name']}-",
                **({"namespace": namespace} if namespace else {}),
                "labels": dict([MANAGED_BY]),
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": owner_api,
                        "kind": owner_kind,
                        "name": meta["name"],
                        "uid": meta.get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        created = await self.kube.create(_endpoints_resource(namespace), namespace or None, body)
        self.stats.creates += 1
        self.stats.writes += 1
        self._set_endpoints(_key(created), created, deleted=False)

    async def _update(self, existing: Obj, desired: Desired, trigger: float) -> None:
        body = {k: v for k, v in existing.items() if k not in (SPEC_DIGEST, HELD_KEYS)}
        body["spec"] = desired.spec
        body["metadata"] = dict(existing["metadata"])
        annotations = dict(
            existing["metadata"].get("annotations") or {}, **{TRIGGER_ANNOTATION: _rfc3339(trigger)}
        )
        annotations.pop(GROUP_ANNOTATION, None)
        if desired.group:
            annotations[GROUP_ANNOTATION] = desired.group
        body["metadata"]["annotations"] = annotations
        ns, name = body["metadata"].get("namespace", ""), body["metadata"]["name"]
        resource = _endpoints_resource(ns)
        try:
            updated = await self.kube.replace(resource, ns or None, name, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            self.stats.conflicts += 1
            latest = await self.kube.get(resource, ns or None, name)
            self._set_endpoints(_key(latest), latest, deleted=False)
            raise _Retry from None
        self.stats.updates += 1
        self.stats.writes += 1
        self._set_endpoints(_key(updated), updated, deleted=False)

    async def _delete(self, namespace: str, name: str, owner: str) -> None:
        try:
            await self.kube.delete(_endpoints_resource(namespace), namespace or None, name)
        except KubeError as exc:
            if exc.status != 404:
                raise
        self.stats.deletes += 1
        self.stats.writes += 1
        bucket = self.owned.get(owner, {})
        bucket.pop((namespace, name), None)
        if not bucket:
            self.owned.pop(owner, None)


class _Consumer(Replacing):
    def __init__(self, resolver: Resolver, kind: str) -> None:
        self.resolver = resolver
        self.kind = kind

    def replace(self, items: list[Obj]) -> None:
        r = self.resolver
        r.all_dirty = True
        if self.kind in ENDPOINT_KINDS:
            cluster = self.kind == "clusterpolicyendpoints"
            for uid in list(r.owned):  # this kind's objects only: both share ``owned``
                bucket = {k: v for k, v in r.owned[uid].items() if (not k[0]) != cluster}
                if bucket:
                    r.owned[uid] = bucket
                else:
                    del r.owned[uid]
        else:
            listed = {_key(i) for i in items}
            for obj in _snapshot(r, self.kind):
                if _key(obj) not in listed:
                    r._set(self.kind, obj, deleted=True)
        for obj in items:
            r._set(self.kind, obj, deleted=False)
        r.synced[self.kind] = True
        r._touch()

    def apply(self, event: WatchEvent) -> None:
        self.resolver._set(self.kind, event.object, deleted=event.type == "DELETED")


def _snapshot(r: Resolver, kind: str) -> list[Obj]:
    """Keys currently held for ``kind``, as minimal objects (for removals on re-list)."""
    keys: list[Key]
    if kind in ("networkpolicies", "applicationnetworkpolicies"):
        want = "NetworkPolicy" if kind == "networkpolicies" else APPLICATION_KIND
        keys = [k for k, p in r.policies.items() if k[0] and p.get("kind", want) == want]
    elif kind == "clusternetworkpolicies":
        keys = [k for k in r.policies if not k[0]]
    elif kind == "pods":
        keys = list(r.world.pods)
    elif kind == "services":
        keys = list(r.world.services)
    else:
        keys = [("", n) for n in r.world.namespaces]
    return [{"metadata": {"namespace": ns, "name": name}} for ns, name in keys]


class _Retry(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """A write lost a race (409); the policy is resolved again at the next round."""


SPEC_DIGEST = "specDigest"
HELD_KEYS = "heldKeys"


def _digest(spec: Obj) -> str:
    return hashlib.blake2b(
        json.dumps(spec, sort_keys=True, separators=(",", ":")).encode(), digest_size=16
    ).hexdigest()


def _compact(pe: Obj) -> Obj:
    """An owned PolicyEndpoint as kept: everything but the spec, which only needs to be
    compared (a digest)."""
    out = {k: v for k, v in pe.items() if k != "spec"}
    out[SPEC_DIGEST] = _digest(pe.get("spec") or {})
    out[HELD_KEYS] = keys_of(pe.get("spec") or {})
    return out


def _group(pe: Obj) -> str:
    return str(((pe.get("metadata") or {}).get("annotations") or {}).get(GROUP_ANNOTATION, ""))


def _depends_on_world(policy: Obj) -> bool:
    """Whether the policy's rules resolve against other objects: pod or namespace
    selector peers (pods, namespaces, services), or named ports of rules without peers
    (resolved per destination pod)."""
    try:
        spec = policy.get("spec") or {}
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction) or []:
                peers = rule.get(peers_key) or []
                if any("podSelector" in p or "namespaceSelector" in p for p in peers):
                    return True
                if not peers and any(
                    isinstance(p.get("port"), str) for p in rule.get("ports") or []
                ):
                    return True
    except (AttributeError, TypeError):
        return True  # malformed: resolving it will say what is wrong
    return False


def _owner_uid(obj: Obj) -> str | None:
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY[0]) != MANAGED_BY[1]:
        return None
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") in OWNER_KINDS and ref.get("controller"):
            return str(ref.get("uid", ""))
    return None


def _rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond * 1000:09d}Z"
