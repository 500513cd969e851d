"""Shared by the benchmarks: pinned native load generators, the CPU other processes use
during a run (to flag noisy runs), medians and ratios, tables, JSON and charts."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import logs

TOOLS = Path(__file__).parent / "tools"
HZ = os.sysconf("SC_CLK_TCK")
NOISY_CORES = 0.05  # other processes using more than 5% of a core during a run


def prepare() -> None:
    """What every benchmark needs first: root (namespaces, BPF, tc), the libraries' logs
    quiet (only warnings), and SIGTERM taken as Ctrl-C, so a stopped run still removes the
    namespaces, pins and servers it made on its way out."""
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    logs.configure("warn", process="bench", json=False)
    signal.signal(signal.SIGTERM, functools.partial(_terminated, os.getpid()))


def _terminated(main: int, signum: int, frame: object) -> None:
    if os.getpid() != main:
        # a forked child (a library's helper that is sent SIGTERM): die as the default
        # action would, never unwind the parent's stack copy
        os._exit(128 + signum)
    raise KeyboardInterrupt


def require(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}; install them with scripts/bench-setup.sh")


def build_tool(name: str) -> str:
    """Compile bench/tools/<name>.c (once) and return the binary's path."""
    src = TOOLS / f"{name}.c"
    out = Path("/tmp") / f"np-bench-{name}-{int(src.stat().st_mtime)}"
    if not out.exists():
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return str(out)


def build_bpf(name: str) -> str:
    """Compile bench/tools/<name>.bpf.c (once, against bpf/np.h) and return the object."""
    src = TOOLS / f"{name}.bpf.c"
    root = Path(__file__).parent.parent / "bpf"
    stamp = max(int(src.stat().st_mtime), int((root / "np.h").stat().st_mtime))
    out = Path("/tmp") / f"np-bench-{name}-{stamp}.o"
    if not out.exists():
        multiarch = subprocess.run(
            ["cc", "-print-multiarch"], capture_output=True, text=True, check=False
        ).stdout.strip()
        subprocess.run(
            ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", f"-I{root}"]
            + ([f"-I/usr/include/{multiarch}"] if multiarch else [])
            + ["-c", str(src), "-o", str(out)],
            check=True,
        )
    return str(out)


def in_netns(netns: str, cpu: int | None, argv: Sequence[str]) -> list[str]:
    """argv run in a network namespace (only the network: nsenter, not `ip netns exec`,
    which would remount /sys), pinned to one CPU."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return ["nsenter", f"--net=/run/netns/{netns}", *pin, *argv]


# ---- other processes' CPU -----------------------------------------------------------------
def _cpu_ticks() -> dict[int, tuple[str, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if not cmdline:  # kernel threads: softirq work is part of what is measured
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (name, int(fields[11]) + int(fields[12]))
    return out


@dataclass
class Noise:
    """CPU used by every other user-space process while a run lasted."""

    exclude: set[int] = field(default_factory=set)
    _before: dict[int, tuple[str, int]] = field(default_factory=dict)
    _started: float = 0.0
    cores: float = 0.0
    top: list[tuple[str, float]] = field(default_factory=list)

    def start(self) -> None:
        self._before = _cpu_ticks()
        self._started = time.monotonic()

    def stop(self, exclude: Iterable[int] = ()) -> None:
        wall = max(time.monotonic() - self._started, 1e-6)
        skip = self.exclude | set(exclude) | {os.getpid()}
        used: dict[str, float] = {}
        for pid, (name, ticks) in _cpu_ticks().items():
            if pid in skip or pid not in self._before:
                continue
            delta = (ticks - self._before[pid][1]) / HZ / wall
            if delta > 0:
                used[name] = used.get(name, 0.0) + delta
        self.cores = sum(used.values())
        self.top = sorted(used.items(), key=lambda kv: -kv[1])[:3]

    @property
    def noisy(self) -> bool:
        return self.cores > NOISY_CORES

    def describe(self) -> str:
        return ", ".join(f"{n} {c:.2f}" for n, c in self.top) or "-"


def children(pid: int) -> set[int]:
    """pid and all its descendants (the load generators of a run)."""
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        out.update(kids)
        todo.extend(kids)
    return out


# ---- figures -------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"figures written to {path}")


def bar_chart(
    path: str,
    title: str,
    groups: dict[str, dict[str, float]],
    ylabel: str = "ratio to no program (1.0 = no cost)",
) -> None:
    """Grouped bars: one group per configuration, one bar per metric."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written")
        return
    names = list(groups)
    metrics = sorted({m for g in groups.values() for m in g})
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4.5))
    for i, metric in enumerate(metrics):
        xs = [n + i * width for n in range(len(names))]
        ax.bar(xs, [groups[g].get(metric, 0.0) for g in names], width, label=metric)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([n + width * (len(metrics) - 1) / 2 for n in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"chart written to {path}")
