"""Datapath benchmark: what enforcement costs two namespace pods, next to no program at
all and to what a user would otherwise run (an iptables ruleset, an nftables set).

Two identical simulated nodes, each with a client pod and a server pod on veths. Node B
never changes: it is the limit ("no program"). Node A takes each configuration in turn:

  none         nothing attached (checks that A and B are alike: expect 1.00)
  tc-pass      a program that passes every packet on both veths (the limit: what the tc
               hook costs before any program does anything)
  ebpf-N       our programs on both veths; the server's ingress allows N CIDRs (the
               client's /32 among them), the client is default-allow
  iptables-N   FORWARD: established accept, then N `-s CIDR -j ACCEPT` rules for the
               server's veth (the client's last), then drop
  nftables-N   one interval set of the same N CIDRs, `ip saddr @allowed accept`, drop
  ebpf-tiered  ebpf-1000 plus ClusterNetworkPolicy tiers on the server's ingress: 100
               Admin and 100 Baseline policies of 100 CIDRs each (Deny, Accept and Pass,
               some on ports; an Admin Pass holds the client), folded with the 1k
               NetworkPolicy CIDRs into one trie. Target: within 1.2x of ebpf-1000.

For every configuration and metric, runs on B and on A alternate (B, A, B, A, ...);
the figure is median(A) / median(B). Metrics, each from a native tool pinned to one core
(client on CPU 0, server on CPU 1):

  rr    TCP request/response rate on one connection (sockperf ping-pong)
  cps   new TCP connections per second (bench/tools/connrate.c, 64 in flight)
  tput  TCP throughput (iperf3)

During every run the CPU used by other user-space processes is recorded; a run where
they used more than 5% of a core is flagged noisy (the table says which).

Also the programs' own cost per packet from BPF_PROG_TEST_RUN with 1k, 100k and 1M
trie entries, and with the tiered configuration: a new flow from a peer in no CIDR
(denied), an established one (conntrack hit) and, tiered, a new flow an Admin rule
denies (a longer trie walk to a /24).

With cps measured, the configurations that attach programs (tc-pass, ebpf-*) get one
more cps run on node A with the kernel's run-time statistics on: how many times the
programs ran per new connection and what a run cost in real traffic, where the
connection's conntrack entries are cold in the cache (unlike BPF_PROG_TEST_RUN's loop).

    python -m bench.datapath [--quick] [--runs N] [--seconds S] [--configs A,B]
                             [--metrics cps,...] [--json PATH] [--chart PNG]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    Noise,
    bar_chart,
    build_bpf,
    build_tool,
    children,
    in_netns,
    median,
    prepare,
    require,
    table,
    write_json,
)
from bpf import layout as lay
from bpf.attach import attach, detach
from bpf.codec import lpm_key_bytes
from bpf.datapath import ALLOW_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.objects import BpfObject, Program, prog_info, run_time_statistics
from bpf.ruleset import CompiledRules, Decision, PeerRule, PortRange, Prefix, compile_rules
from bpf.tiers import ACTION_ACCEPT, ACTION_DENY, ACTION_PASS, ClusterRule, compile_tiers
from common.netlink import Netlink
from simnode import packets as pk
from simnode.node import SimNode, SimPod

CLIENT_CPU, SERVER_CPU = 0, 1
RR_PORT, CPS_PORT, TPUT_PORT = 11111, 12345, 5201
METRICS = ("rr", "cps", "tput")
UNITS = {"rr": "req/s", "cps": "conn/s", "tput": "Gbit/s"}


def cidrs(n: int, client: ipaddress.IPv4Address) -> list[ipaddress.IPv4Network]:
    """n allowed CIDRs: n-1 distinct /28s elsewhere, and the client's /32 last."""
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    out = [ipaddress.IPv4Network((base + i * 16, 28)) for i in range(n - 1)]
    return [*out, ipaddress.IPv4Network((int(client), 32))]


TIERED_POLICIES = 100  # Admin policies, and as many Baseline ones
TIERED_CIDRS = 100  # CIDRs per policy


def tiered(client: ipaddress.IPv4Address) -> tuple[CompiledRules, int]:
    """The server's ingress with every tier: (folded trie, cluster CIDRs). The client's
    /32 is in the 1k NetworkPolicy CIDRs and under an Admin Pass on its /16 (so its
    packets take the folded path); the cluster CIDRs are /24s elsewhere."""
    rules: list[ClusterRule] = []
    base = int(ipaddress.IPv4Address("100.64.0.0"))
    actions = (ACTION_DENY, ACTION_ACCEPT, ACTION_PASS)
    n = 0
    for tier in (lay.NP_TIER_ADMIN, lay.NP_TIER_BASELINE):
        for p in range(TIERED_POLICIES):
            ports = (PortRange(lay.NP_PROTO_TCP, 443, 443),) if p % 4 == 0 else ()
            for _ in range(TIERED_CIDRS):
                cidr = Prefix(lay.NP_FAMILY_IPV4, 24, base + n * 256)
                rules.append(ClusterRule(cidr, ports, tier, p * 10, actions[p % 3], 100 + p))
                n += 1
    holder = Prefix(lay.NP_FAMILY_IPV4, 16, (int(client) >> 16) << 16)
    rules.append(ClusterRule(holder, (), lay.NP_TIER_ADMIN, 0, ACTION_PASS, 99))
    np = compile_rules([PeerRule(c) for c in cidrs(1000, client)])
    default = Decision(lay.NP_VERDICT_ALLOW, lay.NP_TIER_DEFAULT, lay.NP_REASON_DEFAULT_ALLOW)
    return compile_tiers(rules, networkpolicy=np, default=default), n + 1


@dataclass
class Node:
    sim: SimNode
    client: SimPod
    server: SimPod
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    async def create(cls, tag: str) -> Node:
        sim = SimNode(tag)
        await sim.start()
        node = cls(sim, await sim.add_pod("client"), await sim.add_pod("server"))
        await asyncio.to_thread(node._start_servers)
        return node

    def _start_servers(self) -> None:
        connrate = build_tool("connrate")
        ns = self.server.netns
        for argv in (
            ["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", str(RR_PORT)],
            [connrate, "serve", str(CPS_PORT)],
            ["iperf3", "-s", "-p", str(TPUT_PORT)],
        ):
            self.servers.append(
                subprocess.Popen(
                    in_netns(ns, SERVER_CPU, argv),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        subprocess.run(
            [
                "nsenter",
                f"--net=/run/netns/{self.client.netns}",
                "sysctl",
                "-qw",
                "net.ipv4.ip_local_port_range=1024 65535",
            ],
            check=True,
        )
        time.sleep(0.5)

    def server_pids(self) -> set[int]:
        return {p for s in self.servers for p in children(s.pid)}

    async def close(self) -> None:
        for s in self.servers:
            s.terminate()
            s.wait()
        await self.sim.close()


# ---- one measurement ------------------------------------------------------------------
def measure(node: Node, metric: str, seconds: float) -> tuple[float, Noise]:
    ip = str(node.server.ipv4)
    if metric == "rr":
        argv = [
            "sockperf",
            "pp",
            "--tcp",
            "-i",
            ip,
            "-p",
            str(RR_PORT),
            "-t",
            str(max(1, round(seconds))),
            "--mps=max",
        ]
    elif metric == "cps":
        argv = [build_tool("connrate"), "client", ip, str(CPS_PORT), str(seconds), "64"]
    else:
        argv = ["iperf3", "-c", ip, "-p", str(TPUT_PORT), "-t", str(max(1, round(seconds))), "-J"]
    noise = Noise(exclude=node.server_pids())
    noise.start()
    proc = subprocess.Popen(
        in_netns(node.client.netns, CLIENT_CPU, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client_pids = children(proc.pid)
    out, _ = proc.communicate(timeout=seconds + 60)
    noise.stop(exclude=client_pids | children(proc.pid))
    text = out.decode(errors="replace")
    return _parse(metric, text), noise


def _parse(metric: str, text: str) -> float:
    try:
        if metric == "rr":
            m = re.search(
                r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=\d+; "
                r"ReceivedMessages=(\d+)",
                text,
            )
            assert m, text[-500:]
            return int(m.group(2)) / float(m.group(1))
        if metric == "cps":
            m = re.search(r"connections (\d+) seconds ([\d.]+) rate ([\d.]+)", text)
            assert m, text[-500:]
            return float(m.group(3))
        data = json.loads(text)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (AssertionError, KeyError, ValueError) as exc:
        raise RuntimeError(f"{metric}: could not read the tool's output: {exc}") from None


# ---- configurations of node A ------------------------------------------------------------
class Configs:
    def __init__(self, node: Node, pin_root: str) -> None:
        self.node = node
        self.pin_root = pin_root
        self.dp: Datapath | None = None
        self.minimal: BpfObject | None = None
        self.client_id = self.server_id = 0

    async def clear(self) -> None:
        ns = self.node.sim.netns
        async with Netlink(netns=ns) as nl:
            for pod in (self.node.client, self.node.server):
                await detach(nl, pod.ifindex)
        for argv in (["iptables", "-F", "FORWARD"], ["nft", "delete", "table", "inet", "bench"]):
            await asyncio.to_thread(
                subprocess.run, in_netns(ns, None, argv), capture_output=True, check=False
            )

    async def ebpf(self, n: int, *, tiers: bool = False) -> None:
        if self.dp is None:
            self.dp = Datapath.open(self.pin_root, ct_entries=262144)
            self.dp.set_event_flags(emit_deny=False, emit_allow=False)
            # the node's addresses, as the agent sets them (np_host_filter written)
            self.dp.set_host_addresses([self.node.sim.node_ipv4, self.node.sim.node_ipv6])
            self.client_id = self.dp.register_pod(namespace="b", name="client", uid="c")
            self.server_id = self.dp.register_pod(namespace="b", name="server", uid="s")
        dp = self.dp
        if tiers:
            rules, _ = tiered(self.node.client.ipv4)
        else:
            rules = compile_rules([PeerRule(c) for c in cidrs(n, self.node.client.ipv4)])
        dp.program_pods(
            {
                self.node.client.ifindex: PodPolicy(self.client_id, ALLOW_ALL, ALLOW_ALL),
                self.node.server.ifindex: PodPolicy(
                    self.server_id, DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, rules), ALLOW_ALL
                ),
            }
        )
        dp.collect_garbage()
        async with Netlink(netns=self.node.sim.netns) as nl:
            for pod in (self.node.client, self.node.server):
                await attach(nl, pod.ifindex, ingress=dp.ingress_prog, egress=dp.egress_prog)

    def iptables(self, n: int) -> None:
        veth = self.node.server.host_veth
        lines = [
            "*filter",
            ":FORWARD ACCEPT [0:0]",
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ]
        lines += [f"-A FORWARD -o {veth} -s {c} -j ACCEPT" for c in cidrs(n, self.node.client.ipv4)]
        lines += [f"-A FORWARD -o {veth} -j DROP", "COMMIT", ""]
        subprocess.run(
            in_netns(self.node.sim.netns, None, ["iptables-restore"]),
            input="\n".join(lines).encode(),
            check=True,
        )

    def nftables(self, n: int) -> None:
        veth = self.node.server.host_veth
        elements = ", ".join(str(c) for c in cidrs(n, self.node.client.ipv4))
        ruleset = f"""
table inet bench {{
    set allowed {{ type ipv4_addr; flags interval; elements = {{ {elements} }} }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ct state established,related accept
        oifname "{veth}" ip saddr @allowed accept
        oifname "{veth}" drop
    }}
}}
"""
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(ruleset)
            f.flush()
            subprocess.run(in_netns(self.node.sim.netns, None, ["nft", "-f", f.name]), check=True)

    async def tc_pass(self) -> None:
        """The minimal program that passes every packet (bench/tools/minimal.bpf.c) on
        both hooks of both veths: what a tc program costs before it does anything."""
        if self.minimal is None:
            self.minimal = BpfObject.load(build_bpf("minimal"))
        prog = self.minimal.programs["min_pass"]
        async with Netlink(netns=self.node.sim.netns) as nl:
            for pod in (self.node.client, self.node.server):
                await attach(nl, pod.ifindex, ingress=prog, egress=prog)

    async def apply(self, name: str) -> float:
        """Configure node A as ``name``; returns the seconds it took."""
        await self.clear()
        started = time.monotonic()
        kind, _, size = name.partition("-")
        n = int(size) if size.isdigit() else 0
        if name == "tc-pass":
            await self.tc_pass()
        elif kind == "ebpf":
            await self.ebpf(n, tiers=size == "tiered")
        elif kind == "iptables":
            await asyncio.to_thread(self.iptables, n)
        elif kind == "nftables":
            await asyncio.to_thread(self.nftables, n)
        return time.monotonic() - started

    def programs(self, name: str) -> list[Program]:
        """The programs configuration ``name`` attaches (none for the others)."""
        if name == "tc-pass" and self.minimal is not None:
            return [self.minimal.programs["min_pass"]]
        if name.startswith("ebpf") and self.dp is not None:
            return [self.dp.ingress_prog, self.dp.egress_prog]
        return []

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()
        if self.minimal is not None:
            self.minimal.close()
        Datapath.unpin(self.pin_root)


def program_cost(node: Node, programs: Sequence[Program], seconds: float) -> dict[str, float]:
    """One cps run on ``node`` with run-time statistics on: the programs' runs per new
    connection and their time, next to the connection's own time (1 / rate)."""
    with run_time_statistics():
        before = [prog_info(p.fd) for p in programs]
        rate, _ = measure(node, "cps", seconds)
        after = [prog_info(p.fd) for p in programs]
    runs = sum(x.run_cnt - y.run_cnt for x, y in zip(after, before, strict=True))
    spent = sum(x.run_time_ns - y.run_time_ns for x, y in zip(after, before, strict=True))
    conns = rate * seconds
    return {
        "runs_per_conn": round(runs / conns, 2) if conns else 0.0,
        "ns_per_run": round(spent / runs) if runs else 0,
        "us_per_conn": round(spent / conns / 1000, 3) if conns else 0.0,
        "conn_us": round(1e6 / rate, 2) if rate else 0.0,
    }


# ---- BPF_PROG_TEST_RUN ------------------------------------------------------------------
# The minimal programs (bench/tools/minimal.bpf.c) the per-packet cost is measured against:
# the same packet, the same keys, read in place, one map lookup each.
FLOORS = {
    "min_pass_ns": "min_pass",  # nothing: the test loop's own cost per run
    "min_hash_ns": "min_hash",  # one LRU-hash lookup of the established flow's key
    "min_lpm_ns": "min_lpm",  # one LPM lookup of the denied peer
    "min_lpm_hit_ns": "min_lpm",  # one LPM lookup of the allowed peer (a CIDR hit)
    "min_flow_ns": "min_flow",  # conntrack miss, then LPM lookup: a stateful new flow's floor
}
HITS = ("min_hash_ns", "min_lpm_hit_ns")  # measured on the allowed packet
ANY = -1
TARGET_PER_PACKET = 1.5  # ours / the minimal program doing the lookup the case needs


def _minimal(entries: Sequence[Prefix], flow_key: bytes) -> BpfObject:
    """The minimal programs with their own trie (``entries``) and conntrack (the
    established flow's ``flow_key``)."""
    obj = BpfObject.load(build_bpf("minimal"))
    try:
        keys = b"".join(lpm_key_bytes(p) for p in entries)
        obj.maps["min_trie"].update_batch(keys, b"\x01\x00\x00\x00" * len(entries))
        obj.maps["min_ct"].update(flow_key, bytes(ctypes.sizeof(lay.NpCtValue)))
    except BaseException:
        obj.close()
        raise
    return obj


def per_packet(sizes: Sequence[int], repeat: int, rounds: int = 7) -> list[dict[str, Any]]:
    """Each configuration on its own pod (ifindex), all installed at once, each with the
    minimal programs on a trie of the same entries; then ``rounds`` interleaved rounds of
    ``repeat`` test runs of every case, ours and the minimal ones, and the median of each:
    side by side, so that a drift of the machine hits every row alike.

    The NetworkPolicy rows allow TCP port 80 from their CIDRs: the cases are a new flow
    from a peer in no CIDR (denied), a new flow from an allowed peer to port 81 (CIDR hit,
    port refused) and an established flow (conntrack hit)."""
    pin_root = f"/sys/fs/bpf/npbench-{uuid.uuid4().hex[:6]}"
    pod_ip, peer_in, peer_out = (
        ipaddress.IPv4Address(a) for a in ("10.66.0.10", "11.255.255.1", "12.0.0.1")
    )
    first = int(ipaddress.IPv4Address("100.64.0.0"))
    # a peer an Admin rule denies: a /24 of Admin policy 3 (Deny, any port)
    admin = ipaddress.IPv4Address(first + 3 * TIERED_CIDRS * 256 + 1)
    # denied, like for like: a peer in no CIDR of any tier (NetworkPolicy isolates)
    denied = pk.packet(src=peer_out, dst=pod_ip, protocol=pk.TCP, dport=80)
    allowed = pk.packet(src=peer_in, dst=pod_ip, protocol=pk.TCP, dport=80)
    refused = pk.packet(src=peer_in, dst=pod_ip, protocol=pk.TCP, dport=81)
    by_admin = pk.packet(src=admin, dst=pod_ip, protocol=pk.TCP, dport=80)
    web = (PortRange(lay.NP_PROTO_TCP, 80, 80),)
    dp = Datapath.open(pin_root, ct_entries=65536)
    rows: list[dict[str, Any]] = []
    minimal: list[BpfObject] = []
    try:
        dp.set_event_flags(emit_deny=False, emit_allow=False)
        dp.set_host_addresses([ipaddress.ip_address("10.66.0.1")])  # the node, as the agent sets
        for ifindex, n in enumerate((*(str(size) for size in sizes), "tiered"), 1):
            started = time.monotonic()
            if n == "tiered":
                rules, entries = tiered(peer_in)
            else:
                nets = cidrs(int(n), peer_in)
                rules = compile_rules([PeerRule(c, ports=web) for c in nets])
                entries = len(nets)
            pid = dp.register_pod(namespace="b", name=f"pod-{n}", uid=f"p-{n}")
            ingress = DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, rules)
            dp.program_pods({ifindex: PodPolicy(pid, ingress, ALLOW_ALL)})
            dp.collect_garbage()
            elapsed = time.monotonic() - started
            before = {bytes(k) for k in dp.ct}
            dp.ingress_prog.test_run(allowed, ifindex=ifindex)  # tracked from now on
            (flow_key,) = {bytes(k) for k in dp.ct} - before
            mini = _minimal(list(rules.entries), flow_key)
            minimal.append(mini)
            progs = mini.programs
            cases: dict[str, tuple[Program, bytes, int]] = {
                "new_flow_ns": (dp.ingress_prog, denied, 2),
                "established_ns": (dp.ingress_prog, allowed, 0),
                # the minimal programs' verdicts: whether their one lookup found an entry
                # (a folded trie holds 0.0.0.0/0 too), not checked
                **{k: (progs[v], allowed if k in HITS else denied, ANY) for k, v in FLOORS.items()},
            }
            if n == "tiered":
                cases["admin_deny_ns"] = (dp.ingress_prog, by_admin, 2)
            else:
                cases["port_refused_ns"] = (dp.ingress_prog, refused, 2)
            rows.append(
                {
                    "config": "tiered" if n == "tiered" else f"networkpolicy-{n}",
                    "entries": entries,
                    "trie_entries": len(rules.entries),
                    "program_seconds": round(elapsed, 2),
                    "ifindex": ifindex,
                    "cases": cases,
                    "samples": {k: [] for k in cases},
                }
            )
        for _ in range(rounds + 1):  # the first round warms up, not counted
            for row in rows:
                for name, (prog, packet, want) in row["cases"].items():
                    res = prog.test_run(packet, ifindex=row["ifindex"], repeat=repeat)
                    if want != ANY and res.retval != want:
                        raise RuntimeError(f"{row['config']} {name}: verdict {res.retval}")
                    row["samples"][name].append(res.duration_ns)
        verified = {p.name: p.info.verified_insns for p in (dp.ingress_prog, dp.egress_prog)}
    finally:
        for mini in minimal:
            mini.close()
        dp.close()
        Datapath.unpin(pin_root)
    out = []
    for row in rows:
        samples = row.pop("samples")
        row.pop("cases")
        row.pop("ifindex")
        figures = {k: round(median(v[1:])) for k, v in samples.items()}
        out.append({**row, **figures, "ratios": per_packet_ratios(figures), "verified": verified})
    return out


def per_packet_ratios(f: dict[str, int]) -> dict[str, float]:
    """Ours against the minimal program doing the one lookup each case needs (the
    target), and against the floor every stateful program pays for a new flow."""
    out = {
        "established / min_hash": f["established_ns"] / f["min_hash_ns"],
        "new flow / min_lpm": f["new_flow_ns"] / f["min_lpm_ns"],
        "new flow / min_flow": f["new_flow_ns"] / f["min_flow_ns"],
        # the limit: a conntrack miss before the trie, which no stateful program skips
        "min_flow / min_lpm": f["min_flow_ns"] / f["min_lpm_ns"],
    }
    if "port_refused_ns" in f:
        out["port refused / min_lpm_hit"] = f["port_refused_ns"] / f["min_lpm_hit_ns"]
    if "admin_deny_ns" in f:
        out["Admin deny / min_lpm_hit"] = f["admin_deny_ns"] / f["min_lpm_hit_ns"]
    return {k: round(v, 2) for k, v in out.items()}


# ---- the run ----------------------------------------------------------------------------
async def compare(*, a: Node, b: Node, metric: str, runs: int, seconds: float) -> dict[str, Any]:
    """Alternate runs of one metric on node A and the baseline node B: median(A) / median(B)."""
    base_vals: list[float] = []
    vals: list[float] = []
    noisy: list[str] = []
    for i in range(runs):
        # alternate which goes first, so a drift over time cancels out
        order = ((b, base_vals), (a, vals)) if i % 2 == 0 else ((a, vals), (b, base_vals))
        for node, sink in order:
            value, noise = await asyncio.to_thread(measure, node, metric, seconds)
            sink.append(value)
            if noise.noisy:
                noisy.append(noise.describe())
    ratio = median(vals) / median(base_vals) if median(base_vals) else float("nan")
    return {
        "value": median(vals),
        "baseline": median(base_vals),
        "ratio": round(ratio, 3),
        "runs": vals,
        "baseline_runs": base_vals,
        "noisy": noisy,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = (1, 1000) if args.quick else (1, 1000, 10000, 100000)
    configs = [
        "none",
        "tc-pass",
        *(f"{k}-{n}" for k in ("ebpf", "iptables", "nftables") for n in sizes),
        "ebpf-tiered",
    ]
    if args.configs:
        configs = args.configs
    metrics = args.metrics or list(METRICS)
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    tag = uuid.uuid4().hex[:4]
    a: Node | None = None
    b: Node | None = None
    cfg: Configs | None = None
    results: dict[str, Any] = {}
    try:
        a, b = await Node.create(f"npa{tag}"), await Node.create(f"npb{tag}")
        cfg = Configs(a, f"/sys/fs/bpf/npbench-{tag}")
        for node in (a, b):  # warm up: first connections, caches, page faults
            for metric in metrics:
                await asyncio.to_thread(measure, node, metric, 1.0)
        for name in configs:
            setup = await cfg.apply(name)
            row: dict[str, Any] = {"setup_seconds": round(setup, 2)}
            for metric in metrics:
                row[metric] = await compare(a=a, b=b, metric=metric, runs=runs, seconds=seconds)
            progs = cfg.programs(name)
            if progs and "cps" in metrics:
                row["cps"]["programs"] = await asyncio.to_thread(program_cost, a, progs, seconds)
            results[name] = row
            print(
                f"  {name:<16} "
                + "  ".join(
                    f"{m} {row[m]['ratio']:.2f}{'*' if row[m]['noisy'] else ''}" for m in metrics
                ),
                flush=True,
            )
        await cfg.clear()
    finally:
        if cfg is not None:
            cfg.close()
        for created in (a, b):
            if created is not None:
                await created.close()
    packet_sizes = (1000, 100000) if args.quick else (1000, 100000, 1000000)
    costs = await asyncio.to_thread(
        per_packet, packet_sizes, 20000 if args.quick else 100000, 3 if args.quick else 7
    )
    return {
        "configs": results,
        "metrics": metrics,
        "per_packet": costs,
        "runs": runs,
        "seconds": seconds,
        "cpus": os.cpu_count(),
    }


def report(figures: dict[str, Any]) -> None:
    metrics = figures.get("metrics", METRICS)
    rows = []
    for name, row in figures["configs"].items():
        cells: list[Any] = [name]
        for m in metrics:
            r = row[m]
            cells.append(f"{r['ratio']:.2f}" + (" *" if r["noisy"] else ""))
        cells += [row[m]["value"] for m in metrics]
        cells.append(row["setup_seconds"])
        rows.append(cells)
    print()
    print(
        f"Ratio to no program (median of {figures['runs']} runs of {figures['seconds']} s "
        f"each, interleaved with the baseline; * = another process used >5% of a core)"
    )
    print(table(["config", *metrics, *(UNITS[m] for m in metrics), "setup s"], rows))
    noisy = {
        f"{n}/{m}": r[m]["noisy"]
        for n, r in figures["configs"].items()
        for m in metrics
        if r[m]["noisy"]
    }
    for where, who in noisy.items():
        print(f"  noisy {where}: {'; '.join(who)}")
    costs = {
        n: r["cps"]["programs"]
        for n, r in figures["configs"].items()
        if "programs" in r.get("cps", {})
    }
    if costs:
        print()
        print("Programs per new connection (one more cps run with run-time statistics on,")
        print("which add two clock reads to every run):")
        print(
            table(
                ["config", "runs / conn", "ns / run", "us / conn", "connection us"],
                [
                    [n, c["runs_per_conn"], c["ns_per_run"], c["us_per_conn"], c["conn_us"]]
                    for n, c in costs.items()
                ],
            )
        )
    print()
    pp = figures["per_packet"]
    print("Per packet (BPF_PROG_TEST_RUN, ingress program), ns, with the minimal programs")
    print("on tries of the same entries (bench/tools/minimal.bpf.c), same run:")
    cols = (
        "new_flow_ns",
        "port_refused_ns",
        "admin_deny_ns",
        "established_ns",
        *FLOORS,
    )
    print(
        table(
            ["config", "CIDRs", "trie", *(c.removesuffix("_ns") for c in cols), "program s"],
            [
                [
                    c.get("config", ""),
                    c["entries"],
                    c.get("trie_entries", c["entries"]),
                    *(c.get(k, "") for k in cols),
                    c["program_seconds"],
                ]
                for c in pp
            ],
        )
    )
    if pp and "ratios" in pp[0]:
        names = list(dict.fromkeys(k for c in pp for k in c["ratios"]))
        print()
        print(f"Ratios (target: ours <= {TARGET_PER_PACKET}x the minimal program of its case)")
        print(
            table(
                ["config", *names],
                [[c["config"], *(c["ratios"].get(k, "") for k in names)] for c in pp],
            )
        )
        print(
            "verified instructions: "
            + ", ".join(f"{k} {v:,}" for k, v in pp[0]["verified"].items())
            + " (the verifier's limit: 1,000,000 per program)"
        )
    tiers = tiered_vs_networkpolicy(figures)
    if tiers:
        print()
        print("Tiered (100 Admin + 100 Baseline policies x 100 CIDRs + 1k NetworkPolicy CIDRs)")
        print("against NetworkPolicy only (1k CIDRs), same run; target <= 1.2x:")
        print(table(["measure", "tiered / networkpolicy-only"], [[k, v] for k, v in tiers.items()]))


def tiered_vs_networkpolicy(figures: dict[str, Any]) -> dict[str, float]:
    """Cost ratios of the tiered configuration to the 1k NetworkPolicy one (>1: dearer):
    per-packet times, and the inverse of the connection and request rates."""
    out: dict[str, float] = {}
    by = {c.get("config"): c for c in figures.get("per_packet", [])}
    t, np = by.get("tiered"), by.get("networkpolicy-1000")
    if t and np:
        out["new flow ns"] = round(t["new_flow_ns"] / np["new_flow_ns"], 3)
        out["established ns"] = round(t["established_ns"] / np["established_ns"], 3)
    cfg = figures.get("configs", {})
    if "ebpf-tiered" in cfg and "ebpf-1000" in cfg:
        for m in ("rr", "cps"):
            if m not in cfg["ebpf-tiered"]:
                continue
            mine, theirs = cfg["ebpf-tiered"][m]["ratio"], cfg["ebpf-1000"][m]["ratio"]
            if mine:
                out[f"1 / {m}"] = round(theirs / mine, 3)
    return out


_CONFIG_NAME = re.compile(r"none|tc-pass|ebpf-tiered|(ebpf|iptables|nftables)-[1-9][0-9]*")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not _CONFIG_NAME.fullmatch(n)]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration {', '.join(bad) or text!r}")
    return names


def _metrics(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(bad) or text!r}")
    return names


def main(
    argv: Sequence[str] | None = None, runner: Callable[[argparse.Namespace], Any] = run
) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 run of 1 s, 1 and 1,000 CIDRs")
    p.add_argument("--runs", type=int, help="runs per configuration and metric (3)")
    p.add_argument("--seconds", type=float, help="seconds per run (4)")
    p.add_argument("--configs", type=_names, help="only these configurations, comma-separated")
    p.add_argument("--metrics", type=_metrics, help="only these metrics (rr, cps, tput)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--chart", metavar="PNG", help="bar chart of the ratios")
    args = p.parse_args(argv)
    prepare()
    require("sockperf", "iperf3", "iptables-restore", "nft", "taskset", "nsenter", "cc")
    figures = asyncio.run(runner(args))
    report(figures)
    write_json(args.json, figures)
    if args.chart:
        bar_chart(
            args.chart,
            "TCP between two pods: ratio to no program",
            {
                n: {m: r[m]["ratio"] for m in figures["metrics"]}
                for n, r in figures["configs"].items()
            },
        )


if __name__ == "__main__":
    main()
