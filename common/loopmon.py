"""Event-loop health of a process: how late a timer fires (lag: something blocked the
loop) and how many tasks exist (a steady rise is a leak)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Gauge, Histogram

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopMonitor:
    def __init__(self, registry: CollectorRegistry, prefix: str, interval: float = 0.1) -> None:
        self.interval = interval
        self.lag = Histogram(
            f"{prefix}_event_loop_lag_seconds",
            "How late the event loop ran a timer",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.lag_max = Gauge(
            f"{prefix}_event_loop_lag_max_seconds",
            "Largest event-loop lag seen since start",
            registry=registry,
        )
        self.tasks = Gauge(f"{prefix}_asyncio_tasks", "asyncio tasks alive", registry=registry)
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - started - self.interval)
            self.lag.observe(lag)
            if lag > self.worst:
                self.worst = lag
                self.lag_max.set(lag)
            self.tasks.set(len(asyncio.all_tasks()))
