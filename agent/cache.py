"""The agent's view of the cluster: this node's pods and the PolicyEndpoints about them.

Fed by two list-watches (pods with ``spec.nodeName=<node>``, all PolicyEndpoints).

**Join by policy.** The AWS controller splits one NetworkPolicy over several objects,
packing its pods, its ingress entries and its egress entries independently: an object
may hold only pods, only ingress entries or only egress entries. Every object of one
policy (same namespace, same ``spec.policyRef.name``; see ``PolicyKey``) belongs
together: a pod listed in any of them is selected by the policy and gets the entries
and ``podIsolation`` of all of them. A pod's rules are the union over the policies that
select it. Only a policy's own namespace's pods can be selected by it, and an entry
naming a local pod under an address that is none of the pod's is not a selection (it
is logged and counted: a stale or forged entry).

**Memory per node.** A policy is *relevant* when one of its objects lists a local pod
(known from the pod watch, or by an entry's ``hostIP`` being a node address, so it is
recognised before the pod is seen). The objects of relevant policies are kept,
compacted; the objects of other policies are kept as stubs (identity and version
only). When a policy becomes relevant (a pod chunk arrives after its rule chunks), its
stubs are fetched again (:meth:`Cache.take_fetch`), and the pods it selects are held
at their last programmed state until every object of the policy is here: a partial
policy is never programmed. During a (re)list, objects of namespaces with a local pod
are kept whole until the list ends (chunks of one policy may come in any order), then
those of irrelevant policies become stubs.

**Selection by labels.** A pod the controller has not listed in any object yet (a pod
the CNI is setting up has no address, so no object can list it) is selected by the
policies of its namespace whose ``podSelector`` (every object of a policy carries it)
matches its labels: a new replica gets its policies before its first packet, not after
the controller's next pass. Once any object lists the pod, the listings alone decide,
as before.

**ClusterPolicyEndpoints** (cluster-scoped, their own list-watch) live in the same
indexes: their key and policy key have namespace "" (no PolicyEndpoint has), their
entries may list pods of any namespace, and they never select by labels (nor does a
listing by one end a pod's selection by NetworkPolicy labels). Relevance,
stubs, fetching, rejection and "programmed" work for them exactly as above.

An invalid PolicyEndpoint is rejected with one log line and a counter; the version last
accepted (if any) stays in force, so no pod's enforcement changes because of bad input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.endpoints import Endpoints, PodRef, PolicyKey, matcher, parse_object
from common.kube import WatchEvent
from common.podobject import PodError, parse_pod, pod_key
from common.policyendpoint import PolicyEndpointError

log = structlog.get_logger("agent.cache")

Key = tuple[str, str]  # (namespace, name) of a PolicyEndpoint


@dataclass(frozen=True, slots=True)
class LocalPod:
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    host_network: bool
    phase: str
    deleting: bool
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> PodRef:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Stub:
    """An object of a policy that selects no local pod: what is needed to fetch it
    again if the policy comes to select one."""

    policy_key: PolicyKey
    generation: int
    resource_version: int
    selector: str = ""


def _pod(obj: dict[str, Any]) -> LocalPod:
    """The pod as the agent keeps it; :class:`PodError` if the object is unusable."""
    pod = parse_pod(obj)
    meta, spec, status = pod.metadata, pod.spec, pod.status
    ips, invalid = pod.addresses()
    for ip in invalid:
        log.warning("pod.bad_ip", pod=f"{meta.namespace}/{meta.name}", ip=ip)
    return LocalPod(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid,
        ips=ips,
        host_network=spec.host_network,
        phase=status.phase,
        deleting=bool(meta.deletion_timestamp),
        labels=tuple(sorted(meta.labels.items())),
    )


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return 0


class Cache:
    def __init__(
        self,
        *,
        node_addresses: Callable[[], set[str]],
        on_rejected: Callable[[str, str, str], None] | None = None,
        on_ignored: Callable[[str], None] | None = None,
        on_pod_rejected: Callable[[], None] | None = None,
    ) -> None:
        self.pods: dict[PodRef, LocalPod] = {}
        self.ns_pods: dict[str, set[PodRef]] = {}  # the local pods of each namespace
        self.endpoints: dict[Key, Endpoints] = {}  # objects of relevant policies
        self.stubs: dict[Key, Stub] = {}  # objects of the others
        self.policies: dict[PolicyKey, set[Key]] = {}  # every object (kept or stub)
        self.listing: dict[PodRef, set[Key]] = {}  # kept objects listing a pod
        # the local pods of each namespace that no kept PolicyEndpoint lists (selected
        # by labels, if at all): kept as pods and listings change, since every object a
        # list delivers asks for its namespace's (a scan per object was quadratic)
        self.unlisted: dict[str, set[PodRef]] = {}
        self.rejected: dict[Key, str] = {}
        # every policy's podSelector, and the policies of each namespace (see "Selection
        # by labels"); an entry ends with the policy's last object
        self.selectors: dict[PolicyKey, str] = {}
        self.by_namespace: dict[str, set[PolicyKey]] = {}
        # the latest generation seen of every PolicyEndpoint, kept or not (an int each):
        # tells "programmed" callers whether the watch has delivered what the API has
        self.generations: dict[Key, int] = {}
        self._on_rejected = on_rejected
        self._on_ignored = on_ignored
        self._on_pod_rejected = on_pod_rejected
        self._reported: set[tuple[Key, int, PodRef]] = set()  # mismatches already logged
        self.dirty: set[PodRef] = set()
        self.changed = asyncio.Event()
        self.fetch_needed = asyncio.Event()
        self._fetch: set[Key] = set()
        self._node_addresses = node_addresses
        self._listing: set[bool] = set()  # kinds being listed (True: cluster objects)
        self._synced: set[bool] = set()
        # resourceVersion of every object held (kept or stub): a stub is fetched again
        # at least at that version
        self._rvs: dict[Key, int] = {}
        self.pods_synced = False

    @property
    def endpoints_synced(self) -> bool:
        """Both kinds listed: PolicyEndpoints and ClusterPolicyEndpoints."""
        return self._synced >= {False, True}

    def reject_pod(self, exc: PodError) -> None:
        """A Pod object that cannot be used: logged and counted; what was known of the
        pod (its last valid version) stays in force."""
        log.error(
            "pod.rejected",
            pod=f"{exc.namespace}/{exc.name}",
            reason=exc.reason,
            kept="the last valid version, if any",
        )
        if self._on_pod_rejected is not None:
            self._on_pod_rejected()

    # ---- queries ----------------------------------------------------------------------
    def by_labels(self, pod: PodRef) -> list[PolicyKey]:
        """The policies of the pod's namespace whose podSelector matches its labels, if
        no object lists the pod (else none: the listings decide)."""
        local = self.pods.get(pod)
        if local is None or self._listed_by_networkpolicy(pod):
            return []
        labels = dict(local.labels)
        return [
            pk
            for pk in self.by_namespace.get(pod[0], ())
            if matcher(self.selectors.get(pk, ""))(labels)
        ]

    def selecting(self, pod: PodRef) -> list[PolicyKey]:
        """The policies that select a local pod (sorted)."""
        local = self.pods.get(pod)
        if local is None:
            return []
        out: set[PolicyKey] = set(self.by_labels(pod))
        for key in self.listing.get(pod, ()):
            e = self.endpoints[key]
            listed = e.lists(pod, local.ips)
            if listed:
                out.add(e.policy_key)
            elif listed is False:
                self._report_mismatch(e, pod, local)
        return sorted(out)

    def endpoints_for(self, pod: PodRef) -> list[Endpoints]:
        """Every object of every policy selecting the pod (sorted by key): the pod's
        rules are their union."""
        out: list[Endpoints] = []
        for pk in self.selecting(pod):
            out.extend(
                self.endpoints[k] for k in sorted(self.policies.get(pk, ())) if k in self.endpoints
            )
        return out

    def incomplete(self, pod: PodRef) -> list[Key]:
        """Objects of the pod's policies not held yet (being fetched): until they are,
        the pod keeps its last programmed state."""
        return sorted(
            k for pk in self.selecting(pod) for k in self.policies.get(pk, ()) if k in self.stubs
        )

    def take_dirty(self) -> set[PodRef]:
        dirty, self.dirty = self.dirty, set()
        self.changed.clear()
        return dirty

    def take_fetch(self) -> set[Key]:
        keys, self._fetch = self._fetch & set(self.stubs), set()
        self.fetch_needed.clear()
        return keys

    def refetch(self, keys: Iterable[Key]) -> None:
        """Ask again for stubs whose fetch failed."""
        self._fetch.update(k for k in keys if k in self.stubs)
        if self._fetch:
            self.fetch_needed.set()

    def fetched(self, key: Key, obj: dict[str, Any] | None) -> None:
        """A stub's object as fetched from the API server (None: gone; the watch says
        so too). Ignored if the watch delivered the object (or a newer one) meanwhile."""
        stub = self.stubs.get(key)
        if stub is None or obj is None:
            return
        if _int((obj.get("metadata") or {}).get("resourceVersion")) < stub.resource_version:
            self._fetch.add(key)  # older than what the watch said: ask again
            self.fetch_needed.set()
            return
        self._set_endpoints(key, obj, fetched=True)

    def _report_mismatch(self, e: Endpoints, pod: PodRef, local: LocalPod) -> None:
        mark = (e.key, e.generation, pod)
        if mark in self._reported:
            return
        self._reported.add(mark)
        listed = sorted(ip for ref, ip in e.listed if ref == pod)
        log.warning(
            "policyendpoint.entry_ignored",
            reason="address-mismatch",
            policyendpoint=f"{e.namespace}/{e.name}",
            pod=f"{pod[0]}/{pod[1]}",
            listed=listed[:4],
            pod_ips=list(local.ips),
            detail="the entry names a local pod under an address that is not the "
            "pod's: not applied (stale, or another pod's)",
        )
        if self._on_ignored is not None:
            self._on_ignored("address-mismatch")

    # ---- shared -----------------------------------------------------------------------
    def _mark(self, refs: Iterable[PodRef]) -> None:
        local = [r for r in refs if r in self.pods or r in self.dirty]
        if local:
            self.dirty.update(local)
            self.changed.set()

    def _policy_pods(self, pk: PolicyKey) -> set[PodRef]:
        return {
            ref
            for k in self.policies.get(pk, ())
            if k in self.endpoints
            for ref in self.endpoints[k].pods
        }

    def _relevant(self, pk: PolicyKey) -> bool:
        node = self._node_addresses()
        for k in self.policies.get(pk, ()):
            e = self.endpoints.get(k)
            if e is not None and (e.host_ips & node or any(r in self.pods for r in e.pods)):
                return True
        return self._selects_by_labels(pk)

    def _selects_by_labels(self, pk: PolicyKey) -> bool:
        """The policy's podSelector matches a local pod no object lists (its own
        selector only: this runs for every policy of a namespace when a pod comes)."""
        selector = self.selectors.get(pk, "")
        if not selector:
            return False
        matches = matcher(selector)
        return any(matches(dict(self.pods[r].labels)) for r in self._unlisted(pk[0]))

    def _unlisted(self, namespace: str) -> list[PodRef]:
        """Local pods of the namespace that no object lists (selected by labels)."""
        return list(self.unlisted.get(namespace, ()))

    def _index_listing(self, ref: PodRef) -> None:
        """Whether a pod is among its namespace's unlisted, after its pod or a listing of
        it changed."""
        if ref in self.pods and not self._listed_by_networkpolicy(ref):
            self.unlisted.setdefault(ref[0], set()).add(ref)
            return
        refs = self.unlisted.get(ref[0])
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self.unlisted[ref[0]]

    def _listed_by_networkpolicy(self, pod: PodRef) -> bool:
        """Some PolicyEndpoint lists the pod (a ClusterPolicyEndpoint listing it does not
        end its selection by NetworkPolicy labels: the two kinds are listed apart)."""
        return any(k[0] for k in self.listing.get(pod, ()))

    def _note_selector(self, pk: PolicyKey, selector: str) -> None:
        self.selectors[pk] = selector
        self.by_namespace.setdefault(pk[0], set()).add(pk)

    def _forget_selector(self, pk: PolicyKey) -> None:
        if pk in self.policies:
            return  # other objects of the policy remain
        self.selectors.pop(pk, None)
        keys = self.by_namespace.get(pk[0])
        if keys is not None:
            keys.discard(pk)
            if not keys:
                del self.by_namespace[pk[0]]

    def _namespace_is_local(self, namespace: str) -> bool:
        return bool(self.ns_pods.get(namespace))

    # ---- pods ---------------------------------------------------------------------------
    def pods_consumer(self) -> _Pods:
        return _Pods(self)

    def _set_pod(self, pod: LocalPod | None, ref: PodRef) -> None:
        old = self.pods.get(ref)
        if pod is None:
            self.pods.pop(ref, None)
            refs = self.ns_pods.get(ref[0])
            if refs is not None:
                refs.discard(ref)
                if not refs:
                    del self.ns_pods[ref[0]]
        else:
            self.pods[ref] = pod
            self.ns_pods.setdefault(ref[0], set()).add(ref)
        self._index_listing(ref)
        if old != pod:
            self.dirty.add(ref)
            self.changed.set()
            if old is None or pod is None:  # may make a policy (ir)relevant
                for pk in {self.endpoints[k].policy_key for k in self.listing.get(ref, ())}:
                    self._settle(pk)
            if old is None or pod is None or old.labels != pod.labels:
                for pk in list(self.by_namespace.get(ref[0], ())):
                    self._settle(pk)

    # ---- policy endpoints -------------------------------------------------------------
    def endpoints_consumer(self, *, cluster: bool = False) -> _Endpoints:
        """The consumer of one kind's list-watch: PolicyEndpoints, or (``cluster``)
        ClusterPolicyEndpoints. Both share the cache: a cluster object's key and policy
        key have namespace "", which no PolicyEndpoint has."""
        return _Endpoints(self, cluster=cluster)

    def _drop(self, key: Key) -> tuple[PolicyKey | None, frozenset[PodRef]]:
        """Remove an object (kept or stub) from every index; its policy and pods."""
        pk: PolicyKey | None = None
        pods: frozenset[PodRef] = frozenset()
        old = self.endpoints.pop(key, None)
        if old is not None:
            pk, pods = old.policy_key, old.pods
            for ref in pods:
                keys = self.listing.get(ref)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self.listing[ref]
                self._index_listing(ref)
        stub = self.stubs.pop(key, None)
        if stub is not None:
            pk = stub.policy_key
        if pk is not None:
            members = self.policies.get(pk)
            if members is not None:
                members.discard(key)
                if not members:
                    del self.policies[pk]
            self._forget_selector(pk)
        self._reported = {m for m in self._reported if m[0] != key}
        return pk, pods

    def _keep(self, e: Endpoints) -> None:
        self.endpoints[e.key] = e
        self.policies.setdefault(e.policy_key, set()).add(e.key)
        self._note_selector(e.policy_key, e.selector)
        for ref in e.pods:
            self.listing.setdefault(ref, set()).add(e.key)
            self._index_listing(ref)

    def _set_endpoints(
        self, key: Key, obj: dict[str, Any] | None, *, fetched: bool = False
    ) -> None:
        held = key in self.endpoints or key in self.stubs
        new: Endpoints | None = None
        if obj is None:
            self.generations.pop(key, None)
            self.rejected.pop(key, None)
            self._rvs.pop(key, None)
        else:
            meta = obj.get("metadata") or {}
            self.generations[key] = _int(meta.get("generation"))
            self._rvs[key] = _int(meta.get("resourceVersion"))
            try:
                new = parse_object(obj)
            except PolicyEndpointError as exc:
                self.rejected[key] = exc.reason
                if self._on_rejected is not None:
                    self._on_rejected(key[0], key[1], exc.reason)
                log.error(
                    "policyendpoint.rejected",
                    namespace=key[0],
                    name=key[1],
                    reason=exc.reason,
                    keeping="last accepted version" if held else "none",
                )
                return
            self.rejected.pop(key, None)
            if new.foreign:
                log.warning(
                    "policyendpoint.entry_ignored",
                    reason="foreign-namespace",
                    policyendpoint=f"{key[0]}/{key[1]}",
                    entries=list(new.foreign[:4]),
                    count=len(new.foreign),
                    detail="an object applies only to pods of its own namespace",
                )
                if self._on_ignored is not None:
                    self._on_ignored("foreign-namespace")
        old_pk, old_pods = self._drop(key)
        if not held and new is None:
            return
        listing_now = (key[0] == "") in self._listing
        touched: set[PolicyKey] = set()
        if old_pk is not None:
            touched.add(old_pk)
        affected = set(old_pods)
        if new is not None:
            self._keep(new)
            touched.add(new.policy_key)
            affected |= new.pods
            if (
                not fetched
                and listing_now
                and not (self._namespace_is_local(key[0]) or new.host_ips & self._node_addresses())
            ):
                # during a list: a namespace without local pods cannot be concerned
                self._stub(new)
        affected |= set(self._unlisted(key[0]))  # label selection may change
        for pk in touched:
            affected |= self._policy_pods(pk)
            if not listing_now:
                self._settle(pk)
        self._mark(affected)

    def _stub(self, e: Endpoints) -> None:
        key = e.key
        self._drop(key)
        self.stubs[key] = Stub(e.policy_key, e.generation, self._rvs.get(key, 0), e.selector)
        self.policies.setdefault(e.policy_key, set()).add(key)
        self._note_selector(e.policy_key, e.selector)

    def _settle(self, pk: PolicyKey) -> None:
        """Keep the objects of a relevant policy (fetch its stubs), stub the others'."""
        members = self.policies.get(pk)
        if not members:
            return
        if self._relevant(pk):
            missing = {k for k in members if k in self.stubs}
            if missing:
                log.info(
                    "policyendpoint.fetching",
                    policy=f"{pk[0]}/{pk[1]}",
                    objects=len(missing),
                    reason="the policy now selects a local pod",
                )
                self._fetch |= missing
                self.fetch_needed.set()
        else:
            for k in [k for k in members if k in self.endpoints]:
                self._stub(self.endpoints[k])


class _Pods:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._seen: set[PodRef] = set()

    def begin(self) -> None:
        self._seen = set()

    def add(self, obj: dict[str, Any]) -> None:
        try:
            pod = _pod(obj)
        except PodError as exc:
            key = pod_key(obj)
            if key is not None:
                self._seen.add(key)  # what we had of it stays
            self.cache.reject_pod(exc)
            return
        self._seen.add(pod.key)
        self.cache._set_pod(pod, pod.key)

    def end(self) -> None:
        for ref in set(self.cache.pods) - self._seen:
            self.cache._set_pod(None, ref)
        self._seen = set()
        self.cache.pods_synced = True
        self.cache.changed.set()  # a (re)list is news even when it changed nothing

    def apply(self, event: WatchEvent) -> None:
        if event.type == "DELETED":
            key = pod_key(event.object)
            if key is not None:
                self.cache._set_pod(None, key)
            return
        try:
            pod = _pod(event.object)
        except PodError as exc:
            self.cache.reject_pod(exc)  # the last valid version stays
            return
        self.cache._set_pod(pod, pod.key)


class _Endpoints:
    """PolicyEndpoints are validated and compacted as they arrive, one list page at a
    time: the raw objects of a full list are never all in memory."""

    def __init__(self, cache: Cache, *, cluster: bool = False) -> None:
        self.cache = cache
        self.cluster = cluster
        self._seen: set[Key] = set()

    def _mine(self, keys: Iterable[Key]) -> set[Key]:
        return {k for k in keys if (k[0] == "") == self.cluster}

    def begin(self) -> None:
        self._seen = set()
        self.cache._listing.add(self.cluster)

    def add(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self._seen.add(key)
        self.cache._set_endpoints(key, obj)

    def end(self) -> None:
        c = self.cache
        seen, self._seen = self._seen, set()
        c._listing.discard(self.cluster)
        for key in self._mine(set(c.endpoints) | set(c.stubs)) - seen:
            c._set_endpoints(key, None)
        for key in self._mine(c.rejected) - seen:
            del c.rejected[key]
        for key in self._mine(c.generations) - seen:
            del c.generations[key]
        for pk in [pk for pk in c.policies if (pk[0] == "") == self.cluster]:
            c._settle(pk)
        c._synced.add(self.cluster)
        c.changed.set()

    def apply(self, event: WatchEvent) -> None:
        meta = event.object.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self.cache._set_endpoints(key, None if event.type == "DELETED" else event.object)
