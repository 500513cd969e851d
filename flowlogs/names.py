"""Names for the ids in decision events, from the agent's pinned maps (cached).

The agent writes ``np_pod_meta`` (pod id -> namespace/name) before a pod's first record
and ``np_policies`` (policy id -> namespace/name) before any rule carries the id, so a
lookup on a cache miss finds them; ids are never reused, so cached names never go stale.
The cache is bounded (least recently used names go first): the agent frees the names of
pods and policies that are gone (bpf.registry), and a node lives for months. Two threads
ask (the writer thread for records, the metrics export for the per-pod counters): a
lock keeps each cache consistent.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict

from bpf import layout as lay
from bpf.codec import meta_name
from bpf.maps import Map, TypedMap
from bpf.pins import PinPaths


class Names:
    def __init__(self, pin_root: str) -> None:
        pins = PinPaths(pin_root)
        self._pods = TypedMap(
            Map.from_pin(pins.map(lay.MAP_POD_META)), ctypes.c_uint32, lay.NpPodMeta
        )
        self._policies = TypedMap(
            Map.from_pin(pins.map(lay.MAP_POLICIES)), ctypes.c_uint32, lay.NpPolicyMeta
        )
        self._lock = threading.Lock()
        self._pod_cache: OrderedDict[int, str] = OrderedDict()
        self._policy_cache: OrderedDict[int, str] = OrderedDict()

    def close(self) -> None:
        self._pods.raw.close()
        self._policies.raw.close()

    def pod(self, pod_id: int) -> str:
        with self._lock:
            name = self._pod_cache.get(pod_id)
            if name is not None:
                self._pod_cache.move_to_end(pod_id)
                return name
        meta = self._pods.lookup(ctypes.c_uint32(pod_id)) if pod_id else None
        if meta is None:
            return ""  # not cached: the agent may name it a moment later
        name = meta_name(meta)
        with self._lock:
            _remember(self._pod_cache, pod_id, name)
        return name

    def policy(self, policy_id: int) -> str:
        with self._lock:
            name = self._policy_cache.get(policy_id)
            if name is not None:
                self._policy_cache.move_to_end(policy_id)
                return name
        meta = self._policies.lookup(ctypes.c_uint32(policy_id)) if policy_id else None
        if meta is None:
            return ""
        name = meta_name(meta)
        with self._lock:
            _remember(self._policy_cache, policy_id, name)
        return name


CACHE_SIZE = 4096  # names of each kind kept (the busiest pods and policies)


def _remember(cache: OrderedDict[int, str], key: int, name: str) -> None:
    cache[key] = name
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
