"""DNS benchmark: lookups through the agent's DNS proxy (domain rules), side by side with
the same lookups going straight to the cluster DNS (no domain rules).

One simulated node with the real agent (``--cluster-dns`` set), a native DNS responder
pod (bench/tools/dnsrate.c: answers every A query at once) pinned to CPU 1, and a client
pod whose queries come from the same native tool pinned to CPU 0. Two configurations of
the client's egress, alternated round by round:

  direct    DNS to the responder allowed, no domain rules: not steered
  proxied   the same, plus a domainName rule for the asked name: steered to the
            proxy, which forwards, learns the answer's address for the client (a
            datapath write) and only then releases it

Per configuration: lookups/s with 64 queries in flight, and per-lookup latency (p50,
p99) with one in flight. Targets: at most 1 ms p99 added, and 5,000 lookups/s.

    python -m bench.dns [--quick] [--rounds N] [--seconds S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import build_tool, in_netns, median, prepare, require, table, write_json
from bpf.datapath import Datapath
from fakekube import store as fs
from simnode.node import SimNode, SimPod
from simnode.stack import NodeStack

NAME = "api.example.com"
CLIENT_CPU, SERVER_CPU = 0, 1
_LINE = re.compile(
    r"lookups (\d+) seconds ([\d.]+) rate ([\d.]+) p50_us ([\d.]+) p99_us ([\d.]+) timeouts (\d+)"
)


def measure(
    tool: str, client: SimPod, dns: SimPod, seconds: float, inflight: int
) -> dict[str, float]:
    out = subprocess.run(
        in_netns(
            client.netns,
            CLIENT_CPU,
            [tool, "client", str(dns.ipv4), "53", str(seconds), str(inflight), NAME],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = _LINE.search(out)
    if m is None:
        raise RuntimeError(f"dnsrate printed {out!r}")
    return {
        "lookups": int(m[1]),
        "rate": float(m[3]),
        "p50_us": float(m[4]),
        "p99_us": float(m[5]),
        "timeouts": int(m[6]),
    }


def policy(stack: NodeStack, client: SimPod, dns: SimPod, *, domains: bool) -> dict[str, Any]:
    egress: list[dict[str, Any]] = [
        {"cidr": f"{dns.ipv4}/32", "ports": [{"protocol": "UDP", "port": 53}]}
    ]
    if domains:
        egress.append({"domainName": NAME, "ports": [{"protocol": "TCP", "port": 443}]})
    return {
        "metadata": {"name": "client-egress-abcde", "namespace": "default"},
        "spec": {
            "policyRef": {"name": "client-egress", "namespace": "default"},
            "podIsolation": ["Egress"],
            "podSelectorEndpoints": [
                {
                    "podIP": str(client.ipv4),
                    "hostIP": str(stack.sim.node_ipv4),
                    "name": client.name,
                    "namespace": "default",
                }
            ],
            "egress": egress,
        },
    }


def apply(stack: NodeStack, body: dict[str, Any]) -> None:
    store, meta = stack.api.store, body["metadata"]
    try:
        current = store.get(fs.POLICY_ENDPOINTS, meta["namespace"], meta["name"])
    except fs.ApiError:
        store.create(fs.POLICY_ENDPOINTS, meta["namespace"], body)
        return
    body = dict(body, metadata=dict(meta, resourceVersion=current["metadata"]["resourceVersion"]))
    store.update(fs.POLICY_ENDPOINTS, meta["namespace"], meta["name"], body)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tool = build_tool("dnsrate")
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    tag = f"npd{uuid.uuid4().hex[:4]}"
    sim = SimNode(tag)
    workdir = Path(tempfile.mkdtemp(prefix="np-bench-dns-"))
    pin_root = f"/sys/fs/bpf/np-bench-{tag}"
    stack = NodeStack(sim, pin_root=pin_root, workdir=workdir)
    responder: subprocess.Popen[bytes] | None = None
    results: dict[str, dict[str, list[float]]] = {
        c: {"rate": [], "p50_us": [], "p99_us": [], "timeouts": []} for c in ("direct", "proxied")
    }
    try:
        await sim.start()
        await stack.start_api()
        dns, client, api = [await sim.add_pod(n) for n in ("dns", "client", "api")]
        for pod in (dns, client, api):
            stack.create_pod_object(pod, namespace="default")
        responder = await asyncio.to_thread(
            subprocess.Popen, in_netns(dns.netns, SERVER_CPU, [tool, "serve", "53", str(api.ipv4)])
        )
        await stack.start(
            "agent", "--enable-network-policy=true", f"--cluster-dns={dns.ipv4}", "--log-level=warn"
        )
        await stack.programmed()
        for _ in range(rounds):
            for config in ("direct", "proxied"):
                apply(stack, policy(stack, client, dns, domains=config == "proxied"))
                await stack.programmed()
                await asyncio.sleep(0.2)
                rate = await asyncio.to_thread(measure, tool, client, dns, seconds, 64)
                lat = await asyncio.to_thread(measure, tool, client, dns, seconds, 1)
                results[config]["rate"].append(rate["rate"])
                results[config]["timeouts"].append(rate["timeouts"] + lat["timeouts"])
                results[config]["p50_us"].append(lat["p50_us"])
                results[config]["p99_us"].append(lat["p99_us"])
                print(
                    f"  {config:<8} {rate['rate']:>9,.0f} lookups/s   p50 {lat['p50_us']:>7.1f} us"
                    f"   p99 {lat['p99_us']:>7.1f} us",
                    flush=True,
                )
    except BaseException:
        log = stack.log_file("agent")
        if log.exists():
            print("agent log (last lines):", *log.read_text().splitlines()[-15:], sep="\n")
        raise
    finally:
        if responder is not None:
            responder.kill()
            responder.wait()
        await stack.close()
        await sim.close()
        Datapath.unpin(pin_root)
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {c: {k: median(v) for k, v in results[c].items()} for c in ("direct", "proxied")}
    d, p = summary["direct"], summary["proxied"]
    return {
        "rounds": rounds,
        "seconds": seconds,
        "runs": results,
        "summary": summary,
        "added_p50_us": round(p["p50_us"] - d["p50_us"], 1),
        "added_p99_us": round(p["p99_us"] - d["p99_us"], 1),
        "proxied_rate": p["rate"],
        "rate_ratio": round(p["rate"] / d["rate"], 3) if d["rate"] else None,
    }


def report(figures: dict[str, Any]) -> None:
    s = figures["summary"]
    print()
    print(
        f"DNS lookups from a pod (median of {figures['rounds']} rounds of "
        f"{figures['seconds']} s, alternated)"
    )
    print(
        table(
            ["config", "lookups/s (64 in flight)", "p50 us (1 in flight)", "p99 us", "timeouts"],
            [
                [c, round(s[c]["rate"]), s[c]["p50_us"], s[c]["p99_us"], s[c]["timeouts"]]
                for c in ("direct", "proxied")
            ],
        )
    )
    print(
        f"added by the proxy: p50 {figures['added_p50_us']} us, p99 {figures['added_p99_us']} us "
        f"(target <= 1000); proxied rate {figures['proxied_rate']:,.0f}/s (target >= 5,000), "
        f"{figures['rate_ratio']}x direct"
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1 s")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    prepare()
    require("taskset", "nsenter", "cc", "nft")
    figures = asyncio.run(run(args))
    report(figures)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
