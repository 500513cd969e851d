"""The agent's view of the cluster: this node's pods and the PolicyEndpoints about them.

Fed by two list-watches (pods with ``spec.nodeName=<node>``, all PolicyEndpoints). Only
PolicyEndpoints that list a pod of this node are kept: one is recognised by a listed
pod's ``hostIP`` being a node address (so it is kept even before the pod is seen) or by
the pod being known locally. Every change marks the local pods whose enforcement may
change as dirty; the enforcer drains them.

An invalid PolicyEndpoint is rejected with one log line and a counter; the version last
accepted (if any) stays in force, so no pod's enforcement changes because of bad input.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.endpoints import Endpoints, PodRef, from_api
from common.kube import WatchEvent
from common.policyendpoint import PolicyEndpointError

log = structlog.get_logger("agent.cache")


@dataclass(frozen=True, slots=True)
class LocalPod:
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    host_network: bool
    phase: str
    deleting: bool

    @property
    def key(self) -> PodRef:
        return (self.namespace, self.name)


def _pod(obj: dict[str, Any]) -> LocalPod:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    valid = []
    for ip in ips:
        try:
            valid.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            log.warning("pod.bad_ip", pod=f"{meta.get('namespace')}/{meta.get('name')}", ip=ip)
    return LocalPod(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        ips=tuple(valid),
        host_network=bool(spec.get("hostNetwork")),
        phase=status.get("phase", ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


class Cache:
    def __init__(self, *, node_addresses: Callable[[], set[str]],
                 on_rejected: Callable[[str, str, str], None] | None = None) -> None:
        self.pods: dict[PodRef, LocalPod] = {}
        self.endpoints: dict[PodRef, Endpoints] = {}
        self.by_pod: dict[PodRef, set[PodRef]] = defaultdict(set)
        self.rejected: dict[PodRef, str] = {}
        # the latest generation seen of every PolicyEndpoint, kept or not (an int each):
        # tells "programmed" callers whether the watch has delivered what the API has
        self.generations: dict[PodRef, int] = {}
        self._on_rejected = on_rejected
        self.dirty: set[PodRef] = set()
        self.changed = asyncio.Event()
        self._node_addresses = node_addresses
        self.pods_synced = False
        self.endpoints_synced = False

    # ---- shared -----------------------------------------------------------------------
    def _mark(self, refs: Iterable[PodRef]) -> None:
        local = [r for r in refs if r in self.pods or r in self.dirty]
        if local:
            self.dirty.update(local)
            self.changed.set()

    def take_dirty(self) -> set[PodRef]:
        dirty, self.dirty = self.dirty, set()
        self.changed.clear()
        return dirty

    def endpoints_for(self, pod: PodRef) -> list[Endpoints]:
        return [self.endpoints[k] for k in sorted(self.by_pod.get(pod, ()))
                if k in self.endpoints]

    def pod_by_ip(self) -> dict[str, LocalPod]:
        return {ip: p for p in self.pods.values() for ip in p.ips}

    # ---- pods ---------------------------------------------------------------------------
    def pods_consumer(self) -> _Pods:
        return _Pods(self)

    def _set_pod(self, pod: LocalPod | None, ref: PodRef) -> None:
        old = self.pods.get(ref)
        if pod is None:
            self.pods.pop(ref, None)
        else:
            self.pods[ref] = pod
        if old != pod:
            self.dirty.add(ref)
            self.changed.set()

    # ---- policy endpoints -------------------------------------------------------------
    def endpoints_consumer(self) -> _Endpoints:
        return _Endpoints(self)

    def _relevant(self, ep: Endpoints) -> bool:
        if ep.host_ips & self._node_addresses():
            return True
        return any(ref in self.pods for ref in ep.pods)

    def _set_endpoints(self, key: PodRef, obj: dict[str, Any] | None) -> None:
        old = self.endpoints.get(key)
        new: Endpoints | None = None
        if obj is None:
            self.generations.pop(key, None)
        else:
            try:
                self.generations[key] = int((obj.get("metadata") or {}).get("generation") or 0)
            except (TypeError, ValueError, AttributeError):
                self.generations[key] = 0
            try:
                new = from_api(obj)
            except PolicyEndpointError as exc:
                self.rejected[key] = exc.reason
                if self._on_rejected is not None:
                    self._on_rejected(key[0], key[1], exc.reason)
                log.error("policyendpoint.rejected", namespace=key[0], name=key[1],
                          reason=exc.reason, keeping="last accepted version" if old else "none")
                return
            self.rejected.pop(key, None)
            if not self._relevant(new):
                new = None
        if old is None and new is None:
            return
        if old is not None:
            for ref in old.pods:
                self.by_pod[ref].discard(key)
                if not self.by_pod[ref]:
                    del self.by_pod[ref]
        if new is None:
            self.endpoints.pop(key, None)
        else:
            self.endpoints[key] = new
            for ref in new.pods:
                self.by_pod[ref].add(key)
        self._mark((old.pods if old else frozenset()) | (new.pods if new else frozenset()))


class _Pods:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._seen: set[PodRef] = set()

    def begin(self) -> None:
        self._seen = set()

    def add(self, obj: dict[str, Any]) -> None:
        pod = _pod(obj)
        self._seen.add(pod.key)
        self.cache._set_pod(pod, pod.key)

    def end(self) -> None:
        for ref in set(self.cache.pods) - self._seen:
            self.cache._set_pod(None, ref)
        self._seen = set()
        self.cache.pods_synced = True
        self.cache.changed.set()  # a (re)list is news even when it changed nothing

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.begin()
        for obj in items:
            self.add(obj)
        self.end()

    def apply(self, event: WatchEvent) -> None:
        pod = _pod(event.object)
        self.cache._set_pod(None if event.type == "DELETED" else pod, pod.key)


class _Endpoints:
    """PolicyEndpoints are validated and compacted as they arrive, one list page at a
    time: the raw objects of a full list are never all in memory."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._seen: set[PodRef] = set()

    def begin(self) -> None:
        self._seen = set()

    def add(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self._seen.add(key)
        self.cache._set_endpoints(key, obj)

    def end(self) -> None:
        seen, self._seen = self._seen, set()
        for key in set(self.cache.endpoints) - seen:
            self.cache._set_endpoints(key, None)
        for key in set(self.cache.rejected) - seen:
            del self.cache.rejected[key]
        for key in set(self.cache.generations) - seen:
            del self.cache.generations[key]
        self.cache.endpoints_synced = True
        self.cache.changed.set()

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.begin()
        for obj in items:
            self.add(obj)
        self.end()

    def apply(self, event: WatchEvent) -> None:
        meta = event.object.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event.type == "DELETED":
            self.cache.rejected.pop(key, None)
            self.cache._set_endpoints(key, None)
        else:
            self.cache._set_endpoints(key, event.object)
