"""Sustained policy churn on a simulated node, and the agent's vital signs under it.

:class:`Churn` writes PolicyEndpoints for a node's pods straight into the fake API
server (each pod selected by several, each with a few CIDRs), then keeps changing them
at a steady rate. :func:`vitals` reads the agent's resident memory and, from its
``/metrics``, the event-loop lag and the number of asyncio tasks. Used by the load test
(a minute) and by ``bench.soak`` (as long as asked).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from common.apimodels import NodeStatus
from fakekube import store as fs
from simnode.netns import socket_in
from simnode.node import SimPod
from simnode.stack import NodeStack

PAGE = 4096


@dataclass
class Vitals:
    at: float  # seconds since the churn started
    rss_mb: float
    lag_max_s: float  # largest event-loop lag since the agent started
    tasks: int
    tables: dict[str, int] = field(default_factory=dict)  # datapath table -> entries
    # of the event loop's timer ticks since the start, the fraction late by 250 ms at most
    lag_on_time: float = float("nan")


@dataclass
class Churn:
    stack: NodeStack
    pods: list[SimPod]
    endpoints: int = 1000
    cidrs: int = 20
    rate: float = 20.0  # updates per second
    namespace: str = "default"
    seed: int = 7
    # a node's history: pods re-created (same name and address, a new UID) per second,
    # and every update naming a new policy (as policies are created and deleted)
    pod_rate: float = 0.0
    rename_policies: bool = False
    updates: int = 0
    recreated: int = 0
    _generation: dict[int, int] = field(default_factory=dict)

    def body(self, i: int) -> dict[str, Any]:
        """PolicyEndpoint i: selects pods i, i+1, i+2 (mod the pod count), allows a few
        /28s that move with each update."""
        gen = self._generation.get(i, 0)
        targets = [self.pods[(i + k) % len(self.pods)] for k in range(3)]
        base = 0x0C000000 + (i * 64 + gen % 64) * 256
        return {
            "metadata": {"name": f"churn-{i:05d}", "namespace": self.namespace},
            "spec": {
                "policyRef": {
                    "name": (f"churn-{i}-{gen}" if self.rename_policies else f"churn-{i % 100}"),
                    "namespace": self.namespace,
                },
                "podIsolation": ["Ingress"],
                "podSelectorEndpoints": [
                    {
                        "podIP": str(p.ipv4),
                        "hostIP": str(self.stack.sim.node_ipv4),
                        "name": p.name,
                        "namespace": self.namespace,
                    }
                    for p in targets
                ],
                "ingress": [
                    {
                        "cidr": f"{(base + j * 16) >> 24 & 255}."
                        f"{(base + j * 16) >> 16 & 255}."
                        f"{(base + j * 16) >> 8 & 255}.{(base + j * 16) & 255}/28",
                        "ports": [{"protocol": "TCP", "port": 80 + j % 3}],
                    }
                    for j in range(self.cidrs)
                ],
            },
        }

    def create(self) -> None:
        for i in range(self.endpoints):
            self.stack.api.store.create(fs.POLICY_ENDPOINTS, self.namespace, self.body(i))

    def update(self, i: int) -> None:
        store = self.stack.api.store
        self._generation[i] = self._generation.get(i, 0) + 1
        body = self.body(i)
        current = store.get(fs.POLICY_ENDPOINTS, self.namespace, body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        store.update(fs.POLICY_ENDPOINTS, self.namespace, body["metadata"]["name"], body)
        self.updates += 1

    def recreate_pod(self, pod: SimPod) -> None:
        """The pod's object deleted and created again: same name and address, a new
        UID (a Job's next run, a StatefulSet's replacement)."""
        store = self.stack.api.store
        store.delete(fs.PODS, self.namespace, pod.name)
        self.stack.create_pod_object(pod, namespace=self.namespace)
        self.recreated += 1

    async def run(self, seconds: float) -> None:
        """Update random PolicyEndpoints at ``rate`` per second (and re-create random
        pods at ``pod_rate``) for ``seconds``."""
        rng = random.Random(self.seed)
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_at = next_pod_at = started
        while loop.time() - started < seconds:
            now = loop.time()
            if self.pod_rate and now >= next_pod_at:
                self.recreate_pod(self.pods[rng.randrange(len(self.pods))])
                next_pod_at += 1.0 / self.pod_rate
            if now >= next_at:
                self.update(rng.randrange(self.endpoints))
                next_at += 1.0 / self.rate
            wake = min(next_at, next_pod_at) if self.pod_rate else next_at
            await asyncio.sleep(max(0.0, wake - loop.time()))


async def metrics(netns: str, port: int = 8162) -> dict[str, float]:
    """The agent's /metrics (unlabelled samples and histogram buckets, by their line's
    name), read inside the node namespace."""
    loop = asyncio.get_running_loop()
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 2)
        await loop.sock_sendall(sock, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            data += chunk
    finally:
        sock.close()
    out = {}
    for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
        # unlabelled samples, and histogram buckets (one label: le)
        if line and not line.startswith("#") and ("{" not in line or '_bucket{le="' in line):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


async def vitals(stack: NodeStack, started: float) -> Vitals:
    rss = await asyncio.to_thread(rss_mb, stack.procs["agent"].pid)
    m = await metrics(stack.sim.netns)
    st = await stack.agent.get("/v1/status", NodeStatus)
    return Vitals(
        round(time.monotonic() - started, 1),
        round(rss, 1),
        m.get("awsnodeagent_event_loop_lag_max_seconds", float("nan")),
        int(m.get("awsnodeagent_asyncio_tasks", -1)),
        {name: t.entries for name, t in sorted(st.tables.items())},
        _fraction(m, "awsnodeagent_event_loop_lag_seconds", "0.25"),
    )


def _fraction(m: dict[str, float], histogram: str, le: str) -> float:
    total = m.get(f"{histogram}_count", 0.0)
    within = m.get(f'{histogram}_bucket{{le="{le}"}}', float("nan"))
    return within / total if total else float("nan")
