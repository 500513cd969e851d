"""np-cli: see what is enforced on this node, why a flow is denied, wait until programmed.

    np-cli status                        node, datapath and process summary
    np-cli pods [NAMESPACE/NAME]         pods, their state and (for one pod) the rules in force
    np-cli policies                      policies with pods on this node, rejected objects
    np-cli explain NS/POD --peer IP --port N [--protocol TCP] [--direction ingress]
    np-cli wait [NS/POD ...] [--timeout S]
    np-cli conntrack [--dump] [--limit N]
    np-cli flows [-n N]
    np-cli ebpf progs | maps | loaded-ebpfdata | dump-maps ID   (reference CLI layout)

Every command takes --json. Run as root on the node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, RootModel

from bpf import layout as lay
from bpf.errors import BpfError
from cli import ebpf
from cli.ebpf import CliError, Pinned
from cli.tables import table
from common.apimodels import (
    TABLE_WARN,
    ExplainRequest,
    ExplainResult,
    LearnedView,
    NodeStatus,
    PodView,
    PolicyView,
    ProcessStats,
    RuleView,
    WaitResult,
)
from common.localapi import (
    AGENT_SOCKET,
    CONNTRACK_SOCKET,
    FLOWLOGS_SOCKET,
    ApiError,
    LocalClient,
    Unavailable,
    socket_path,
)
from common.paths import DEFAULT_PIN_ROOT, DEFAULT_RUNTIME_DIR


class Pods(RootModel[list[PodView]]):
    pass


class Policies(RootModel[list[PolicyView]]):
    pass


class LearnedList(RootModel[list[LearnedView]]):
    pass


class Flows(RootModel[list[dict[str, Any]]]):
    pass


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR)
    common.add_argument("--bpf-pin-root", default=DEFAULT_PIN_ROOT)
    p = argparse.ArgumentParser(
        prog="np-cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="node summary")
    pods = sub.add_parser("pods", parents=[common], help="local pods")
    pods.add_argument("pod", nargs="?", help="NAMESPACE/NAME for the rules in force")
    sub.add_parser("policies", parents=[common], help="policies with local pods")
    ex = sub.add_parser("explain", parents=[common], help="why a flow is allowed or denied")
    ex.add_argument("pod", help="NAMESPACE/NAME")
    ex.add_argument("--peer", required=True, help="address of the other side")
    ex.add_argument("--port", type=int, required=True, help="destination port of the flow")
    ex.add_argument("--protocol", default="TCP", choices=["TCP", "UDP", "SCTP", "ICMP"])
    ex.add_argument("--direction", default="ingress", choices=["ingress", "egress"])
    fq = sub.add_parser("fqdn", parents=[common], help="addresses pods learned from DNS")
    fq.add_argument("pod", nargs="?", help="NAMESPACE/NAME (default: every local pod)")
    wait = sub.add_parser("wait", parents=[common], help="wait until pods are programmed")
    wait.add_argument("pods", nargs="*", help="NAMESPACE/NAME (default: every local pod)")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds")
    ct = sub.add_parser("conntrack", parents=[common], help="conntrack cache")
    ct.add_argument("--dump", action="store_true", help="list entries (read from the map)")
    ct.add_argument("--limit", type=int, default=100)
    flows = sub.add_parser("flows", parents=[common], help="recent policy decisions")
    flows.add_argument("-n", type=int, default=20, help="how many")
    eb = sub.add_parser("ebpf", parents=[common], help="kernel objects (reference layout)")
    ebsub = eb.add_subparsers(dest="ebpf_command", required=True)
    ebsub.add_parser("progs", parents=[common], help="programs of the datapath")
    ebsub.add_parser("maps", parents=[common], help="maps of the datapath")
    ebsub.add_parser("loaded-ebpfdata", parents=[common], help="per pod programs and maps")
    dm = ebsub.add_parser("dump-maps", parents=[common], help="dump a map by id")
    dm.add_argument("map_id", type=int)
    dcp = ebsub.add_parser(
        "dump-cp-maps", parents=[common], help="a rule trie's ClusterNetworkPolicy decisions"
    )
    dcp.add_argument("map_id", type=int)
    return p


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


async def _run(args: argparse.Namespace) -> int:
    agent = LocalClient(socket_path(args.runtime_dir, AGENT_SOCKET), process="agent")
    if args.command == "status":
        st = await agent.get("/v1/status", NodeStatus)
        _emit(args, st, render_status(st))
    elif args.command == "pods":
        if args.pod:
            view = await agent.get(f"/v1/pods/{args.pod}", PodView)
            _emit(args, view, render_pod(view))
        else:
            pods = await agent.get("/v1/pods", Pods)
            _emit(args, pods, render_pods(pods.root))
    elif args.command == "policies":
        pols = await agent.get("/v1/policies", Policies)
        _emit(
            args,
            pols,
            table(
                ["NAMESPACE", "POLICY", "TIER", "POLICYENDPOINTS", "LOCAL PODS", "REJECTED"],
                [
                    [
                        p.namespace or "(cluster)",
                        p.name,
                        f"{p.tier} {p.priority}" if p.tier else "-",
                        ", ".join(f"{k}@{v}" for k, v in p.policyendpoints.items()),
                        ", ".join(p.pods),
                        "; ".join(f"{k}: {v}" for k, v in p.rejected.items()),
                    ]
                    for p in pols.root
                ],
            ),
        )
    elif args.command == "explain":
        req = ExplainRequest(
            pod=args.pod,
            peer=args.peer,
            port=args.port,
            protocol=args.protocol,
            direction=args.direction,
        )
        explained = await agent.request("POST", "/v1/explain", ExplainResult, body=req)
        _emit(args, explained, render_explain(explained))
    elif args.command == "fqdn":
        learned = await agent.get(
            "/v1/fqdn", LearnedList, params=[("pod", args.pod)] if args.pod else None
        )
        _emit(
            args,
            learned,
            table(
                ["POD", "NAME", "ADDRESS", "TTL", "EXPIRES IN"],
                [
                    [
                        v.pod,
                        v.name.rstrip(".") or "(before restart)",
                        v.address,
                        v.ttl if v.ttl is not None else "-",
                        f"{v.expires_in:.0f}s" if v.expires_in >= 0 else "expired",
                    ]
                    for v in learned.root
                ],
            ),
        )
    elif args.command == "wait":
        params = [("timeout", str(args.timeout)), *(("pod", p) for p in args.pods)]
        res = await agent.get("/v1/wait", WaitResult, params=params, timeout=args.timeout + 10)
        _emit(args, res, render_wait(res))
        return 0 if res.programmed else 1
    elif args.command == "conntrack":
        return await _conntrack(args)
    elif args.command == "flows":
        client = LocalClient(
            socket_path(args.runtime_dir, FLOWLOGS_SOCKET), process="flow-log shipper"
        )
        flows = await client.get("/v1/flows", Flows, params={"limit": str(args.n)})
        _emit(args, flows, "\n".join(f.get("line", "") for f in flows.root))
    elif args.command == "ebpf":
        return await _ebpf(args)
    return 0


async def _conntrack(args: argparse.Namespace) -> int:
    client = LocalClient(
        socket_path(args.runtime_dir, CONNTRACK_SOCKET), process="conntrack cleaner"
    )
    try:
        stats: ProcessStats | None = await client.get("/v1/stats", ProcessStats)
    except Unavailable as exc:
        if not args.dump:
            raise
        stats = None
        sys.stderr.write(f"np-cli: {exc}\n")
    entries: list[dict[str, Any]] = []
    if args.dump:
        pinned = Pinned(args.bpf_pin_root)
        pinned.check()
        with pinned.open(lay.MAP_CT) as m:
            entries = ebpf.conntrack_entries(m, limit=args.limit)
    data = {"stats": stats.model_dump(mode="json") if stats else None, "entries": entries}
    lines = []
    if stats is not None:
        lines.append(" ".join(f"{k}={v}" for k, v in sorted(stats.stats.items())))
    if args.dump:
        lines.append(
            table(
                ["IFINDEX", "PROTO", "POD", "PEER", "ORIGIN", "REASON", "IDLE(s)"],
                [
                    [
                        e["ifindex"],
                        e["protocol"],
                        e["pod"],
                        e["peer"],
                        e["origin"],
                        e["reason"],
                        e["idle_seconds"],
                    ]
                    for e in entries
                ],
            )
        )
    _emit(args, data, "\n".join(lines))
    return 0


async def _cluster_priorities(args: argparse.Namespace) -> dict[str, int]:
    """Each ClusterNetworkPolicy's priority, from the agent if it runs (else none)."""
    agent = LocalClient(socket_path(args.runtime_dir, AGENT_SOCKET), process="agent")
    try:
        pols = await agent.get("/v1/policies", Policies, timeout=3)
    except (Unavailable, ApiError):
        return {}
    return {p.name: p.priority for p in pols.root if p.tier and p.priority is not None}


async def _ebpf(args: argparse.Namespace) -> int:
    pinned = Pinned(args.bpf_pin_root)
    cmd = args.ebpf_command
    if cmd == "progs":
        items = ebpf.progs()
        _emit(args, items, ebpf.render_progs(items))
    elif cmd == "maps":
        maps = ebpf.maps(pinned)
        _emit(args, maps, ebpf.render_maps(maps))
    elif cmd == "loaded-ebpfdata":
        loaded = ebpf.loaded(pinned)
        _emit(args, loaded, ebpf.render_loaded(loaded))
    elif cmd == "dump-maps":
        dump = ebpf.dump(pinned, args.map_id)
        _emit(args, dump, ebpf.render_dump(dump))
    elif cmd == "dump-cp-maps":
        dump = ebpf.dump_cp(pinned, args.map_id, await _cluster_priorities(args))
        _emit(args, dump, ebpf.render_dump_cp(dump))
    return 0


# ---- rendering ---------------------------------------------------------------------------
def render_status(st: NodeStatus) -> str:
    rows = [
        ["node", st.node],
        ["mode", st.mode],
        ["ready", "yes" if st.ready else "no: " + "; ".join(st.problems)],
        ["pods (programmed/local)", f"{st.programmed}/{st.pods}"],
        ["policyendpoints", f"{st.policyendpoints} ({st.rejected} rejected)"],
        ["programs", f"ingress #{st.ingress_prog_id}, egress #{st.egress_prog_id}"],
        ["tries / port sets", f"{st.tries} / {st.portsets}"],
        [
            "packets allowed / denied",
            f"{st.datapath.get('packets_allowed', 0)} / {st.datapath.get('packets_denied', 0)}",
        ],
        ["events lost", str(st.datapath.get("events_lost", 0))],
    ]
    for name, t in st.tables.items():
        mark = "  <- nearly full" if t.fill >= TABLE_WARN else ""
        rows.append([f"table {name}", f"{t.entries}/{t.capacity}{mark}"])
    for pod, why in st.failed.items():
        rows.append([f"failed {pod}", why])
    for name, w in st.watches.items():
        rows.append(
            [
                f"watch {name}",
                f"{'synced' if w.synced else 'not synced'}, {w.lists} lists, {w.errors} errors",
            ]
        )
    for name, proc in (("conntrack cleaner", st.conntrack), ("flow-log shipper", st.flowlogs)):
        rows.append([name, "running" if proc.running else f"not running ({proc.error})"])
    return table(["", ""], rows, header=False)


def render_pods(pods: list[PodView]) -> str:
    return table(
        ["NAMESPACE", "NAME", "IPS", "INTERFACE", "INGRESS", "EGRESS", "PROGRAMMED", "POLICIES"],
        [
            [
                p.namespace,
                p.name,
                ",".join(p.ips),
                p.interface or "-",
                p.ingress.state if p.ingress else "-",
                p.egress.state if p.egress else "-",
                "yes" if p.programmed else f"no ({p.failure})" if p.failure else "no",
                ",".join(sorted({r.policy for r in p.policies})) or "-",
            ]
            for p in pods
        ],
    )


def render_pod(p: PodView) -> str:
    out = [
        f"{p.namespace}/{p.name}  uid {p.uid}  ips {', '.join(p.ips)}",
        f"interface {p.interface or '-'} (ifindex {p.ifindex}), programs "
        f"{'attached' if p.attached else 'NOT attached'} "
        f"(ingress #{p.ingress_prog_id}, egress #{p.egress_prog_id})",
        f"programmed: {'yes' if p.programmed else 'no'}" + (f" ({p.error})" if p.error else ""),
    ]
    networkpolicies = [r for r in p.policies if r.tier is None]
    cluster = [r for r in p.policies if r.tier is not None]
    if networkpolicies:
        out.append("NetworkPolicies:")
    for ref in networkpolicies:
        out.append(
            f"  {ref.policyendpoint} ({ref.policy}) generation {ref.generation}, "
            f"programmed {ref.programmed_generation}"
        )
    if cluster:
        out.append("ClusterNetworkPolicies:")
    for ref in sorted(cluster, key=lambda r: (r.tier != "Admin", r.priority, r.policy)):
        out.append(
            f"  {ref.tier} priority {ref.priority}: {ref.policy} ({ref.policyendpoint}) "
            f"generation {ref.generation}, programmed {ref.programmed_generation}"
        )
    for name, d in (("ingress", p.ingress), ("egress", p.egress)):
        if d is None:
            continue
        out.append(f"{name}: {d.state}" + (f" (trie {d.trie_id})" if d.trie_id else ""))
        out += _render_rules(d.rules)
    return "\n".join(out)


_TIER_TITLES = {
    "ADMIN": "Admin",
    "NETWORK_POLICY": "NetworkPolicy",
    "BASELINE": "Baseline",
    "DEFAULT": "default",
    "ERROR": "undecidable",
}


def _render_rules(rules: list[RuleView]) -> list[str]:
    """A direction's entries; with ClusterNetworkPolicy tiers, each decision names its
    tier and policy, so that cluster rules read apart from NetworkPolicy's."""
    out = []
    for rule in rules:
        if rule.other is None:  # NetworkPolicy only
            ports = (
                ", ".join(
                    f"{r.protocol} {r.start_port}-{r.end_port} ({r.policy})" for r in rule.ports
                )
                or "nothing (except)"
            )
            out.append(f"  {rule.cidr}: {ports}")
            continue
        out.append(f"  {rule.cidr}:")
        for r in [*rule.ports, rule.other]:
            where = (
                "other ports" if r is rule.other else f"{r.protocol} {r.start_port}-{r.end_port}"
            )
            who = f" {r.policy}" if r.policy else ""
            out.append(f"    [{_TIER_TITLES.get(r.tier, r.tier)}{who}] {where}: {r.verdict}")
    return out


def render_wait(res: WaitResult) -> str:
    if res.programmed:
        return f"programmed ({res.waited}s)"
    text = f"not programmed after {res.waited}s: {', '.join(res.pending)}"
    for pod, why in res.failed.items():
        text += f"\n  {pod}: {why}"
    return text


def render_explain(r: ExplainResult) -> str:
    text = f"{r.verdict}: {r.summary}"
    if r.tier:
        text += f"\n  tier: {r.tier}"
        if r.priority is not None:
            text += f" (priority {r.priority}, action {r.action})"
    if r.policyendpoints:
        text += "\n  decided by: " + ", ".join(r.policyendpoints)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(_run(args))
    except (Unavailable, CliError) as exc:
        sys.stderr.write(f"np-cli: {exc}\n")
        code = 1
    except ApiError as exc:
        sys.stderr.write(f"np-cli: {exc} (HTTP {exc.status})\n")
        code = 1
    except BpfError as exc:
        hint = " (run as root)" if exc.errno in (1, 13) else ""
        sys.stderr.write(f"np-cli: {exc.strerror}{hint}\n")
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
