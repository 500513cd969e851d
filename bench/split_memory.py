"""Memory and time of the agent with policies split the way the AWS controller splits
them, side by side with the same rules in one object per policy, in one run.

A simulated node with P local pods; L policies select them (policy i selects pod i % P),
each written either as C objects in the controller's layout (one pod-only object and
C-1 rule-only objects of E entries) or as one object holding the pods and all the
entries. R more policies select pods of other nodes (same namespace, same layout): the
agent keeps only stubs of those. For each layout a fresh agent starts on an empty pin
root: time to every pod programmed, its RSS then, and the objects it keeps and stubs.

    python -m bench.split_memory [--quick] [--pods 250] [--policies 1000] [--chunks 5]
                                 [--entries 50] [--remote 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import prepare, table, write_json
from bench.programming import AGENT, usage
from bpf.datapath import Datapath
from common.apimodels import NodeStatus, WaitResult
from common.localapi import Unavailable
from fakekube import store as fs
from simnode.node import SimNode, SimPod
from simnode.stack import NodeStack

NS = "bench"
REMOTE_HOST = "192.0.2.200"  # a node that is not this one (TEST-NET-1: never routed)


def _cidr(i: int, k: int) -> str:
    n = i * 4096 + k
    return f"11.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}/32"


def objects(
    *, policy: int, layout: str, pod: dict[str, str], chunks: int, entries: int
) -> list[dict[str, Any]]:
    name = f"pol{policy}"
    rules = [
        [{"cidr": _cidr(policy, c * entries + k)} for k in range(entries)]
        for c in range(chunks - 1)
    ]

    def obj(
        suffix: str, pods: list[dict[str, str]], ingress: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "metadata": {"name": f"{name}-{suffix}", "namespace": NS},
            "spec": {
                "policyRef": {"name": name, "namespace": NS},
                "podIsolation": ["Ingress"],
                "podSelectorEndpoints": pods,
                "ingress": ingress,
                "egress": [],
            },
        }

    if layout == "single":
        return [obj("a0000", [pod], [e for chunk in rules for e in chunk])]
    return [
        obj("a0000", [pod], []),
        *(obj(f"r{c:04d}", [], chunk) for c, chunk in enumerate(rules)),
    ]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tag = f"nps{uuid.uuid4().hex[:4]}"
        self.sim = SimNode(tag)
        self.workdir = Path(tempfile.mkdtemp(prefix="np-bench-split-"))
        self.pin_root = f"/sys/fs/bpf/np-bench-{tag}"
        self.stack = NodeStack(
            self.sim, pin_root=self.pin_root, workdir=self.workdir, ct_entries=262144
        )
        self.pods: list[SimPod] = []
        self.figures: dict[str, Any] = {
            k: getattr(args, k) for k in ("pods", "policies", "chunks", "entries", "remote")
        }

    async def setup(self) -> None:
        await self.sim.start()
        await self.stack.start_api()
        self.stack.api.store.create(fs.NAMESPACES, None, {"metadata": {"name": NS}})
        for i in range(self.args.pods):
            pod = await self.sim.add_pod(f"p{i}")
            self.pods.append(pod)
            self.stack.create_pod_object(pod, namespace=NS)

    def write(self, layout: str) -> int:
        store = self.stack.api.store
        for ns, name in list(store.objects[fs.POLICY_ENDPOINTS]):
            store.delete(fs.POLICY_ENDPOINTS, ns, name)
        a = self.args
        count = 0
        for i in range(a.policies + a.remote):
            if i < a.policies:
                p = self.pods[i % a.pods]
                pod = {
                    "podIP": str(p.ipv4),
                    "hostIP": str(self.sim.node_ipv4),
                    "name": p.name,
                    "namespace": NS,
                }
            else:
                pod = {
                    "podIP": f"10.250.{i // 256 % 256}.{i % 256}",
                    "hostIP": REMOTE_HOST,
                    "name": f"remote{i}",
                    "namespace": NS,
                }
            for obj in objects(
                policy=i, layout=layout, pod=pod, chunks=a.chunks, entries=a.entries
            ):
                store.create(fs.POLICY_ENDPOINTS, NS, obj)
                count += 1
        store.compact()
        gc.collect()
        gc.freeze()  # the fake API's objects live in this process: keep GC off them
        return count

    async def wait_all(self, timeout: float) -> WaitResult:
        deadline = time.monotonic() + timeout
        while True:
            try:
                res = await self.stack.agent.get(
                    "/v1/wait", WaitResult, params={"timeout": "30"}, timeout=60
                )
                if res.programmed or time.monotonic() > deadline:
                    return res
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def run_layout(self, layout: str) -> dict[str, Any]:
        count = self.write(layout)
        started = time.monotonic()
        await self.stack.start("agent", *AGENT)
        res = await self.wait_all(timeout=900)
        took = time.monotonic() - started
        await asyncio.sleep(2)  # settle: memory released after the first reconcile
        use = await usage(self.stack, 1.0)
        status = await self.stack.agent.get("/v1/status", NodeStatus)
        phases = self._phases()
        await self.stack.stop("agent")
        Datapath.unpin(self.pin_root)
        gc.unfreeze()
        out = {
            "objects": count,
            "programmed": res.programmed,
            "seconds": round(took, 2),
            "agent_rss_mb": use["agent"].rss_mb,
            "kept": status.policyendpoints,
            "stubs": status.policyendpoint_stubs,
            **phases,
        }
        print(
            f"  {layout}: {count} objects, every pod programmed in {took:.2f} s, "
            f"RSS {use['agent'].rss_mb} MB, kept {out['kept']}, stubs {out['stubs']}",
            flush=True,
        )
        return out

    def _phases(self) -> dict[str, float]:
        """From the agent's log: seconds from its first line to the watches' sync, and
        the first full reconcile's milliseconds."""
        out: dict[str, float] = {}
        first = None
        text = self.stack.log_file("agent").read_text()
        for line in text.rsplit("---- run ", 1)[-1].splitlines():  # this run's lines
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            ts = datetime.fromisoformat(str(event.get("timestamp")).replace("Z", "+00:00"))
            first = first or ts
            if event.get("event") == "enforcer.synced":
                out["synced_seconds"] = round((ts - first).total_seconds(), 2)
            if event.get("event") == "enforcer.programmed" and "reconcile_ms" not in out:
                out["reconcile_ms"] = float(event.get("ms", 0))
        return out

    async def close(self) -> None:
        await self.stack.close()
        await self.sim.close()
        Datapath.unpin(self.pin_root)
        shutil.rmtree(self.workdir, ignore_errors=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        print(
            f"split memory: {args.pods} pods, {args.policies} local + {args.remote} remote "
            f"policies, {args.chunks} objects x {args.entries} entries",
            flush=True,
        )
        await bench.setup()
        for layout in ("controller", "single"):
            bench.figures[layout] = await bench.run_layout(layout)
    finally:
        await bench.close()
    f = bench.figures
    f["rss_ratio_split_vs_single"] = round(
        f["controller"]["agent_rss_mb"] / f["single"]["agent_rss_mb"], 3
    )
    print(
        table(
            ["layout", "objects", "programmed s", "agent RSS MB", "kept", "stubs"],
            [
                [
                    k,
                    f[k]["objects"],
                    f[k]["seconds"],
                    f[k]["agent_rss_mb"],
                    f[k]["kept"],
                    f[k]["stubs"],
                ]
                for k in ("controller", "single")
            ],
        )
    )
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="25 pods, 100 + 100 policies")
    p.add_argument("--pods", type=int, default=250)
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--entries", type=int, default=50)
    p.add_argument("--remote", type=int, default=1000)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if args.quick:
        args.pods, args.policies, args.remote = 25, 100, 100
    prepare()
    figures = asyncio.run(main_async(args))
    if args.json:
        write_json(args.json, {"split_memory": figures})


if __name__ == "__main__":
    main()
