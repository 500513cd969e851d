"""One sweep of the datapath's conntrack map against the kernel's conntrack table.

An entry is removed only if all three hold:
1. it was in the map when the sweep began (the snapshot, taken with batch lookups);
2. no live kernel flow carries the direction of packets sent by the pod. The kernel keeps
   that direction as its original tuple when the pod opened the flow (pre-DNAT: what the
   pod sent, e.g. to a ClusterIP) and as its reply tuple when the peer did (the backend
   answering the client as it saw it, after DNAT): one key per entry, matched against
   both tuples, is NAT-aware on both sides;
3. it was not used after the sweep began: its ``last_seen`` is re-read right before the
   delete, so a flow that reuses a just-freed port (and so the same key) keeps its entry.

Memory is bounded by the map: only the snapshot's idle candidates are kept while the
kernel table streams past (see ctnetlink.scan). Blocking by design: run it in a thread.

Entries of interfaces that have no pod record any more (the pod is gone) are removed at
the first sweep whatever the kernel says, unless used since the sweep began: nothing
enforces on that interface, and a node lives for months.

If the kernel reports no flows at all while the map has idle entries, the namespace's
kernel conntrack is probably not in use (nothing to compare with): then only entries idle
for longer than ``fallback_idle`` are removed, and the sweep says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

import structlog

from bpf import layout as lay
from bpf.errors import BpfError
from bpf.maps import Map
from bpf.objects import BpfObject
from conntrack.ctnetlink import _PORTED, raw_tuple, scan, tuple_key

log = structlog.get_logger("conntrack.sweep")

_KEY = lay.packer(lay.NpCtKey)
_VALUE = lay.packer(lay.NpCtValue)
_LAST_SEEN = struct.Struct("<Q")  # np_ct_value.last_seen_ns (u64), read in place
_LAST_SEEN_AT = lay.offset(lay.NpCtValue, "last_seen_ns")
# byte offsets in a raw np_ct_key (the sweep reads keys as bytes, many at once)
_PEER_AT = lay.offset(lay.NpCtKey, "peer_addr")
_POD_PORT_AT = lay.offset(lay.NpCtKey, "pod_port")
_PEER_PORT_AT = lay.offset(lay.NpCtKey, "peer_port")
_PROTO_AT = lay.offset(lay.NpCtKey, "protocol")
_FAMILY_AT = lay.offset(lay.NpCtKey, "family")


CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; Python's time module does not name it


_NEVER = (1 << 64) - 1  # a last-seen time no entry has


def now_ns() -> int:
    """The clock of the datapath's conntrack timestamps (bpf_ktime_get_coarse_ns is
    CLOCK_MONOTONIC_COARSE). The same clock matters: a packet after the sweep began gets a
    last-seen at or after its start, never a tick before it."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


@dataclass
class SweepResult:
    started_at: float = 0.0  # epoch seconds
    duration: float = 0.0  # seconds
    map_entries: int = 0  # in the snapshot
    idle: int = 0  # not used since the sweep began (candidates)
    kernel_entries: int = 0  # flows in the kernel's table, both families
    live: int = 0  # candidates with a live kernel flow
    touched: int = 0  # dead in the kernel but used meanwhile: kept
    young: int = 0  # kept by the fallback rule (not idle long enough)
    removed: int = 0
    orphans: int = 0  # of the removed: their interface has no pod record
    kept: int = 0
    fallback: bool = False  # the kernel had no flows: idle-time rule applied
    snapshot_seconds: float = 0.0
    kernel_seconds: float = 0.0

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def key_of(raw_key: bytes) -> bytes:
    """The pod-sent direction of the flow a map entry tracks, as the kernel's table shows
    it (see ctnetlink.tuple_key)."""
    alen = 4 if raw_key[_FAMILY_AT] == lay.NP_FAMILY_IPV4 else 16
    pod, peer = raw_key[0:alen], raw_key[_PEER_AT : _PEER_AT + alen]
    pp, qp = _POD_PORT_AT, _PEER_PORT_AT  # little-endian in the map, big on the wire
    pod_port = raw_key[pp + 1 : pp + 2] + raw_key[pp : pp + 1]
    peer_port = raw_key[qp + 1 : qp + 2] + raw_key[qp : qp + 1]
    return tuple_key(pod, peer, pod_port, peer_port, raw_key[_PROTO_AT])


def _raw_chunks(v6: bool) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """The constant parts of ctnetlink.raw_tuple around (src, dst, proto, sport, dport),
    cut out of a packed example so that they cannot drift from it."""
    alen = 16 if v6 else 4
    src, dst = b"\x01" * alen, b"\x02" * alen
    sample = raw_tuple(src, dst, 6, b"\x03\x03", b"\x04\x04")
    a = sample.index(src)
    b = sample.index(dst)
    c = b + alen + 8  # the protocol number sits after the PROTO nest and NUM headers
    d = sample.index(b"\x03\x03")
    e = sample.index(b"\x04\x04")
    return (
        sample[:a],
        sample[a + alen : b],
        sample[b + alen : c],
        sample[c + 1 : d],
        sample[d + 2 : e],
    )


_V4_PARTS, _V6_PARTS = _raw_chunks(False), _raw_chunks(True)
_TAIL = b"\0\0"
_PROTO_BYTE = [bytes((p,)) for p in range(256)]


_IFINDEX = struct.Struct("<I")
_IFINDEX_AT = lay.NpCtKey.ifindex.offset


class KernelRemover:
    """The sweep's removals in the kernel (bpf/sweep.bpf.c): a batch of keys is written
    into np_sweep_keys and np_sweep checks and removes them, NP_SWEEP_BATCH per run,
    with the same rule as :meth:`Map.delete_unless` applies one syscall at a time."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.prog = obj.programs[lay.SWEEP_PROG]
        self.keys = obj.maps[lay.SWEEP_KEYS_MAP]
        self._index = b"".join(i.to_bytes(4, sys.byteorder) for i in range(lay.NP_SWEEP_BATCH))

    @classmethod
    def open(cls, map_dir: str, ct_entries: int) -> KernelRemover:
        """Load next to the pinned np_ct under ``map_dir`` (which must exist: it is never
        created here). Raises BpfError where the kernel cannot (before Linux 5.17)."""
        if not os.path.exists(os.path.join(map_dir, lay.MAP_CT)):
            raise BpfError(errno.ENOENT, f"no {lay.MAP_CT} pinned under {map_dir}")
        path = str(resources.files("bpf").joinpath(lay.SWEEP_OBJECT_FILE))
        return cls(BpfObject.load(path, map_pin_dir=map_dir, max_entries={lay.MAP_CT: ct_entries}))

    def remove(self, keys: list[bytes], *, started: int, old_enough: int) -> tuple[int, int, int]:
        """(removed, touched, young) of ``keys``; keys already gone are skipped."""
        removed = touched = young = 0
        batch = lay.NP_SWEEP_BATCH
        for at in range(0, len(keys), batch):
            chunk = keys[at : at + batch]
            self.keys.update_batch(self._index[: 4 * len(chunk)], b"".join(chunk))
            args = lay.NpSweepArgs(started_ns=started, old_enough_ns=old_enough, count=len(chunk))
            ctx = ctypes.create_string_buffer(bytes(args), ctypes.sizeof(args))
            self.prog.run_syscall(ctx)
            out = lay.NpSweepArgs.from_buffer_copy(ctx.raw)
            removed, touched, young = (
                removed + out.removed,
                touched + out.touched,
                young + out.young,
            )
        return removed, touched, young

    def close(self) -> None:
        self.obj.close()


class SyscallRemover:
    """The same removals as KernelRemover, one syscall per entry (Map.delete_unless):
    for kernels that cannot run np_sweep."""

    def __init__(self, ct_map: Map) -> None:
        self.map = ct_map

    def remove(self, keys: list[bytes], *, started: int, old_enough: int) -> tuple[int, int, int]:
        """(removed, touched, young) of ``keys``; keys already gone are skipped."""
        touched = young = 0
        unpack = _LAST_SEEN.unpack_from

        def keep(value: bytes) -> bool:
            nonlocal touched, young
            last_seen = unpack(value)[0]
            if last_seen >= started:
                touched += 1
                return True
            if last_seen >= old_enough:
                young += 1
                return True
            return False

        removed = self.map.delete_unless(keys, keep) if keys else 0
        return removed, touched, young


class Sweeper:
    def __init__(
        self,
        ct_map: Map,
        *,
        fallback_idle: float = 1500.0,
        kernel_scan: Callable[[int, set[bytes]], tuple[int, set[bytes]]] = scan,
        interfaces: Callable[[], set[int]] | None = None,
        remover: KernelRemover | None = None,
    ) -> None:
        """``interfaces``: the host interfaces with a pod record (np_pods' keys); None:
        not checked. ``remover``: removals in batches in the kernel; None: one syscall
        per entry (Map.delete_unless), where the kernel cannot run it."""
        self.map = ct_map
        self.remover: KernelRemover | SyscallRemover = remover or SyscallRemover(ct_map)
        self.fallback_idle_ns = int(fallback_idle * 1e9)
        self.kernel_scan = kernel_scan
        self.interfaces = interfaces

    def snapshot(self, started: int) -> tuple[int, dict[bytes, bytes]]:
        """(entries in the map, idle entries: map key -> flow key). The hot loop of the
        sweep: keys are cut from the batch buffers and built from precomputed parts (the
        same bytes as key_of)."""
        idle: dict[bytes, bytes] = {}
        join = b"".join
        total = 0
        ks, vs, seen_at = _KEY.size, _VALUE.size, _LAST_SEEN_AT
        proto_at, family_at, v4 = _PROTO_AT, _FAMILY_AT, lay.NP_FAMILY_IPV4
        # the key's fields as slices (ports swapped: little-endian in the map)
        pod4, peer4 = slice(0, 4), slice(_PEER_AT, _PEER_AT + 4)
        pod6, peer6 = slice(0, 16), slice(_PEER_AT, _PEER_AT + 16)
        pp, qp = _POD_PORT_AT, _PEER_PORT_AT
        pp_hi, pp_lo, qp_hi, qp_lo = (
            slice(pp + 1, pp + 2),
            slice(pp, pp + 1),
            slice(qp + 1, qp + 2),
            slice(qp, qp + 1),
        )
        # per (family, protocol): the parts between the addresses and the ports, joined
        mids: dict[tuple[int, int], tuple[bytes, bytes, bytes, bytes]] = {}
        for fam, parts in ((v4, _V4_PARTS), (lay.NP_FAMILY_IPV6, _V6_PARTS)):
            p0, p1, p2, p3, p4 = parts
            for proto in _PORTED:
                mids[(fam, proto)] = (p0, p1, p2 + _PROTO_BYTE[proto] + p3, p4)
        assert seen_at % 8 == 0, "np_ct_value.last_seen_ns is 8-byte aligned"
        assert vs % 8 == 0, "np_ct_value's size is a multiple of 8"
        step, first = vs // 8, seen_at // 8
        for keys, values, count in self.map.batches():
            total += count
            seen = memoryview(values).cast("Q")  # last_seen_ns of entry i at first + i * step
            for i in range(count):
                if seen[first + i * step] >= started:
                    continue
                k = keys[i * ks : (i + 1) * ks]
                mid = mids.get((k[family_at], k[proto_at]))
                if mid is None:
                    idle[k] = key_of(k)
                    continue
                p0, p1, p23, p4 = mid
                pod, peer = (pod4, peer4) if k[family_at] == v4 else (pod6, peer6)
                idle[k] = join(
                    (
                        p0,
                        k[pod],
                        p1,
                        k[peer],
                        p23,
                        k[pp_hi],
                        k[pp_lo],
                        p4,
                        k[qp_hi],
                        k[qp_lo],
                        _TAIL,
                    )
                )
        return total, idle

    def run(self) -> SweepResult:
        res = SweepResult(started_at=time.time())
        t0 = time.monotonic()
        started = now_ns()
        res.map_entries, idle = self.snapshot(started)
        res.idle = len(idle)
        res.snapshot_seconds = time.monotonic() - t0
        orphaned: set[bytes] = set()
        if self.interfaces is not None:
            live_ifs = self.interfaces()
            unpack_if = _IFINDEX.unpack_from
            orphaned = {k for k in idle if unpack_if(k, _IFINDEX_AT)[0] not in live_ifs}
        wanted = {flow for k, flow in idle.items() if k not in orphaned}
        found: set[bytes] = set()
        t1 = time.monotonic()
        for family in (socket.AF_INET, socket.AF_INET6):
            n, live = self.kernel_scan(family, wanted)
            res.kernel_entries += n
            found |= live
        res.kernel_seconds = time.monotonic() - t1
        dead = [k for k, flow in idle.items() if k in orphaned or flow not in found]
        res.live = len(idle) - len(dead)
        old_enough = started
        if res.kernel_entries == 0 and dead:
            res.fallback = True
            old_enough = started - self.fallback_idle_ns
        orphans = [k for k in dead if k in orphaned]
        others = [k for k in dead if k not in orphaned]
        # an orphan is kept only if touched: "young" is the fallback rule's alone
        removed, touched, _ = self.remover.remove(orphans, started=started, old_enough=_NEVER)
        res.orphans, res.touched = removed, touched
        removed, touched, young = self.remover.remove(
            others, started=started, old_enough=old_enough
        )
        res.removed = res.orphans + removed
        res.touched, res.young = res.touched + touched, young
        res.kept = res.idle - res.removed
        res.duration = time.monotonic() - t0
        return res
