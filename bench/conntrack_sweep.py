"""Conntrack sweep benchmark: a full sweep of an N-entry datapath map against a kernel
table of N flows, next to the time `conntrack -L` takes to dump that same table.

Half the map's entries have a kernel flow (kept), half do not (removed). The kernel
entries are created over ctnetlink in a throwaway network namespace with conntrack
enabled; the kernel's nf_conntrack_max is raised for the run and restored.

    python -m bench.conntrack_sweep [--entries 500000] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
import uuid

from bench import ctwriter
from bench.common import prepare
from bpf import layout as lay
from bpf.datapath import Datapath
from conntrack import ctnetlink as ct
from conntrack.sweep import KernelRemover, Sweeper, now_ns
from simnode.netns import inside

MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"


def _addr(i: int, base: int) -> bytes:
    return struct.pack("!I", base + i).ljust(16, b"\0")


def populate(dp: Datapath, netns: str, n: int) -> None:
    """n map entries, the even ones with a kernel flow (orig tuple pod -> peer); and as
    many other kernel flows, unrelated to the map, so that the kernel table is as large
    as the map."""
    kernel: list[tuple[int, bytes, bytes, int, int, int]] = []
    keys, values = bytearray(), bytearray()
    seen = now_ns() - 10_000_000_000
    for i in range(n):
        pod = _addr(i % 60000, 0x0A420000)  # 10.66.x.x
        peer = _addr(i // 60000, 0x0A630000)  # 10.99.x.x
        pod_port, peer_port = 1024 + i % 60000, 80
        keys += struct.pack("<16s16sHHBB2xI", pod, peer, pod_port, peer_port, 6, 4, 7)
        values += struct.pack("<QQIBB2x", seen, seen, 1, lay.NP_DIR_EGRESS, 1)
        if i % 2 == 0:
            kernel.append((socket.AF_INET, pod, peer, 6, pod_port, peer_port))
        else:
            kernel.append((socket.AF_INET, pod, _addr(i // 60000, 0x0A640000), 17, pod_port, 53))
    dp.ct.raw.update_batch(bytes(keys), bytes(values))
    with inside(netns):
        writer = ctwriter.Writer()
        try:
            failures = writer.send(ct.IPCTNL_MSG_CT_NEW, kernel, timeout=3600)
        finally:
            writer.close()
    if failures:
        raise SystemExit(f"{failures} kernel entries could not be created (nf_conntrack_max?)")


TARGET = 1.3  # sweep / conntrack -L


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=500_000)
    p.add_argument("--quick", action="store_true", help="100k entries")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    prepare()
    n = 100_000 if args.quick else args.entries
    netns = f"npbench-{uuid.uuid4().hex[:6]}"
    pin_root = f"/sys/fs/bpf/npbench-{uuid.uuid4().hex[:6]}"
    with open(MAX_PATH) as f:
        old_max = f.read().strip()
    subprocess.run(["ip", "netns", "add", netns], check=True)
    dp = None
    try:
        with open(MAX_PATH, "w") as f:
            f.write(str(max(int(old_max), n + 100_000)))
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "sh",
                "-ec",
                """
            nft add table inet bench
            nft add chain inet bench forwarding '{ type filter hook forward priority 0; }'
            nft add rule inet bench forwarding ct state new,established accept""",
            ],
            check=True,
        )
        dp = Datapath.open(pin_root, ct_entries=1 << 20)
        t = time.perf_counter()
        populate(dp, netns, n)
        setup = time.perf_counter() - t

        def kernel_scan(family: int, wanted: set[bytes]) -> tuple[int, set[bytes]]:
            with inside(netns):
                return ct.scan(family, wanted)

        remover = KernelRemover.open(dp.pins.maps, dp.ct.raw.max_entries)
        try:
            res = Sweeper(dp.ct.raw, kernel_scan=kernel_scan, remover=remover).run()
        finally:
            remover.close()
        t = time.perf_counter()
        dumped = subprocess.run(
            ["ip", "netns", "exec", netns, "conntrack", "-L"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        dump_seconds = time.perf_counter() - t
        lines = dumped.stdout.count(b"\n")
    finally:
        if dp is not None:
            dp.close()
        Datapath.unpin(pin_root)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        with open(MAX_PATH, "w") as f:
            f.write(old_max)
    ratio = res.duration / dump_seconds
    removal_seconds = res.duration - res.snapshot_seconds - res.kernel_seconds
    figures = {
        "entries": n,
        "kernel_flows": res.kernel_entries,
        "removed": res.removed,
        "kept": res.kept,
        "sweep_seconds": round(res.duration, 3),
        "snapshot_seconds": round(res.snapshot_seconds, 3),
        "kernel_scan_seconds": round(res.kernel_seconds, 3),
        "removal_seconds": round(removal_seconds, 3),
        "conntrack_L_seconds": round(dump_seconds, 3),
        "conntrack_L_lines": lines,
        "sweep_to_dump_ratio": round(ratio, 2),
        # the limit: reading the kernel's table alone, next to the tool's dump of it
        "kernel_scan_to_dump_ratio": round(res.kernel_seconds / dump_seconds, 2),
        "target_ratio": TARGET,
        "setup_seconds": round(setup, 1),
    }
    print(f"{'map entries':<28}{n:>12,}")
    print(f"{'kernel flows':<28}{res.kernel_entries:>12,}")
    print(f"{'removed / kept':<28}{f'{res.removed:,} / {res.kept:,}':>12}")
    print(
        f"{'sweep (s)':<28}{res.duration:>12.3f}   snapshot {res.snapshot_seconds:.3f}, "
        f"kernel scan {res.kernel_seconds:.3f}, removals {removal_seconds:.3f}"
    )
    print(f"{'conntrack -L (s)':<28}{dump_seconds:>12.3f}")
    print(f"{'sweep / conntrack -L':<28}{ratio:>12.2f}   (target <= {TARGET})")
    print(
        f"{'kernel scan / conntrack -L':<28}{res.kernel_seconds / dump_seconds:>12.2f}"
        "   (the table's read alone)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if res.removed != n // 2 or res.kept != n - n // 2:
        sys.exit("unexpected sweep result: the benchmark's flows were not matched")


if __name__ == "__main__":
    main()
