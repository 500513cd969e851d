"""np-conntrack: removes the datapath's conntrack entries whose flows are gone.

Sweeps every --conntrack-cache-cleanup-period seconds (see conntrack.sweep for the rule);
serves its stats on ``conntrack.sock`` under --runtime-dir (also ``POST /v1/sweep`` to sweep
now, and ``/metrics`` in Prometheus text, which the agent includes in its own /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bpf import layout as lay
from bpf import preflight
from bpf.errors import BpfError
from bpf.maps import Map
from bpf.pins import PinPaths
from common import logs
from common.apimodels import ProcessStats
from common.flags import Settings, parse_settings
from common.localapi import CONNTRACK_SOCKET, make_app, serve_unix, socket_path
from common.supervisor import FlagError, StartupError, run_process, supervise
from conntrack.sweep import KernelRemover, Sweeper, SweepResult

log = structlog.get_logger("conntrack")


class Cleaner:
    def __init__(self, sweeper: Sweeper, *, period: float) -> None:
        self.sweeper = sweeper
        self.period = period
        self.last: SweepResult | None = None
        self.totals = {"sweeps": 0, "removed": 0, "failures": 0}
        self._lock = asyncio.Lock()
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_sweeps = Counter("awsnodeagent_conntrack_sweeps_total", "Sweeps done", registry=r)
        self.m_removed = Counter(
            "awsnodeagent_conntrack_removed_total",
            "Entries removed (their flows were gone)",
            registry=r,
        )
        self.m_failures = Counter(
            "awsnodeagent_conntrack_sweep_failures_total",
            "Sweeps that failed (retried next period)",
            registry=r,
        )
        self.m_entries = Gauge(
            "awsnodeagent_conntrack_entries",
            "Entries in the datapath's conntrack map at the last sweep",
            registry=r,
        )
        self.m_kernel = Gauge(
            "awsnodeagent_conntrack_kernel_entries",
            "Flows in the kernel's conntrack table at the last sweep",
            registry=r,
        )
        self.m_duration = Histogram(
            "awsnodeagent_conntrack_sweep_seconds",
            "Sweep duration",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )

    async def sweep(self) -> SweepResult:
        async with self._lock:  # one sweep at a time, periodic or requested
            try:
                res = await asyncio.to_thread(self.sweeper.run)
            except (BpfError, OSError) as exc:
                self.totals["failures"] += 1
                self.m_failures.inc()
                log.error("conntrack.sweep_failed", error=str(exc))
                raise
        self.last = res
        self.totals["sweeps"] += 1
        self.totals["removed"] += res.removed
        self.m_sweeps.inc()
        self.m_removed.inc(res.removed)
        self.m_entries.set(res.map_entries)
        self.m_kernel.set(res.kernel_entries)
        self.m_duration.observe(res.duration)
        log.info("conntrack.swept", **{k: v for k, v in res.as_dict().items() if k != "started_at"})
        if res.fallback:
            log.warning(
                "conntrack.kernel_table_empty",
                meaning="no kernel conntrack in this network namespace; only "
                "entries idle for long are removed",
            )
        return res

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            with contextlib.suppress(BpfError, OSError):
                await self.sweep()

    def stats(self) -> ProcessStats:
        stats: dict[str, float | int | str] = {f"total_{k}": v for k, v in self.totals.items()}
        stats["period_seconds"] = self.period
        if self.last is not None:
            stats.update(
                {
                    f"last_{k}": (int(v) if isinstance(v, bool) else v)
                    for k, v in self.last.as_dict().items()
                }
            )
        return ProcessStats(running=True, stats=stats)

    def app(self) -> web.Application:
        async def stats(_: web.Request) -> web.Response:
            return web.json_response(self.stats().model_dump())

        async def sweep_now(_: web.Request) -> web.Response:
            try:
                res = await self.sweep()
            except (BpfError, OSError) as exc:
                return web.json_response({"error": str(exc)}, status=503)
            return web.json_response(res.as_dict())

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), content_type="text/plain")

        app = make_app()
        app.router.add_get("/v1/stats", stats)
        app.router.add_post("/v1/sweep", sweep_now)
        app.router.add_get("/metrics", metrics)
        return app


async def open_map(settings: Settings, stop: asyncio.Event) -> Map | None:
    """The pinned conntrack map, once the agent has created it; its size must be the
    flag's (resizing would mean recreating it and losing every tracked flow)."""
    path = PinPaths(settings.bpf_pin_root).map(lay.MAP_CT)
    if not await preflight.wait_for_pin(path, stop, event="conntrack.waiting_for_map"):
        return None
    m = Map.from_pin(path)
    if m.max_entries != settings.conntrack_cache_table_size:
        size = m.max_entries
        m.close()
        raise FlagError(
            f"invalid --conntrack-cache-table-size={settings.conntrack_cache_table_size}: "
            f"the conntrack map pinned at {path} has {size} entries; resizing means "
            "recreating the map and losing every tracked flow, so it is refused at run time "
            f"(keep {size}, or change it on a new node)"
        )
    return m


async def run(settings: Settings, *, stop: asyncio.Event) -> None:
    problems = preflight.problems(settings.bpf_pin_root)
    if problems:
        raise StartupError("; ".join(problems))
    ct = await open_map(settings, stop)
    if ct is None:
        return
    pods = Map.from_pin(PinPaths(settings.bpf_pin_root).map(lay.MAP_PODS))

    def interfaces() -> set[int]:
        return {int.from_bytes(k, "little") for k in pods}

    remover: KernelRemover | None = None
    try:
        remover = KernelRemover.open(PinPaths(settings.bpf_pin_root).maps, ct.max_entries)
    except BpfError as exc:
        log.warning(
            "conntrack.kernel_removals_unavailable",
            error=str(exc),
            effect="entries are removed one syscall each (slower sweeps)",
        )
    try:
        cleaner = Cleaner(
            Sweeper(ct, interfaces=interfaces, remover=remover),
            period=settings.conntrack_cache_cleanup_period,
        )
        log.info(
            "conntrack.starting",
            period=settings.conntrack_cache_cleanup_period,
            entries=ct.max_entries,
            started=time.time(),
        )
        await supervise(
            {
                "api": serve_unix(
                    cleaner.app(), socket_path(settings.runtime_dir, CONNTRACK_SOCKET)
                ),
                "sweeper": cleaner.run(),
            },
            stop=stop,
            grace=settings.shutdown_timeout,
        )
    finally:
        if remover is not None:
            remover.close()
        ct.close()
        pods.close()


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings("np-conntrack", __doc__.splitlines()[0], argv)
    logs.configure(settings.log_level, process="conntrack", json=not sys.stderr.isatty())
    run_process("np-conntrack", lambda stop: run(settings, stop=stop))


if __name__ == "__main__":
    main()
