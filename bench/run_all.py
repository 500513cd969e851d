"""Run every benchmark, keep their figures, and draw one summary chart.

    python -m bench.run_all [--quick] [--out bench/results]

Each benchmark runs as its own process (as `python -m bench.<name>` would) and writes
``<out>/<name>.json``; the datapath benchmark also draws ``<out>/datapath.png``. Then
``<out>/summary.png`` puts the headline figures side by side, and a table is printed.
Not a test: nothing here passes or fails on a number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import prepare, table

BENCHES = (
    "datapath",
    "programming",
    "cni_latency",
    "conntrack_sweep",
    "flowlogs_throughput",
    "dns",
    "soak",
)


def run(name: str, out: Path, quick: bool) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    argv = [sys.executable, "-m", f"bench.{name}", "--json", str(path)]
    if quick:
        argv.append("--quick")
    if name == "datapath":
        argv += ["--chart", str(out / "datapath.png")]
    print(f"== {name}", flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, check=False)
    print(
        f"== {name}: {'done' if done.returncode == 0 else 'FAILED'} in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    if done.returncode != 0 or not path.exists():
        return None
    figures: dict[str, Any] = json.loads(path.read_text())
    return figures


def _datapath_rows(dp: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name, row in dp["configs"].items():
        rows.append(
            [
                f"datapath {name}: rr / cps / tput vs no program",
                f"{row['rr']['ratio']:.2f} / {row['cps']['ratio']:.2f} / "
                f"{row['tput']['ratio']:.2f}",
            ]
        )
    for c in dp["per_packet"]:
        rows.append(
            [
                f"per packet, {c['entries']:,} entries: new / established (ns)",
                f"{c['new_flow_ns']} / {c['established_ns']}",
            ]
        )
        r = c.get("ratios")
        if r:
            rows.append(
                [
                    "  vs minimal: established / min_hash, new / min_lpm, new / min_flow",
                    f"{r['established / min_hash']} / {r['new flow / min_lpm']} / "
                    f"{r['new flow / min_flow']}",
                ]
            )
    return rows


def _programming_rows(pg: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    cs = pg["cold_start"]
    rows.append(
        [
            f"cold start {pg['pods']} pods x {pg['cidrs_per_pod']} CIDRs: "
            "agent start -> programmed (s)",
            cs["agent_seconds"],
        ]
    )
    rows.append(["  of which the first full reconcile (ms)", cs["reconcile_ms"]])
    rows.append(["  agent RSS after (MB)", cs["agent_rss_mb"]])
    rows.append(["agent restart -> re-adopted, programmed (s)", pg["restart"]["seconds"]])
    fl = pg.get("floor")
    if fl:
        rows.append(
            [
                "  floor: imports / list PolicyEndpoints / parse them (s)",
                f"{fl['import_seconds']} / {fl['list_seconds']} / {fl['parse_seconds']}",
            ]
        )
        if "list_and_parse_seconds" in fl:  # results from before the watch overlapped them
            rows.append(["  floor: list and parse, overlapped (s)", fl["list_and_parse_seconds"]])
    for k, v in pg["latency_ms"].items():
        rows.append([f"{k.replace('_', ' ')} p50 / p99 (ms)", f"{v['p50']} / {v['p99']}"])
    return rows


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    rows += _datapath_rows(results["datapath"]) if "datapath" in results else []
    rows += _programming_rows(results["programming"]) if "programming" in results else []
    cni = results.get("cni_latency")
    if cni:
        for situation in ("idle-known", "busy-known", "busy-unknown"):
            f = cni[situation]
            rows.append(
                [
                    f"EnforceNpToPod {situation}, {cni['pods']} pods: p50 / p99 (ms)",
                    f"{f['p50_ms']} / {f['p99_ms']}",
                ]
            )
    ct = results.get("conntrack_sweep")
    if ct:
        rows.append(
            [
                f"conntrack sweep of {ct['entries']:,} / conntrack -L",
                f"{ct['sweep_to_dump_ratio']:.2f}x ({ct['sweep_seconds']} s / "
                f"{ct['conntrack_L_seconds']} s)",
            ]
        )
    fl = results.get("flowlogs_throughput")
    if fl:
        rows.append(
            ["flow log events/s with zero ring drops", fl["max_zero_loss_events_per_second"]]
        )
        cw = fl.get("cloudwatch")
        if cw:
            rows.append(
                [
                    "CloudWatch (moto) batches/s, events/s",
                    f"{cw['batches_per_second']}, {cw['events_per_second']:,}",
                ]
            )
    sk = results.get("soak")
    if sk:
        rows.append(
            [
                f"soak {sk['minutes']} min, {sk['updates']:,} updates: agent RSS trend (MB/min)",
                sk["rss_mb_per_minute"],
            ]
        )
        rows.append(
            [
                "  largest event-loop lag (ms), tasks min-max",
                f"{sk['event_loop_lag_max_ms']}, {sk['tasks_min']}-{sk['tasks_max']}",
            ]
        )
    return rows


def chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no summary chart")
        return
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    dp, pg, fl = (results.get(k) for k in ("datapath", "programming", "flowlogs_throughput"))
    ax = axes[0][0]
    if dp:
        names = list(dp["configs"])
        for i, metric in enumerate(("rr", "cps", "tput")):
            ax.bar(
                [n + i * 0.27 for n in range(len(names))],
                [dp["configs"][c][metric]["ratio"] for c in names],
                0.27,
                label=metric,
            )
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks([n + 0.27 for n in range(len(names))])
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title("TCP between pods: ratio to no program")
        ax.legend(fontsize=8)
    ax = axes[0][1]
    if pg:
        lat = pg["latency_ms"]
        keys = list(lat)
        ax.bar(
            [k.replace("_to_", "\n-> ").replace("_", " ") for k in keys],
            [lat[k]["p99"] for k in keys],
            label="p99",
            color="tab:orange",
        )
        ax.bar(
            [k.replace("_to_", "\n-> ").replace("_", " ") for k in keys],
            [lat[k]["p50"] for k in keys],
            label="p50",
            color="tab:blue",
        )
        ax.set_ylabel("ms")
        ax.set_title(f"Change latency ({pg['pods']} pods x {pg['cidrs_per_pod']} CIDRs)")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    if pg:
        fp = pg["footprint"]
        names = sorted(fp["idle"])
        ax.bar(
            [n - 0.2 for n in range(len(names))],
            [fp["idle"][n]["rss_mb"] for n in names],
            0.4,
            label="idle",
        )
        ax.bar(
            [n + 0.2 for n in range(len(names))],
            [fp["under_changes"][n]["rss_mb"] for n in names],
            0.4,
            label="under changes",
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel("RSS MB")
        ax.set_title("Footprint per process")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    if fl:
        rates = fl["results"]
        ax.plot(
            [r["rate_asked"] for r in rates],
            [r["events_per_second"] for r in rates],
            marker="o",
            label="written/s",
        )
        ax.plot(
            [r["rate_asked"] for r in rates],
            [r["rate_asked"] for r in rates],
            linestyle="--",
            color="grey",
            label="offered",
        )
        ax.set_xlabel("events/s offered")
        ax.set_ylabel("events/s written (zero ring drops)")
        ax.set_title("Flow logs to file")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"summary chart written to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's quick mode")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument(
        "--summary", action="store_true", help="run nothing: the summary of the JSON in --out"
    )
    args = p.parse_args()
    prepare()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [] if args.summary else args.only.split(",") if args.only else list(BENCHES)
    results = {n: r for n in names if (r := run(n, out, args.quick)) is not None}
    # figures of benchmarks not run this time, from an earlier run into the same place
    for n in BENCHES:
        if n not in results and (out / f"{n}.json").exists():
            results[n] = json.loads((out / f"{n}.json").read_text())
    print()
    print(table(["figure", "value"], summary_rows(results)))
    chart(results, out / "summary.png")


if __name__ == "__main__":
    main()
