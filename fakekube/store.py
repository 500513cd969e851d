"""The fake API server's object store: resourceVersions, history, watchers.

Like etcd behind the API server: one global, increasing resourceVersion; every change is
recorded in a bounded history, from which watches started at an older version are
replayed; a version older than the history (after :meth:`Store.compact`, or when the
history overflows) gets 410 Gone.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fakekube.selectors import object_matches

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()  # as discovery announces them (kubectl get netpol)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``plural.group``, as the API server names the resource in its messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


PODS = Resource("", "v1", "pods", "Pod", True, ("po",))
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False, ("ns",))
SERVICES = Resource("", "v1", "services", "Service", True, ("svc",))
NODES = Resource("", "v1", "nodes", "Node", False, ("no",))
EVENTS = Resource("", "v1", "events", "Event", True, ("ev",))
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", True, ("deploy",))
NETWORK_POLICIES = Resource(
    "networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)
)
POLICY_ENDPOINTS = Resource(
    "networking.k8s.aws", "v1alpha1", "policyendpoints", "PolicyEndpoint", True
)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
CLUSTER_NETWORK_POLICIES = Resource(
    "networking.k8s.aws",
    "v1alpha1",
    "clusternetworkpolicies",
    "ClusterNetworkPolicy",
    False,
    ("cnp",),
)
APPLICATION_NETWORK_POLICIES = Resource(
    "networking.k8s.aws",
    "v1alpha1",
    "applicationnetworkpolicies",
    "ApplicationNetworkPolicy",
    True,
    ("anp",),
)
CLUSTER_POLICY_ENDPOINTS = Resource(
    "networking.k8s.aws",
    "v1alpha1",
    "clusterpolicyendpoints",
    "ClusterPolicyEndpoint",
    False,
    ("cpe",),
)
RESOURCES = (
    PODS,
    NAMESPACES,
    SERVICES,
    NODES,
    EVENTS,
    DEPLOYMENTS,
    NETWORK_POLICIES,
    POLICY_ENDPOINTS,
    LEASES,
    CLUSTER_NETWORK_POLICIES,
    CLUSTER_POLICY_ENDPOINTS,
    APPLICATION_NETWORK_POLICIES,
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, *, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details  # Status.details: name, group, kind, causes

    def status(self) -> Obj:
        out: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            out["details"] = self.details
        return out


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{resource.qualified} "{name}" not found',
        details={"name": name, "group": resource.group, "kind": resource.plural},
    )


@dataclass
class Event:
    rv: int
    resource: Resource
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    old: Obj | None


@dataclass(eq=False)
class Watcher:
    resource: Resource
    namespace: str | None
    labels: str | None
    fields: str | None
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)

    def offer(self, ev: Event) -> None:
        """Queue the event as this watcher sees it (selectors turn changes into
        ADDED/DELETED when an object starts or stops matching)."""
        if ev.resource != self.resource:
            return
        ns = ev.obj.get("metadata", {}).get("namespace")
        if self.namespace is not None and ns != self.namespace:
            return
        now = object_matches(ev.obj, labels=self.labels, fields=self.fields)
        before = ev.old is not None and object_matches(
            ev.old, labels=self.labels, fields=self.fields
        )
        kind = ev.type
        if ev.type == "MODIFIED":
            if now and not before:
                kind = "ADDED"
            elif before and not now:
                kind = "DELETED"
            elif not now:
                return
        elif not now:
            return
        self.queue.put_nowait({"type": kind, "object": ev.obj})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


class Store:
    def __init__(self, *, history_limit: int = 100_000) -> None:
        self.rv = 1
        self.objects: dict[Resource, dict[tuple[str, str], Obj]] = {r: {} for r in RESOURCES}
        self.history: deque[Event] = deque()
        self.history_limit = history_limit
        self.oldest_rv = 1  # watches from an older version get 410 Gone
        self.watchers: set[Watcher] = set()

    # ---- reading ----------------------------------------------------------------------
    def list(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        labels: str | None = None,
        fields: str | None = None,
        metadata_only: bool = False,
        after: tuple[str, str] | None = None,
        limit: int = 0,
        copies: bool = True,
    ) -> tuple[list[Obj], int]:
        """Copies of the matching objects (of their metadata only, if asked), in key
        order, those after the key ``after`` only; at most ``limit`` + 1 of them when a
        limit is given (the extra one tells the caller that more remain). ``copies``
        False: the stored objects themselves, for a caller that only reads them before
        it next yields (the server, encoding a response); a real API server encodes its
        cached objects, and a deep copy per object per list was most of the fake's time
        serving a node's PolicyEndpoints."""
        items = []
        for key, o in sorted(self.objects[resource].items()):
            if after is not None and key <= after:
                continue
            if namespace is not None and key[0] != namespace:
                continue
            if not object_matches(o, labels=labels, fields=fields):
                continue
            item = {"metadata": o["metadata"]} if metadata_only else o
            items.append(copy.deepcopy(item) if copies else item)
            if limit and len(items) > limit:
                break
        return items, self.rv

    def get(self, resource: Resource, namespace: str, name: str) -> Obj:
        obj = self.objects[resource].get((namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return copy.deepcopy(obj)

    def events_since(self, resource: Resource, rv: int) -> Iterator[Event]:
        if rv < self.oldest_rv - 1:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.oldest_rv - 1})")
        for ev in self.history:
            if ev.rv > rv and ev.resource == resource:
                yield ev

    # ---- writing ----------------------------------------------------------------------
    def _commit(self, resource: Resource, kind: str, obj: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        ev = Event(self.rv, resource, kind, copy.deepcopy(obj), old)
        self.history.append(ev)
        while len(self.history) > self.history_limit:
            dropped = self.history.popleft()
            self.oldest_rv = dropped.rv + 1
        for w in list(self.watchers):
            w.offer(ev)
        return copy.deepcopy(obj)

    def create(
        self, resource: Resource, namespace: str | None, body: Obj, *, dry_run: bool = False
    ) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            ns = namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, ns):
                raise ApiError(400, "BadRequest", "namespace of the body and the path differ")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or generateName is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (meta.get("namespace", ""), meta["name"])
        if key in self.objects[resource]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.qualified} "{meta["name"]}" already exists',
                details={"name": meta["name"], "group": resource.group, "kind": resource.plural},
            )
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        obj["kind"] = resource.kind
        obj["apiVersion"] = resource.api_version
        apply_defaults(resource, obj)
        if dry_run:
            return obj
        self.objects[resource][key] = obj
        return self._commit(resource, "ADDED", obj, None)

    def update(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        body: Obj,
        *,
        status_only: bool = False,
        dry_run: bool = False,
    ) -> Obj:
        current = self.objects[resource].get((namespace, name))
        if current is None:
            raise not_found(resource, name)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        want_rv = meta.get("resourceVersion")
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.qualified} "{name}": '
                "the object has been modified; please apply your changes to the "
                "latest version and try again",
            )
        if status_only:
            merged = copy.deepcopy(current)
            merged["status"] = obj.get("status", {})
            obj = merged
        for keep in ("uid", "creationTimestamp", "name", "generation"):
            meta_cur = current["metadata"]
            if keep in meta_cur:
                obj["metadata"][keep] = meta_cur[keep]
        if resource.namespaced:
            obj["metadata"]["namespace"] = namespace
        apply_defaults(resource, obj)
        obj["kind"] = resource.kind
        obj["apiVersion"] = resource.api_version
        if obj.get("spec") != current.get("spec"):
            obj["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if obj == current:
            return copy.deepcopy(current)  # no-op updates do not bump the version
        if dry_run:
            return obj
        self.objects[resource][(namespace, name)] = obj
        return self._commit(resource, "MODIFIED", obj, copy.deepcopy(current))

    def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        patch: Any,
        *,
        apply: Callable[[Obj, Any], Obj] | None = None,
        admit: Callable[[Obj], None] | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """``patch`` applied to the object by ``apply`` (default: JSON merge patch), the
        result checked by ``admit`` (which raises ApiError to refuse it)."""
        current = self.get(resource, namespace, name)
        patched = (apply or _merge)(current, patch)
        patched.setdefault("metadata", {}).pop("resourceVersion", None)
        if isinstance(patch, dict) and (patch.get("metadata") or {}).get("resourceVersion"):
            patched["metadata"]["resourceVersion"] = patch["metadata"]["resourceVersion"]
        if admit is not None:
            admit(patched)
        return self.update(resource, namespace, name, patched, dry_run=dry_run)

    def delete(self, resource: Resource, namespace: str, name: str) -> Obj:
        current = self.objects[resource].pop((namespace, name), None)
        if current is None:
            raise not_found(resource, name)
        return self._commit(resource, "DELETED", current, copy.deepcopy(current))

    def compact(self) -> None:
        """Forget the history: every watch from an older version now gets 410 Gone."""
        self.history.clear()
        self.oldest_rv = self.rv + 1


def apply_defaults(resource: Resource, obj: Obj) -> None:
    """The real API server's defaulting, for the fields the node processes read."""
    if resource == NAMESPACES:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
    elif resource == NETWORK_POLICIES:
        default_network_policy(obj)
    elif resource == CLUSTER_NETWORK_POLICIES:
        default_cluster_network_policy(obj)
    elif resource == APPLICATION_NETWORK_POLICIES:
        default_application_network_policy(obj)


def _rule_ports(policy: Obj) -> Iterator[dict[str, Any]]:
    """Every port object of a policy's ingress and egress rules (malformed parts skipped:
    validation is the resolver's)."""
    spec = policy.get("spec")
    if not isinstance(spec, dict):
        return
    for direction in ("ingress", "egress"):
        rules = spec.get(direction)
        for rule in rules if isinstance(rules, list) else []:
            ports = rule.get("ports") if isinstance(rule, dict) else None
            yield from (
                p for p in (ports if isinstance(ports, list) else []) if isinstance(p, dict)
            )


def default_application_network_policy(policy: Obj) -> None:
    """The CRD's defaults, in place: port protocol TCP (no policyTypes default)."""
    for port in _rule_ports(policy):
        port.setdefault("protocol", "TCP")


def default_cluster_network_policy(policy: Obj) -> None:
    """The CRD's defaults, in place: a portNumber or portRange without protocol is TCP."""
    for port in _rule_ports(policy):
        for key in ("portNumber", "portRange"):
            body = port.get(key)
            if isinstance(body, dict):
                body.setdefault("protocol", "TCP")


def default_network_policy(policy: Obj) -> None:
    """NetworkPolicy defaulting, in place: empty podSelector, port protocol TCP, and
    policyTypes from the rules present (Ingress always, Egress if egress rules exist)."""
    spec = policy.setdefault("spec", {})
    if spec.get("podSelector") is None:
        spec["podSelector"] = {}
    for direction in ("ingress", "egress"):
        for rule in spec.get(direction) or []:
            for port in rule.get("ports") or []:
                port.setdefault("protocol", "TCP")
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress", *(["Egress"] if spec.get("egress") else [])]
