"""One sweep of the datapath's conntrack map against the kernel's conntrack table.

An entry is removed only if all three hold:
1. it was in the map when the sweep began (the snapshot, taken with batch lookups);
2. no live kernel flow has its endpoints, in either direction of the kernel's original or
   reply tuple (NAT-aware: a ClusterIP flow is recognised both by the client, which saw
   the service address, and by the backend, which saw the client after DNAT);
3. it was not used after the sweep began: its ``last_seen`` is re-read right before the
   delete, so a flow that reuses a just-freed port (and so the same key) keeps its entry.

Memory is bounded by the map: only the snapshot's idle candidates are kept while the
kernel table streams past (see ctnetlink.scan). Blocking by design: run it in a thread.

If the kernel reports no flows at all while the map has idle entries, the namespace's
kernel conntrack is probably not in use (nothing to compare with): then only entries idle
for longer than ``fallback_idle`` are removed, and the sweep says so.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog

from bpf import layout as lay
from bpf.maps import Map
from conntrack.ctnetlink import flow_key, scan

log = structlog.get_logger("conntrack.sweep")

_KEY = struct.Struct("<16s16sHHBB2xI")  # struct np_ct_key
_VALUE = struct.Struct("<QQIBB2x")      # struct np_ct_value
assert _KEY.size == 44
assert _VALUE.size == 24


def now_ns() -> int:
    """The datapath's clock (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class SweepResult:
    started_at: float = 0.0        # epoch seconds
    duration: float = 0.0          # seconds
    map_entries: int = 0           # in the snapshot
    idle: int = 0                  # not used since the sweep began (candidates)
    kernel_entries: int = 0        # flows in the kernel's table, both families
    live: int = 0                  # candidates with a live kernel flow
    touched: int = 0               # dead in the kernel but used meanwhile: kept
    young: int = 0                 # kept by the fallback rule (not idle long enough)
    removed: int = 0
    kept: int = 0
    fallback: bool = False         # the kernel had no flows: idle-time rule applied
    snapshot_seconds: float = 0.0
    kernel_seconds: float = 0.0

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def keys_of(raw_key: bytes) -> tuple[bytes, bytes]:
    """Both directions of the flow a map entry tracks, as ctnetlink.flow_key builds them."""
    pod, peer, pod_port, peer_port, proto, family, _ifindex = _KEY.unpack(raw_key)
    alen = 4 if family == lay.NP_FAMILY_IPV4 else 16
    pod, peer = pod[:alen], peer[:alen]
    pp, qp = struct.pack("!H", pod_port), struct.pack("!H", peer_port)
    return flow_key(pod, peer, pp, qp, proto), flow_key(peer, pod, qp, pp, proto)


class Sweeper:
    def __init__(self, ct_map: Map, *, fallback_idle: float = 1500.0,
                 kernel_scan: Callable[[int, set[bytes]], tuple[int, set[bytes]]] = scan
                 ) -> None:
        self.map = ct_map
        self.fallback_idle_ns = int(fallback_idle * 1e9)
        self.kernel_scan = kernel_scan

    def snapshot(self, started: int) -> tuple[int, dict[bytes, tuple[bytes, bytes]]]:
        """(entries in the map, idle entries: key -> its two flow keys)."""
        idle = {}
        entries = self.map.items()
        for k, v in entries:
            if _VALUE.unpack_from(v)[0] < started:
                idle[k] = keys_of(k)
        return len(entries), idle

    def run(self) -> SweepResult:
        res = SweepResult(started_at=time.time())
        t0 = time.monotonic()
        started = now_ns()
        res.map_entries, idle = self.snapshot(started)
        res.idle = len(idle)
        res.snapshot_seconds = time.monotonic() - t0
        wanted = {key for pair in idle.values() for key in pair}
        found: set[bytes] = set()
        t1 = time.monotonic()
        for family in (socket.AF_INET, socket.AF_INET6):
            n, live = self.kernel_scan(family, wanted)
            res.kernel_entries += n
            found |= live
        res.kernel_seconds = time.monotonic() - t1
        dead = [k for k, (fwd, rev) in idle.items() if fwd not in found and rev not in found]
        res.live = len(idle) - len(dead)
        old_enough = started
        if res.kernel_entries == 0 and dead:
            res.fallback = True
            old_enough = started - self.fallback_idle_ns
        for key in dead:
            current = self.map.lookup(key)
            if current is None:
                continue  # gone already (LRU eviction)
            last_seen = _VALUE.unpack_from(current)[0]
            if last_seen >= started:
                res.touched += 1
                continue
            if last_seen >= old_enough:
                res.young += 1
                continue
            if self.map.delete(key):
                res.removed += 1
        res.kept = res.idle - res.removed
        res.duration = time.monotonic() - t0
        return res
