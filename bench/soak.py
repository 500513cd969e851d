"""Soak: the agent under continuous PolicyEndpoint churn for minutes, on a simulated node.

P pods, E PolicyEndpoints (each selecting 3 pods, 20 CIDRs), R updates per second for
the whole run; with a node's history compressed into it: C pods a second re-created
under the same name and address with a new UID, and every update naming a new policy.
Every 5 s: the agent's RSS, its largest event-loop lag so far, its asyncio task count and
the occupancy of the datapath's tables (pods, pod ids, policy ids, tries, port sets).
Reports the RSS trend over the steady part (MB per minute, a least squares slope), the
lag, the task count range and each table's first and largest occupancy: bounded by what
is live, however many UIDs and policy names went by. The CI suite runs the policy churn
for 90 s (tests/resilience/test_load.py) and the id churn past small capacities
(tests/resilience/test_churn.py).

    python -m bench.soak [--minutes 10] [--pods 110] [--endpoints 1000] [--rate 20]
                         [--pod-churn 2] [--no-rename] [--quick] [--json PATH]
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

from bench.common import prepare, table, write_json
from bpf.datapath import Datapath
from common.apimodels import WaitResult
from simnode.churn import Churn, Vitals, vitals
from simnode.node import SimNode
from simnode.stack import NodeStack

AGENT = (
    "--enable-network-policy=true",
    "--metrics-bind-addr=127.0.0.1:8162",
    "--health-probe-bind-addr=127.0.0.1:8163",
    "--log-level=info",
)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    minutes = 1.0 if args.quick else args.minutes
    tag = f"nps{uuid.uuid4().hex[:4]}"
    sim = SimNode(tag)
    workdir = Path(tempfile.mkdtemp(prefix="np-soak-"))
    pin_root = f"/sys/fs/bpf/np-soak-{tag}"
    stack = NodeStack(sim, pin_root=pin_root, workdir=workdir)
    samples: list[Vitals] = []
    try:
        await sim.start()
        await stack.start_api()
        pods = []
        for i in range(args.pods):
            pod = await sim.add_pod(f"p{i}")
            stack.create_pod_object(pod)
            pods.append(pod)
        churn = Churn(
            stack,
            pods,
            endpoints=args.endpoints,
            rate=args.rate,
            pod_rate=args.pod_churn,
            rename_policies=not args.no_rename,
        )
        churn.create()
        await stack.start("agent", *AGENT)
        for _ in range(600):
            with contextlib.suppress(Exception):
                res = await stack.agent.get(
                    "/v1/wait", WaitResult, params={"timeout": "30"}, timeout=40
                )
                if res.programmed:
                    break
            await asyncio.sleep(0.2)
        started = time.monotonic()

        async def sample() -> None:
            while True:
                samples.append(await vitals(stack, started))
                print(
                    f"  t={samples[-1].at:>6}s rss={samples[-1].rss_mb} MB "
                    f"lag_max={samples[-1].lag_max_s * 1000:.1f} ms "
                    f"tasks={samples[-1].tasks} tables={samples[-1].tables}",
                    flush=True,
                )
                await asyncio.sleep(5)

        sampler = asyncio.create_task(sample(), name="soak-vitals")
        try:
            await churn.run(minutes * 60)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        samples.append(await vitals(stack, started))
        updates, recreated = churn.updates, churn.recreated
    finally:
        await stack.close()
        await sim.close()
        Datapath.unpin(pin_root)
        shutil.rmtree(workdir, ignore_errors=True)
    steady = [s for s in samples if s.at >= min(30.0, minutes * 60 / 4)]
    return {
        "pods": args.pods,
        "endpoints": args.endpoints,
        "rate": args.rate,
        "minutes": minutes,
        "updates": updates,
        "pods_recreated": recreated,
        "policy_names": updates + args.endpoints if not args.no_rename else 100,
        "tables_first": samples[0].tables if samples else {},
        "tables_max": {
            t: max(s.tables.get(t, 0) for s in samples)
            for t in (samples[-1].tables if samples else {})
        },
        "tables_last": samples[-1].tables if samples else {},
        "rss_mb_first": steady[0].rss_mb if steady else None,
        "rss_mb_last": samples[-1].rss_mb,
        "rss_mb_max": max(s.rss_mb for s in samples),
        "rss_mb_per_minute": round(slope([(s.at / 60, s.rss_mb) for s in steady]), 3),
        "event_loop_lag_max_ms": round(samples[-1].lag_max_s * 1000, 1),
        "tasks_min": min(s.tasks for s in steady) if steady else None,
        "tasks_max": max(s.tasks for s in steady) if steady else None,
        "samples": [vars(s) for s in samples],
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--pods", type=int, default=110)
    p.add_argument("--endpoints", type=int, default=1000)
    p.add_argument("--rate", type=float, default=20.0, help="updates per second")
    p.add_argument(
        "--pod-churn",
        type=float,
        default=2.0,
        help="pods re-created with a new UID per second (0: none)",
    )
    p.add_argument(
        "--no-rename",
        action="store_true",
        help="keep 100 policy names instead of a new one per update",
    )
    p.add_argument("--quick", action="store_true", help="one minute")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    prepare()
    fig = asyncio.run(run(args))
    print()
    print(
        table(
            ["soak", "value"],
            [
                [
                    "pods / PolicyEndpoints / updates per s",
                    f"{fig['pods']} / {fig['endpoints']} / {fig['rate']}",
                ],
                ["minutes, updates applied", f"{fig['minutes']}, {fig['updates']:,}"],
                [
                    "pod UIDs re-created, policy names used",
                    f"{fig['pods_recreated']:,}, {fig['policy_names']:,}",
                ],
                *[
                    [
                        f"table {t}: first / max / last",
                        f"{fig['tables_first'].get(t)} / {n} / {fig['tables_last'].get(t)}",
                    ]
                    for t, n in fig["tables_max"].items()
                ],
                [
                    "agent RSS first / last / max (MB)",
                    f"{fig['rss_mb_first']} / {fig['rss_mb_last']} / {fig['rss_mb_max']}",
                ],
                ["agent RSS trend (MB per minute)", fig["rss_mb_per_minute"]],
                ["largest event-loop lag (ms)", fig["event_loop_lag_max_ms"]],
                ["asyncio tasks min / max", f"{fig['tasks_min']} / {fig['tasks_max']}"],
            ],
        )
    )
    write_json(args.json, fig)


if __name__ == "__main__":
    main()
