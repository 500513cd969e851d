"""EnforceNpToPod latency: how long the VPC CNI's call for a new pod takes, as the CNI
makes it (real gRPC over the agent's Unix socket), on a node with P pods.

A simulated node with the real np-agent (strict mode) and P running pods, each selected
by its own policy of C CIDRs (PolicyEndpoints in the AWS controller's layout: a pod-only
object and a rule-only object). New pods are then wired the VPC CNI's way and announced
with EnforceNpToPod, one at a time, in three situations measured side by side:

- ``idle-known``: the node is quiet; the new pod's Pod object is there and a policy
  selects it by its labels, so the answer waits for those rules to be programmed;
- ``busy-known``: the same while the agent reprograms existing pods without pause (one
  pod's policy changes every 20 ms, C CIDRs recompiled each time);
- ``busy-unknown``: busy, and the Pod object has not arrived (standard mode in the call:
  the answer comes once the default is in force).

Reported: p50/p99/max of each, and busy/idle of the p50 and p99.

    python -m bench.cni_latency [--quick] [--pods 250] [--cidrs 1000] [--samples 60]
                                [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.cni.service import NpClient
from bench.common import prepare, table, write_json
from bench.programming import pct
from bpf.datapath import Datapath
from fakekube import store as fs
from simnode.node import SimNode, SimPod
from simnode.stack import NodeStack

NS = "default"
AGENT = (
    "--enable-network-policy=true",
    "--metrics-bind-addr=127.0.0.1:8162",
    "--health-probe-bind-addr=127.0.0.1:8163",
    "--log-level=warn",
    "--cni-answer-timeout=10",
)


def _cidrs(i: int, count: int, salt: int = 0) -> list[dict[str, str]]:
    base = (i * count + salt) % (1 << 22)
    return [
        {"cidr": f"11.{(base + k) // 65536 % 256}.{(base + k) // 256 % 256}.{(base + k) % 256}/32"}
        for k in range(count)
    ]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tag = f"npc{uuid.uuid4().hex[:4]}"
        self.sim = SimNode(tag)
        self.workdir = Path(tempfile.mkdtemp(prefix="np-bench-cni-"))
        self.pin_root = f"/sys/fs/bpf/np-bench-{tag}"
        self.stack = NodeStack(
            self.sim, pin_root=self.pin_root, workdir=self.workdir, mode="strict"
        )
        self.pods: list[SimPod] = []
        self.seq = 0
        self.client: NpClient | None = None

    def objects(self, i: int, pod: SimPod | None, salt: int = 0) -> list[dict[str, Any]]:
        """Policy i in the controller's layout: pods in one object, rules in another."""
        name = f"pol{i}"
        entries = (
            [
                {
                    "podIP": str(pod.ipv4),
                    "hostIP": str(self.sim.node_ipv4),
                    "name": pod.name,
                    "namespace": NS,
                }
            ]
            if pod
            else []
        )

        def obj(suffix: str, pods: list[dict[str, str]], ingress: list[Any]) -> dict[str, Any]:
            return {
                "metadata": {"name": f"{name}-{suffix}", "namespace": NS},
                "spec": {
                    "policyRef": {"name": name, "namespace": NS},
                    "podSelector": {"matchLabels": {"policy": name}},
                    "podIsolation": ["Ingress"],
                    "podSelectorEndpoints": pods,
                    "ingress": ingress,
                    "egress": [],
                },
            }

        return [obj("pods0", entries, []), obj("rules0", [], _cidrs(i, self.args.cidrs, salt))]

    def put(self, body: dict[str, Any]) -> None:
        store = self.stack.api.store
        meta = body["metadata"]
        try:
            current = store.get(fs.POLICY_ENDPOINTS, NS, meta["name"])
        except fs.ApiError:
            store.create(fs.POLICY_ENDPOINTS, NS, body)
            return
        body["metadata"] = dict(meta, resourceVersion=current["metadata"]["resourceVersion"])
        store.update(fs.POLICY_ENDPOINTS, NS, meta["name"], body)

    async def setup(self) -> None:
        await self.sim.start()
        await self.stack.start_api()
        for i in range(self.args.pods):
            pod = await self.sim.add_pod(f"p{i}")
            self.pods.append(pod)
            self.stack.create_pod_object(pod, namespace=NS, labels={"policy": f"pol{i}"})
            for body in self.objects(i, pod):
                self.put(body)
        await self.stack.start("agent", *AGENT)
        await self.stack.programmed(300)
        self.sim.cni_socket = self.stack.npa_socket
        self.sim.mode = "strict"
        # one connection for every call: what is measured is the agent's answer, not
        # this process's channel set-up (the CNI plugin, in Go, dials per call: +~1 ms)
        self.client = NpClient(self.stack.npa_socket)
        await self.client.healthy()

    async def churn(self, stop: asyncio.Event) -> int:
        """One existing pod's policy changes every 20 ms: the agent never rests."""
        n = 0
        while not stop.is_set():
            i = n % len(self.pods)
            self.put(self.objects(i, self.pods[i], salt=n + 1)[1])
            n += 1
            await asyncio.sleep(0.02)
        return n

    async def sample(self, *, known: bool) -> float:
        """One new pod, wired and announced; the seconds EnforceNpToPod took."""
        self.seq += 1
        name = f"new{self.seq}"
        policy = f"pol{self.seq % len(self.pods)}"
        if known:
            self.stack.api.store.create(
                fs.PODS,
                NS,
                {
                    "metadata": {"name": name, "namespace": NS, "labels": {"policy": policy}},
                    "spec": {"nodeName": self.stack.node, "containers": [{"name": "c"}]},
                    "status": {"phase": "Pending"},
                },
            )
        self.sim.call_cni = False
        pod = await self.sim.add_pod(name)
        started = time.perf_counter()
        assert self.client is not None
        ok = await self.client.enforce(
            namespace=NS, name=name, mode="strict" if known else "standard", timeout=30
        )
        elapsed = time.perf_counter() - started
        assert ok
        await self.sim.remove_pod(pod.name)
        if known:
            self.stack.api.store.delete(fs.PODS, NS, name)
        return elapsed

    async def measure(self, *, known: bool, busy: bool) -> list[float]:
        stop = asyncio.Event()
        churn = asyncio.create_task(self.churn(stop)) if busy else None
        try:
            if busy:
                await asyncio.sleep(1.0)  # the churn under way
            return [await self.sample(known=known) for _ in range(self.args.samples)]
        finally:
            stop.set()
            if churn is not None:
                await churn
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        with contextlib.suppress(Exception):
            await self.stack.close()
        await self.sim.close()
        Datapath.unpin(self.pin_root)
        shutil.rmtree(self.workdir, ignore_errors=True)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    figures: dict[str, Any] = {"pods": args.pods, "cidrs": args.cidrs, "samples": args.samples}
    try:
        await bench.setup()
        runs = {
            "idle-known": await bench.measure(known=True, busy=False),
            "busy-known": await bench.measure(known=True, busy=True),
            "busy-unknown": await bench.measure(known=False, busy=True),
        }
    finally:
        await bench.close()
    for name, values in runs.items():
        figures[name] = {
            "p50_ms": round(pct(values, 50) * 1000, 2),
            "p99_ms": round(pct(values, 99) * 1000, 2),
            "max_ms": round(max(values) * 1000, 2),
        }
    idle, busy = figures["idle-known"], figures["busy-known"]
    figures["busy_over_idle"] = {
        "p50": round(busy["p50_ms"] / idle["p50_ms"], 2),
        "p99": round(busy["p99_ms"] / idle["p99_ms"], 2),
    }
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="25 pods, 100 CIDRs, 20 samples")
    p.add_argument("--pods", type=int, default=250)
    p.add_argument("--cidrs", type=int, default=1000)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.pods, args.cidrs, args.samples = 25, 100, 20
    prepare()
    figures = asyncio.run(amain(args))
    rows = [
        [name, f["p50_ms"], f["p99_ms"], f["max_ms"]]
        for name, f in figures.items()
        if isinstance(f, dict) and "p50_ms" in f
    ]
    print(
        f"EnforceNpToPod on a node of {figures['pods']} pods x {figures['cidrs']} CIDRs "
        f"({figures['samples']} samples each)"
    )
    print(table(["situation", "p50 ms", "p99 ms", "max ms"], rows))
    ratio = figures["busy_over_idle"]
    print(f"busy / idle (programmed before the answer): p50 {ratio['p50']}, p99 {ratio['p99']}")
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
