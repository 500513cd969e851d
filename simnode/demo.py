"""Datapath demo on a simulated node (run by ``scripts/demo.sh``).

Namespace pods modelled on the EKS launch walkthrough (demo-app, client-one and
another-ns/another-client-one), the real eBPF programs on their veths, real TCP
traffic, and the decision events read from the ring buffer as flow-log lines.

Policies are given to the datapath directly as peer rules here; the agent and resolver
(which turn NetworkPolicies into these rules) replace that step when they land.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
from collections.abc import Callable

from bpf import layout as lay
from bpf.attach import attach
from bpf.datapath import ALLOW_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.ringbuf import RingBuffer
from bpf.ruleset import PeerRule, PortRange, compile_rules
from common.netlink import Netlink
from flowlogs.records import Formatter
from simnode.node import SimNode, SimPod
from simnode.traffic import PodServer, tcp_probe

BOLD, GREEN, RED, DIM, RESET = "\033[1m", "\033[32m", "\033[31m", "\033[2m", "\033[0m"


class Demo:
    def __init__(self, *, color: bool) -> None:
        self.sim = SimNode(f"npd{os.getpid() % 10000:04d}"[:8])
        self.pin_root = f"/sys/fs/bpf/np-demo-{os.getpid()}"
        self.dp: Datapath | None = None
        self.servers: list[PodServer] = []
        self.pods: dict[str, SimPod] = {}
        self.names: dict[int, str] = {}
        self.color = color
        self.ring: RingBuffer | None = None
        self.flow_lines: list[str] = []

    def c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    async def setup(self) -> None:
        print(self.c(BOLD, "Setting up a simulated node (network namespaces, veths)..."))
        await self.sim.start()
        self.dp = Datapath.open(self.pin_root, ct_entries=32768, events_bytes=1 << 20)
        self.dp.set_host_addresses([self.sim.node_ipv4, self.sim.node_ipv6])
        self.dp.set_event_flags(emit_deny=True, emit_allow=False)
        for ns, name in (("default", "demo-app"), ("default", "client-one"),
                         ("another-ns", "another-client-one")):
            pod = await self.sim.add_pod(name)
            server = PodServer(name=name, netns=pod.netns, ports=(80, 53))
            await server.start()
            self.servers.append(server)
            pod_id = self.dp.register_pod(namespace=ns, name=name, uid=f"demo-{name}")
            self.names[pod_id] = f"{ns}/{name}"
            self.dp.program_pods({pod.ifindex: PodPolicy(pod_id, ALLOW_ALL, ALLOW_ALL)})
            async with Netlink(netns=self.sim.netns) as nl:
                await attach(nl, pod.ifindex, ingress=self.dp.ingress_prog,
                             egress=self.dp.egress_prog)
            self.pods[name] = pod
            print(f"  pod {ns}/{name:<20} {pod.ipv4!s:<12} {pod.ipv6!s:<16} "
                  f"veth {pod.host_veth} (ifindex {pod.ifindex})")
        self.ring = RingBuffer(self.dp.events, self._on_events)
        self.ring.attach()

    def _on_events(self, batch: list[bytes]) -> None:
        assert self.dp is not None
        dp = self.dp
        fmt = Formatter(node="demo-node", pod_name=lambda pid: self.names.get(pid, "?"),
                        policy_name=dp.policy_name)
        self.flow_lines.extend(fmt.record(raw).line() for raw in batch)

    def program(self, name: str, *, ingress: DirectionPolicy = ALLOW_ALL,
                egress: DirectionPolicy = ALLOW_ALL) -> None:
        assert self.dp is not None
        pod = self.pods[name]
        rec = self.dp.pod_record(pod.ifindex)
        assert rec is not None
        self.dp.program_pods({pod.ifindex: PodPolicy(rec.pod_id, ingress, egress)})
        self.dp.collect_garbage()

    def rules(self, policy: str, *rules: PeerRule) -> DirectionPolicy:
        assert self.dp is not None
        pid = self.dp.policy_id(namespace="default", name=policy)
        tagged = [PeerRule(r.cidr, r.excepts, r.ports, policy_id=pid) for r in rules]
        return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compile_rules(tagged))

    def host(self, name: str) -> list[PeerRule]:
        pod = self.pods[name]
        return [PeerRule(ipaddress.ip_network(f"{pod.ipv4}/32")),
                PeerRule(ipaddress.ip_network(f"{pod.ipv6}/128"))]

    async def probes(self, *pairs: tuple[str, str, int]) -> None:
        for client, target, port in pairs:
            for family in (4, 6):
                addr = self.pods[target].address(family)
                ok = await tcp_probe(netns=self.pods[client].netns, target=addr, port=port,
                                     timeout=0.4, expect=target)
                verdict = self.c(GREEN, "allowed") if ok else self.c(RED, "denied ")
                print(f"    {client:>18} -> {target}:{port} over IPv{family}  {verdict}")
        await asyncio.sleep(0.05)
        if self.flow_lines:
            print(self.c(DIM, "    flow log:"))
            for line in self.flow_lines:
                print(self.c(DIM, f"      {line}"))
            self.flow_lines.clear()

    async def run(self) -> None:
        await self.setup()
        assert self.dp is not None
        steps: list[tuple[str, Callable[[], None]]] = [
            ("1. No policy: every pod may talk to demo-app", lambda: None),
            ("2. Deny all ingress to demo-app (01-deny-all-ingress)",
             lambda: self.program("demo-app", ingress=self.rules("deny-all-ingress"))),
            ("3. Allow client-one to demo-app on TCP 80 (03-allow-ingress-from-samens-client-one)",
             lambda: self.program("demo-app", ingress=self.rules(
                 "allow-ingress-from-samens-client-one",
                 *(PeerRule(r.cidr, ports=(PortRange(lay.NP_PROTO_TCP, 80, 80),))
                   for r in self.host("client-one"))))),
            ("4. Also allow another-ns/another-client-one (04-allow-ingress-from-xns)",
             lambda: self.program("demo-app", ingress=self.rules(
                 "allow-ingress-from-xns", *self.host("client-one"),
                 *self.host("another-client-one")))),
            ("5. Deny all egress from client-one (06-deny-egress-from-client-one)",
             lambda: self.program("client-one", egress=self.rules("deny-egress"))),
            ("6. Allow client-one egress to demo-app on TCP 80 only (08-allow-egress-to-demo-app)",
             lambda: self.program("client-one", egress=self.rules(
                 "allow-egress-to-demo-app",
                 *(PeerRule(r.cidr, ports=(PortRange(lay.NP_PROTO_TCP, 80, 80),))
                   for r in self.host("demo-app"))))),
        ]
        pairs = [("client-one", "demo-app", 80), ("another-client-one", "demo-app", 80),
                 ("client-one", "another-client-one", 53)]
        for title, apply in steps:
            print()
            print(self.c(BOLD, title))
            apply()
            await self.probes(*pairs)
        stats = self.dp.stats()
        print()
        print(self.c(BOLD, "Datapath counters: ") + ", ".join(
            f"{k}={stats[k]}" for k in ("packets_allowed", "packets_denied", "ct_inserts",
                                        "ingress_denied_packets", "egress_denied_packets")))

    async def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        for server in self.servers:
            await server.close()
        await self.sim.close()
        if self.dp is not None:
            self.dp.close()
        Datapath.unpin(self.pin_root)


async def amain(color: bool) -> int:
    demo = Demo(color=color)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    try:
        await demo.run()
    except asyncio.CancelledError:
        print("\ninterrupted, cleaning up")
        return 130
    finally:
        await demo.close()
        print("cleaned up: namespaces, veths and pins removed")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-color", action="store_true", help="plain output")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it creates network namespaces and loads eBPF programs)")
    sys.exit(asyncio.run(amain(color=not args.no_color and sys.stdout.isatty())))


if __name__ == "__main__":
    main()
