"""Programming benchmark: how fast policy changes reach the datapath, and what the node
processes cost, on a simulated node with the real processes and the fake API server.

  1. full node from cold start: P pods, each selected by its own NetworkPolicy of C
     ipBlock CIDRs (distinct per pod). The resolver writes the PolicyEndpoints first
     (its cold-start time is reported), then np-agent starts on an empty pin root: time
     from process start to every pod programmed (`/v1/wait`), and the agent's RSS.
  2. restart re-adoption: SIGTERM the agent, start it again: time to ready and every pod
     programmed (the datapath enforced throughout: the pins hold it).
  3. one pod, PolicyEndpoint change -> in the maps (the time the agent records when its
     map writes return), and -> `/v1/wait` answers "programmed" (which re-reads the
     namespace's PolicyEndpoints from the API server first): p50/p99.
  4. NetworkPolicy change -> PolicyEndpoint written by the resolver: p50/p99; and the
     end to end NetworkPolicy -> programmed.
  5. footprint: RSS and CPU of np-agent, np-resolver, np-conntrack, np-flowlogs at idle
     and while 3 and 4 run (a steady stream of changes).

    python -m bench.programming [--quick] [--pods 250] [--cidrs 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import prepare, table, write_json
from bpf.datapath import Datapath
from common.apimodels import PodView, WaitResult
from common.localapi import Unavailable
from fakekube import store as fs
from simnode.node import SimNode, SimPod
from simnode.stack import NodeStack

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
AGENT = (
    "--enable-network-policy=true",
    "--metrics-bind-addr=127.0.0.1:8162",
    "--health-probe-bind-addr=127.0.0.1:8163",
    "--log-level=info",
)


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Usage:
    rss_mb: float
    cpu_cores: float


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


async def usage(stack: NodeStack, seconds: float) -> dict[str, Usage]:
    """CPU (cores) over ``seconds`` and RSS at the end, per running process."""
    pids = {n: p.pid for n, p in stack.procs.items() if p.returncode is None}
    before = {n: _ticks(pid) for n, pid in pids.items()}
    started = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - started
    return {
        n: Usage(round(_rss_mb(pid), 1), round((_ticks(pid) - before[n]) / HZ / wall, 3))
        for n, pid in pids.items()
    }


def policy(i: int, cidrs: int, *, variant: int = 0) -> dict[str, Any]:
    """NetworkPolicy p<i>: pod p<i> accepts from ``cidrs`` distinct /28s (and, as the
    changing part, one /32 that depends on ``variant``)."""
    base = int(ipaddress.IPv4Address("11.0.0.0")) + i * cidrs * 16
    blocks = [
        {"ipBlock": {"cidr": str(ipaddress.IPv4Network((base + j * 16, 28)))}}
        for j in range(cidrs - 1)
    ]
    blocks.append(
        {
            "ipBlock": {
                "cidr": f"12.{variant // 65536 % 256}.{variant // 256 % 256}.{variant % 256}/32"
            }
        }
    )
    return {
        "metadata": {"name": f"p{i}", "namespace": "bench"},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"p{i}"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": blocks}],
        },
    }


class Bench:
    def __init__(
        self, pods: int, cidrs: int, samples: int, window: float, *, keep_logs: bool = False
    ) -> None:
        self.keep_logs = keep_logs
        tag = f"npg{uuid.uuid4().hex[:4]}"
        self.sim = SimNode(tag)
        self.workdir = Path(tempfile.mkdtemp(prefix="np-bench-"))
        self.pin_root = f"/sys/fs/bpf/np-bench-{tag}"
        self.stack = NodeStack(
            self.sim, pin_root=self.pin_root, workdir=self.workdir, ct_entries=262144
        )
        self.n_pods, self.n_cidrs, self.samples, self.window = pods, cidrs, samples, window
        self.pods: list[SimPod] = []
        self.figures: dict[str, Any] = {"pods": pods, "cidrs_per_pod": cidrs}
        # how each /v1/wait answer was checked with the API server (WaitResult.api_check)
        self.wait_checks: Counter[str] = Counter()

    # ---- setup ------------------------------------------------------------------------
    async def setup(self) -> None:
        await self.sim.start()
        await self.stack.start_api()
        store = self.stack.api.store
        store.create(fs.NAMESPACES, None, {"metadata": {"name": "bench"}})
        started = time.monotonic()
        for i in range(self.n_pods):
            pod = await self.sim.add_pod(f"p{i}")
            self.pods.append(pod)
            self.stack.create_pod_object(pod, namespace="bench", labels={"app": f"p{i}"})
            store.create(fs.NETWORK_POLICIES, "bench", policy(i, self.n_cidrs))
        # a pod for the single-pod latency, outside every policy
        self.probe = await self.sim.add_pod("single")
        self.stack.create_pod_object(self.probe, namespace="bench", labels={"app": "single"})
        print(
            f"  {self.n_pods} pods and policies created in {time.monotonic() - started:.1f} s",
            flush=True,
        )

    def freeze_store(self) -> None:
        """The fake API server's objects (hundreds of thousands of dicts, in this process)
        leave the garbage collector's view: a full collection over them would stall the
        API server (and so the figures) for 100 ms and more, which a real one does not."""
        gc.collect()
        gc.freeze()

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

    def _policyendpoints(self) -> int:
        return len(self.stack.api.store.objects[fs.POLICY_ENDPOINTS])

    # ---- 1 and 2 ----------------------------------------------------------------------
    async def cold_start(self) -> None:
        started = time.monotonic()
        await self.stack.start("resolver", "--log-level=warn")
        expected = self.n_pods * -(-self.n_cidrs // 200)  # 200 entries per object
        while self._policyendpoints() < expected:  # noqa: ASYNC110 (polling the store)
            await asyncio.sleep(0.05)
        await self.stack.resolver_caught_up(timeout=600)
        resolver_s = time.monotonic() - started
        started = time.monotonic()
        await self.stack.start("agent", *AGENT)
        res = await self.wait_all(timeout=600)
        agent_s = time.monotonic() - started
        use = await usage(self.stack, 1.0)
        self.figures["cold_start"] = {
            "resolver_seconds": round(resolver_s, 2),
            "policyendpoints": expected,
            "agent_seconds": round(agent_s, 2),
            "programmed": res.programmed,
            "agent_rss_mb": use["agent"].rss_mb,
            "reconcile_ms": self._first_reconcile_ms(),
        }
        print(
            f"  cold start: resolver {resolver_s:.2f} s for {expected} PolicyEndpoints, "
            f"agent {agent_s:.2f} s to {self.n_pods} pods programmed, "
            f"RSS {use['agent'].rss_mb} MB",
            flush=True,
        )

    def _first_reconcile_ms(self) -> float | None:
        import json

        for line in self.stack.log_file("agent").read_text().splitlines():
            if '"enforcer.programmed"' in line:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("pods", 0) >= self.n_pods:
                    return float(event["ms"])
        return None

    async def floor(self) -> None:
        """bench.floor in a process of its own, as the agent runs: its imports, and the
        node's PolicyEndpoints listed and parsed (what no start can skip)."""
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--net=/run/netns/{self.sim.netns}",  # where the agent reaches the API server
            sys.executable,
            "-m",
            "bench.floor",
            f"--kubeconfig={self.stack.kubeconfig}",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        fig = json.loads(out)
        fig["process_seconds"] = round(time.monotonic() - started, 3)
        self.figures["floor"] = fig
        print(
            f"  floor: imports {fig['import_seconds']:.2f} s, {fig['objects']} "
            f"PolicyEndpoints listed in {fig['list_seconds']:.2f} s, parsed in "
            f"{fig['parse_seconds']:.2f} s; both, overlapped as the agent's watch does, "
            f"{fig['list_and_parse_seconds']:.2f} s",
            flush=True,
        )

    async def restart(self) -> None:
        await self.stack.stop("agent")
        started = time.monotonic()
        await self.stack.start("agent", *AGENT)
        res = await self.wait_all(timeout=600)
        took = time.monotonic() - started
        self.figures["restart"] = {"seconds": round(took, 2), "programmed": res.programmed}
        print(f"  restart: re-adopted and every pod programmed in {took:.2f} s", flush=True)

    # ---- 3 and 4 ----------------------------------------------------------------------
    async def single_pod(self) -> tuple[list[float], list[float]]:
        """PolicyEndpoint written -> in the maps (the time the agent recorded when its map
        writes returned, read back from its pod view), and -> ``/v1/wait`` answers
        "programmed" (which also re-reads the namespace's PolicyEndpoints from the API
        server: the caller's end-to-end figure)."""
        store = self.stack.api.store
        to_maps: list[float] = []
        to_wait: list[float] = []
        for k in range(self.samples):
            body: dict[str, Any] = {
                "metadata": {"name": "single-pe", "namespace": "bench"},
                "spec": {
                    "policyRef": {"name": "single", "namespace": "bench"},
                    "podIsolation": ["Ingress"],
                    "podSelectorEndpoints": [
                        {
                            "podIP": str(self.probe.ipv4),
                            "hostIP": str(self.sim.node_ipv4),
                            "name": "single",
                            "namespace": "bench",
                        }
                    ],
                    "ingress": [{"cidr": f"13.0.{k // 256 % 256}.{k % 256}/32"}],
                },
            }
            written, started = time.time(), time.monotonic()
            try:
                current = store.get(fs.POLICY_ENDPOINTS, "bench", "single-pe")
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                store.update(fs.POLICY_ENDPOINTS, "bench", "single-pe", body)
            except fs.ApiError:
                store.create(fs.POLICY_ENDPOINTS, "bench", body)
            res = await self.stack.agent.get(
                "/v1/wait",
                WaitResult,
                params=[("pod", "bench/single"), ("timeout", "10")],
                timeout=20,
            )
            self.wait_checks[res.api_check or "none"] += 1
            if res.programmed:
                to_wait.append((time.monotonic() - started) * 1000)
                view = await self.stack.agent.get("/v1/pods/bench/single", PodView)
                if view.programmed_at is not None:
                    to_maps.append((view.programmed_at - written) * 1000)
            await asyncio.sleep(0.02)
        return to_maps, to_wait

    async def policy_changes(self) -> tuple[list[float], list[float]]:
        """NetworkPolicy updated -> its PolicyEndpoint carries the change (resolver), and
        -> the pod programmed (resolver + agent)."""
        store = self.stack.api.store
        to_pe: list[float] = []
        to_programmed: list[float] = []
        # PolicyEndpoint writes as the API server's watchers see them (no polling: the
        # API server runs in this process and must not be starved)
        watcher = fs.Watcher(fs.POLICY_ENDPOINTS, "bench", None, None)
        store.watchers.add(watcher)
        try:
            for k in range(self.samples):
                await self._one_policy_change(k, watcher, to_pe, to_programmed)
        finally:
            store.watchers.discard(watcher)
        return to_pe, to_programmed

    async def _one_policy_change(
        self, k: int, watcher: fs.Watcher, to_pe: list[float], to_programmed: list[float]
    ) -> None:
        """One NetworkPolicy update, timed to its PolicyEndpoint and to "programmed"."""
        store = self.stack.api.store
        i = k % self.n_pods
        variant = 1000 + k
        cidr = f"12.{variant // 65536 % 256}.{variant // 256 % 256}.{variant % 256}/32"
        body = policy(i, self.n_cidrs, variant=variant)
        current = store.get(fs.NETWORK_POLICIES, "bench", f"p{i}")
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        started = time.monotonic()
        store.update(fs.NETWORK_POLICIES, "bench", f"p{i}", body)
        while True:
            ev = await asyncio.wait_for(watcher.queue.get(), 30)
            pe = ev["object"] if ev else {}
            if pe.get("spec", {}).get("policyRef", {}).get("name") == f"p{i}" and any(
                e.get("cidr") == cidr for e in pe["spec"].get("ingress") or []
            ):
                break
        to_pe.append((time.monotonic() - started) * 1000)
        res = await self.stack.agent.get(
            "/v1/wait", WaitResult, params=[("pod", f"bench/p{i}"), ("timeout", "10")], timeout=20
        )
        if res.programmed:
            to_programmed.append((time.monotonic() - started) * 1000)
        await asyncio.sleep(0.02)

    async def changes_and_footprint(self) -> None:
        await self.stack.start("conntrack", "--conntrack-cache-cleanup-period=5")
        await self.stack.start(
            "flowlogs",
            "--enable-policy-event-logs=true",
            f"--log-file={self.workdir / 'flows.log'}",
        )
        await asyncio.sleep(2)
        idle = await usage(self.stack, self.window)
        load_task = asyncio.create_task(usage(self.stack, self.window), name="bench-usage")
        to_maps, to_wait = await self.single_pod()
        to_pe, to_programmed = await self.policy_changes()
        busy = await load_task
        self.figures["latency_ms"] = {
            "policyendpoint_to_maps": _summary(to_maps),
            "policyendpoint_to_wait_answer": _summary(to_wait),
            "networkpolicy_to_policyendpoint": _summary(to_pe),
            "networkpolicy_to_programmed": _summary(to_programmed),
        }
        self.figures["wait_checks"] = dict(self.wait_checks)
        self.figures["footprint"] = {
            "idle": {n: vars(u) for n, u in idle.items()},
            "under_changes": {n: vars(u) for n, u in busy.items()},
        }

    async def close(self) -> None:
        await self.stack.close()
        await self.sim.close()
        Datapath.unpin(self.pin_root)
        if self.keep_logs:
            print(f"  the processes' logs: {self.workdir}", flush=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(pct(values, 50), 2),
        "p99": round(pct(values, 99), 2),
        "mean": round(statistics.fmean(values), 2) if values else float("nan"),
        "max": round(max(values), 2) if values else float("nan"),
    }


def report(fig: dict[str, Any]) -> None:
    print()
    cs, rs = fig["cold_start"], fig["restart"]
    print(
        table(
            ["full node", "value"],
            [
                ["pods x CIDRs", f"{fig['pods']} x {fig['cidrs_per_pod']}"],
                ["resolver: policies -> PolicyEndpoints (s)", cs["resolver_seconds"]],
                ["agent: start -> all programmed (s)", cs["agent_seconds"]],
                ["agent: first full reconcile (ms)", cs["reconcile_ms"] or float("nan")],
                ["agent RSS after (MB)", cs["agent_rss_mb"]],
                ["agent restart -> re-adopted, all programmed (s)", rs["seconds"]],
                *(
                    [
                        ["floor: the agent's imports (s)", fl["import_seconds"]],
                        ["floor: list the PolicyEndpoints (s)", fl["list_seconds"]],
                        ["floor: parse them (s)", fl["parse_seconds"]],
                        ["floor: list and parse, overlapped (s)", fl["list_and_parse_seconds"]],
                    ]
                    if (fl := fig.get("floor"))
                    else []
                ),
            ],
        )
    )
    if "wait_checks" in fig:
        print(f"/v1/wait answers checked by: {fig['wait_checks']}")
    print()
    lat = fig["latency_ms"]
    print(
        table(
            ["latency (ms)", "n", "p50", "p99", "max"],
            [[k.replace("_", " "), v["n"], v["p50"], v["p99"], v["max"]] for k, v in lat.items()],
        )
    )
    print()
    fp = fig["footprint"]
    names = sorted(fp["idle"])
    print(
        table(
            ["process", "RSS MB idle", "CPU idle", "RSS MB busy", "CPU busy"],
            [
                [
                    n,
                    fp["idle"][n]["rss_mb"],
                    fp["idle"][n]["cpu_cores"],
                    fp["under_changes"][n]["rss_mb"],
                    fp["under_changes"][n]["cpu_cores"],
                ]
                for n in names
            ],
        )
    )
    print("(CPU in cores; busy = while the latency samples above ran)")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pods = args.pods or (25 if args.quick else 250)
    cidrs = args.cidrs or 1000
    bench = Bench(
        pods,
        cidrs,
        samples=30 if args.quick else 200,
        window=3.0 if args.quick else 10.0,
        keep_logs=args.keep_logs,
    )
    try:
        await bench.setup()
        await bench.cold_start()
        bench.freeze_store()  # the PolicyEndpoints are written by now
        await bench.floor()  # while the agent is idle: after a restart it reads its tries
        await bench.restart()
        await bench.changes_and_footprint()
    finally:
        await bench.close()
    return bench.figures


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="25 pods, 30 samples")
    p.add_argument("--pods", type=int, help="pods on the node (250)")
    p.add_argument("--cidrs", type=int, help="CIDRs per pod's policy (1000)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = p.parse_args(argv)
    prepare()
    figures = asyncio.run(run(args))
    report(figures)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
