"""The conformance harness: scenarios run against the real processes on one simulated node.

One node serves every scenario of a run: the fake API server (in this process, listening
in the node's namespace), the resolver and the enforcer (real processes in the node's
network namespace), and namespace pods answering on their declared ports. Between
scenarios the world is reconciled (namespaces, pods, labels) and every policy removed.

After each step's actions the harness waits for the resolver to catch up and for the
agent's "programmed" signal, then probes every ordered pair of pods concurrently,
retrying until the matrix matches or 10 s passed since the actions; it then asks the
agent to ``explain`` every cell and checks that the answers agree with the traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.apimodels import ExplainRequest, ExplainResult
from fakekube import store as fs
from simnode.dnsserver import DnsServer, resolve
from simnode.node import SimNode, SimPod
from simnode.traffic import PodServer, tcp_probe, udp_probe
from tests.conformance.scenario import (
    NameProbe,
    Obj,
    PodKey,
    PodSpec,
    Probe,
    Scenario,
    WorldSpec,
    api_defaults,
    application_defaults,
    cluster_defaults,
    expected,
    render,
)
from tests.privileged.agentrig import AgentRig

DNS_NAMESPACE, DNS_POD = "kube-system", "dns"
DNS_PORTS = (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"))  # (name, port, protocol)

CONVERGE_SECONDS = 10.0
PROBE_TIMEOUT = 0.3
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class LivePod:
    spec: PodSpec
    sim: SimPod
    server: PodServer


@dataclass
class CaseResult:
    name: str
    ok: bool
    message: str = ""
    step_seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        times = ", ".join(f"{t:.2f}s" for t in self.step_seconds)
        head = f"{'PASS' if self.ok else 'FAIL'} {self.name} (steps: {times})"
        return head if self.ok else f"{head}: {self.message}"


# How the resolver lays policies out, per conformance pass: our paired layout at the
# default chunk size, and the AWS controller's layout at chunk size 1, so that every
# policy with more than one pod or entry is split into pod-only and rule-only objects.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "paired": (),
    "controller-1": ("--endpoint-layout=controller", "--endpoint-chunk-size=1"),
}


class Cluster:
    def __init__(
        self, sim: SimNode, *, workdir: Path, pin_root: str, layout: str = "paired"
    ) -> None:
        self.layout = layout
        self.sim = sim
        self.rig = AgentRig(sim, pin_root=pin_root, workdir=workdir)
        self.workdir = workdir
        self.store = self.rig.api.store
        self.pods: dict[PodKey, LivePod] = {}
        self._next_port: dict[PodKey, int] = {}
        self.agent = self.rig.agent
        # FORMAT-dns.md: kube-system/dns, a pod like any other but never in a matrix
        self.dns_pod: SimPod | None = None
        self.dns: DnsServer | None = None
        self._last_lookup = 0.0

    # ---- processes --------------------------------------------------------------------
    async def start(self) -> None:
        await self.rig.start_api()
        self.store.create(fs.NAMESPACES, None, {"metadata": {"name": DNS_NAMESPACE}})
        self.dns_pod = await self.sim.add_pod(f"{DNS_NAMESPACE}-{DNS_POD}")
        self.dns = DnsServer(self.dns_pod.netns)
        await self.dns.start()
        self.rig.create_pod_object(
            self.dns_pod,
            namespace=DNS_NAMESPACE,
            name=DNS_POD,
            labels={"k8s-app": "kube-dns"},
            ports=DNS_PORTS,
        )
        await self.rig.start("resolver", "--log-level=info", *LAYOUTS[self.layout])
        await self.rig.start_agent(
            "--log-level=info",
            f"--cluster-dns={self.dns_pod.ipv4},{self.dns_pod.ipv6}",
            "--fqdn-ttl-grace=0",  # FORMAT-dns.md: short-TTL scenarios
        )
        await self.rig.ready(timeout=30)

    async def stop(self) -> None:
        for live in self.pods.values():
            await live.server.close()
        if self.dns is not None:
            await self.dns.close()
        await self.rig.close()

    # ---- the world --------------------------------------------------------------------
    def address(self, key: PodKey, family: int) -> Address:
        return self.pods[key].sim.address(family)

    async def prepare(self, world: WorldSpec) -> None:
        for ns, name in list(self.store.objects[fs.NETWORK_POLICIES]):
            self.store.delete(fs.NETWORK_POLICIES, ns, name)
        for _, name in list(self.store.objects[fs.CLUSTER_NETWORK_POLICIES]):
            self.store.delete(fs.CLUSTER_NETWORK_POLICIES, "", name)
        for ns, name in list(self.store.objects[fs.APPLICATION_NETWORK_POLICIES]):
            self.store.delete(fs.APPLICATION_NETWORK_POLICIES, ns, name)
        wanted_ns = set(world.namespaces) | {p.namespace for p in world.pods} | {DNS_NAMESPACE}
        for ns in sorted(wanted_ns):
            labels = world.namespace_labels(ns)
            try:
                current = self.store.get(fs.NAMESPACES, "", ns)
            except fs.ApiError:
                self.store.create(fs.NAMESPACES, None, {"metadata": {"name": ns, "labels": labels}})
                continue
            if current["metadata"].get("labels") != labels:
                current["metadata"]["labels"] = labels
                self.store.update(fs.NAMESPACES, "", ns, current)
        wanted = {p.key: p for p in world.pods}
        for key in [
            k
            for k in self.pods
            if k not in wanted or tuple(self.pods[k].spec.ports) != tuple(wanted[k].ports)
        ]:
            await self._delete_pod(key)
        for key, spec in wanted.items():
            if key in self.pods:
                self._set_labels(key, spec.labels)
            else:
                await self._create_pod(spec)
        for _, ns in list(self.store.objects[fs.NAMESPACES]):
            if ns not in wanted_ns:
                self.store.delete(fs.NAMESPACES, "", ns)
        self._dns_records(world)
        await self.settle()

    def _dns_records(self, world: WorldSpec) -> None:
        assert self.dns is not None
        self.dns.records.clear()
        self.dns.ttl = world.dns.ttl if world.dns else 3600
        for name, value in (world.dns.records if world.dns else {}).items():
            self.dns.set(name, self._render_record(value, world.family))

    def _render_record(self, value: Any, family: int) -> list[str] | dict[str, str]:
        rendered = self._templated(value, family)
        if isinstance(rendered, dict):
            return {"cname": str(rendered["cname"])}
        return [str(a) for a in rendered or []]

    async def _create_pod(self, spec: PodSpec) -> None:
        sim = await self.sim.add_pod(f"{spec.namespace}-{spec.name}")
        listen = [(int(p["port"]), str(p.get("protocol", "TCP"))) for p in spec.ports]
        server = PodServer(name=f"{spec.namespace}/{spec.name}", netns=sim.netns, listen=listen)
        await server.start()
        self.pods[spec.key] = LivePod(spec, sim, server)
        self.rig.create_pod_object(
            sim,
            namespace=spec.namespace,
            name=spec.name,
            labels=dict(spec.labels),
            ports=[
                (str(p.get("name") or ""), int(p["port"]), str(p.get("protocol", "TCP")))
                for p in spec.ports
            ],
        )

    async def _delete_pod(self, key: PodKey) -> None:
        live = self.pods.pop(key)
        self.store.delete(fs.PODS, key[0], key[1])
        await live.server.close()
        await self.sim.remove_pod(live.sim.name)

    def _set_labels(self, key: PodKey, labels: dict[str, str]) -> None:
        pod = self.store.get(fs.PODS, key[0], key[1])
        if pod["metadata"].get("labels") != labels:
            pod["metadata"]["labels"] = dict(labels)
            self.store.update(fs.PODS, key[0], key[1], pod)
        self.pods[key].spec.labels = dict(labels)

    # ---- actions ----------------------------------------------------------------------
    async def apply(self, action: Obj, family: int) -> None:
        ((kind, arg),) = action.items()
        if kind.endswith("_cluster_policy"):
            self._cluster_policy(kind, arg, family)
        elif kind.endswith("_application_policy"):
            self._application_policy(kind, arg, family)
        elif kind == "set_dns_records":
            self._set_dns_records(arg, family)
        elif kind in ("create_policy", "update_policy"):
            body = api_defaults(self._templated(arg, family))
            ns = body["metadata"].setdefault("namespace", "default")
            if kind == "create_policy":
                self.store.create(fs.NETWORK_POLICIES, ns, body)
            else:
                current = self.store.get(fs.NETWORK_POLICIES, ns, body["metadata"]["name"])
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.store.update(fs.NETWORK_POLICIES, ns, body["metadata"]["name"], body)
        elif kind == "delete_policy":
            self.store.delete(fs.NETWORK_POLICIES, arg.get("namespace", "default"), arg["name"])
        else:
            await self._world_action(kind, arg)

    async def _world_action(self, kind: str, arg: Obj) -> None:
        if kind == "set_pod_labels":
            ns, name = arg["pod"].split("/")
            self._set_labels((ns, name), dict(arg.get("labels") or {}))
        elif kind == "set_namespace_labels":
            ns = arg["namespace"]
            current = self.store.get(fs.NAMESPACES, "", ns)
            current["metadata"]["labels"] = {
                **(arg.get("labels") or {}),
                "kubernetes.io/metadata.name": ns,
            }
            self.store.update(fs.NAMESPACES, "", ns, current)
        elif kind == "create_pod":
            spec = PodSpec(arg["ns"], arg["name"], dict(arg.get("labels") or {}))
            if arg.get("ports"):
                spec.ports = tuple(arg["ports"])
            await self._create_pod(spec)
        elif kind == "delete_pod":
            ns, name = arg["pod"].split("/")
            await self._delete_pod((ns, name))
        else:
            raise ValueError(f"unknown action {kind}")

    def _templated(self, obj: Any, family: int) -> Any:
        return render(
            obj,
            address=lambda k: self.address(k, family),
            node_ip=str(self.sim.node_ipv4 if family == 4 else self.sim.node_ipv6),
        )

    def _cluster_policy(self, kind: str, arg: Obj, family: int) -> None:
        if kind == "delete_cluster_policy":
            self.store.delete(fs.CLUSTER_NETWORK_POLICIES, "", arg["name"])
            return
        body = cluster_defaults(self._templated(arg, family))
        name = body["metadata"]["name"]
        body["metadata"].pop("namespace", None)
        if kind == "create_cluster_policy":
            self.store.create(fs.CLUSTER_NETWORK_POLICIES, None, body)
        else:
            current = self.store.get(fs.CLUSTER_NETWORK_POLICIES, "", name)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.store.update(fs.CLUSTER_NETWORK_POLICIES, "", name, body)

    def _application_policy(self, kind: str, arg: Obj, family: int) -> None:
        if kind == "delete_application_policy":
            ns = arg.get("namespace", "default")
            self.store.delete(fs.APPLICATION_NETWORK_POLICIES, ns, arg["name"])
            return
        body = application_defaults(self._templated(arg, family))
        ns = body["metadata"].setdefault("namespace", "default")
        name = body["metadata"]["name"]
        if kind == "create_application_policy":
            self.store.create(fs.APPLICATION_NETWORK_POLICIES, ns, body)
        else:
            current = self.store.get(fs.APPLICATION_NETWORK_POLICIES, ns, name)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.store.update(fs.APPLICATION_NETWORK_POLICIES, ns, name, body)

    def _set_dns_records(self, arg: Obj, family: int) -> None:
        assert self.dns is not None
        value: Any = {"cname": arg["cname"]} if "cname" in arg else list(arg.get("addresses") or [])
        self.dns.set(arg["name"], self._render_record(value, family))

    async def settle(self, timeout: float = CONVERGE_SECONDS) -> None:
        """The resolver has seen every change and written its objects; the agent has
        programmed every local pod."""
        await self.rig.settle(timeout)

    # ---- traffic ----------------------------------------------------------------------
    def _source_port(self, key: PodKey) -> int:
        """A client port not used recently by this pod: a reused port could match a flow
        the datapath still tracks from an earlier step and pass as established."""
        port = self._next_port.get(key, 20000)
        self._next_port[key] = 20000 if port >= 60999 else port + 1
        return port

    async def observe(self, probe: Probe, family: int) -> dict[tuple[PodKey, PodKey], bool]:
        keys = sorted(self.pods)
        cells = [(s, d) for s in keys for d in keys if s != d]
        fn = tcp_probe if probe.protocol == "TCP" else udp_probe

        async def one(src: PodKey, dst: PodKey) -> bool:
            return await fn(
                netns=self.pods[src].sim.netns,
                target=self.address(dst, family),
                port=probe.port,
                timeout=PROBE_TIMEOUT,
                expect=f"{dst[0]}/{dst[1]}",
                source_port=self._source_port(src),
            )

        results = await asyncio.gather(*(one(s, d) for s, d in cells))
        return dict(zip(cells, results, strict=True))

    async def name_probe(self, probe: NameProbe, family: int) -> bool:
        """FORMAT-dns.md: the pod asks the DNS pod, then at once connects to the
        answer's first address (or to ``address``). No answer: deny."""
        assert self.dns_pod is not None
        src = self.pods[probe.source]
        answer = await resolve(
            netns=src.sim.netns,
            server=self.dns_pod.address(family),
            name=probe.name,
            family=family,
            timeout=PROBE_TIMEOUT,
        )
        self._last_lookup = time.monotonic()
        if not answer:
            return False
        target: Address = answer[0]
        if probe.address:
            target = ipaddress.ip_address(self._templated(probe.address, family))
        owner = next((k for k, p in self.pods.items() if p.sim.address(family) == target), None)
        fn = tcp_probe if probe.protocol == "TCP" else udp_probe
        return await fn(
            netns=src.sim.netns,
            target=target,
            port=probe.port,
            timeout=PROBE_TIMEOUT,
            expect=f"{owner[0]}/{owner[1]}" if owner else None,
            source_port=self._source_port(probe.source),
        )

    async def name_probes(self, probes: list[NameProbe], family: int) -> list[str]:
        """Mismatches; a pod's probes one at a time, in order (pods side by side)."""
        by_pod: dict[PodKey, list[NameProbe]] = {}
        for p in probes:
            by_pod.setdefault(p.source, []).append(p)

        async def one_pod(items: list[NameProbe]) -> list[str]:
            wrong = []
            for p in items:
                got = await self.name_probe(p, family)
                if got != p.allow:
                    where = f" at {p.address}" if p.address else ""
                    wrong.append(
                        f"name {_k(p.source)} {p.name}{where} {p.port}/{p.protocol} "
                        f"expected {_v(p.allow)} got {_v(got)}"
                    )
            return wrong

        results = await asyncio.gather(*(one_pod(v) for v in by_pod.values()))
        return [w for r in results for w in r]

    async def explain(
        self, probe: Probe, family: int, observed: dict[tuple[PodKey, PodKey], bool]
    ) -> list[str]:
        """Cells where the agent's explanation disagrees with the traffic."""
        if probe.protocol not in ("TCP", "UDP", "SCTP"):
            return []

        async def direction(subject: PodKey, peer: PodKey, way: str) -> bool:
            req = ExplainRequest(
                pod=f"{subject[0]}/{subject[1]}",
                peer=str(self.address(peer, family)),
                port=probe.port,
                protocol=probe.protocol,  # type: ignore[arg-type]
                direction=way,  # type: ignore[arg-type]
            )
            res = await self.agent.request("POST", "/v1/explain", ExplainResult, body=req)
            return res.verdict != "DENY"

        async def cell(src: PodKey, dst: PodKey) -> bool:
            out, into = await asyncio.gather(
                direction(src, dst, "egress"), direction(dst, src, "ingress")
            )
            return out and into

        cells = sorted(observed)
        predicted = await asyncio.gather(*(cell(s, d) for s, d in cells))
        return [
            f"{_k(s)}->{_k(d)} traffic {_v(observed[(s, d)])} explain {_v(p)}"
            for (s, d), p in zip(cells, predicted, strict=True)
            if p != observed[(s, d)]
        ]

    # ---- a scenario -------------------------------------------------------------------
    async def run(self, scenario: Scenario) -> CaseResult:
        result = CaseResult(f"{scenario.name} [{self.layout}]", ok=True)
        family = scenario.world.family
        await self.prepare(scenario.world)
        dns = scenario.world.dns
        for i, step in enumerate(scenario.steps, 1):
            started = time.monotonic()
            for action in step.actions:
                await self.apply(action, family)
            await self.settle()
            if dns is not None and dns.short and i > 1:
                # FORMAT-dns.md: earlier steps' answers have expired when a step converges
                wait = self._last_lookup + dns.ttl + 0.3 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                started = time.monotonic()
            while True:
                observed = await asyncio.gather(*(self.observe(p, family) for p in step.probes))
                wrong = _mismatches(step.probes, observed, sorted(self.pods))
                if step.name_probes:
                    wrong += await self.name_probes(step.name_probes, family)
                if not wrong or time.monotonic() - started > CONVERGE_SECONDS:
                    break
            result.step_seconds.append(time.monotonic() - started)
            if wrong:
                result.ok = False
                result.message = f"step {i}: {len(wrong)} cells differ: " + "; ".join(wrong[:4])
                return result
            for probe, cells in zip(step.probes, observed, strict=True):
                compared = expected(probe, sorted(self.pods))  # skipped pairs left out
                disagree = await self.explain(
                    probe, family, {c: v for c, v in cells.items() if c in compared}
                )
                if disagree:
                    result.ok = False
                    result.message = (
                        f"step {i} {probe.port}/{probe.protocol}: explain "
                        f"disagrees on {len(disagree)} cells: " + "; ".join(disagree[:4])
                    )
                    return result
        return result


def _k(key: PodKey) -> str:
    return f"{key[0]}/{key[1]}"


def _v(allowed: bool) -> str:
    return "allow" if allowed else "deny"


def _mismatches(
    probes: list[Probe], observed: list[dict[tuple[PodKey, PodKey], bool]], pods: list[PodKey]
) -> list[str]:
    out: list[str] = []
    for probe, cells in zip(probes, observed, strict=True):
        want = expected(probe, pods)
        for cell in sorted(want):
            if want[cell] != cells[cell]:
                out.append(
                    f"{probe.port}/{probe.protocol} {_k(cell[0])}->{_k(cell[1])} "
                    f"expected {_v(want[cell])} got {_v(cells[cell])}"
                )
    return out


def summary(results: list[CaseResult]) -> str:
    passed = sum(1 for r in results if r.ok)
    return f"{passed} passed, {len(results) - passed} failed"
