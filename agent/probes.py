"""HTTP endpoints of the enforcer: Prometheus metrics, and the checks behind /readyz.

Ready means: bpffs mounted read-write, the datapath's global maps pinned, both watches
listed, and the first full reconcile done. Healthy means the event loop answers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.metrics import AgentMetrics
from bpf import layout as lay
from bpf.pins import PinPaths
from bpf.preflight import bpffs_problem
from common.localapi import ApiError, LocalClient, Unavailable


def global_maps_pinned(pin_root: str) -> list[str]:
    missing = [
        n
        for n in (lay.MAP_PODS, lay.MAP_RULES, lay.MAP_CT, lay.MAP_EVENTS)
        if not os.path.exists(PinPaths(pin_root).map(n))
    ]
    return (
        [f"maps not pinned under {PinPaths(pin_root).maps}: {', '.join(missing)}"]
        if missing
        else []
    )


def metrics_app(
    metrics: AgentMetrics,
    refresh: Callable[[], Awaitable[None]] | None = None,
    neighbours: list[str] | None = None,
) -> web.Application:
    """The agent's metrics, followed by those of the node's other processes (fetched from
    their sockets): one scrape target per node, as with the reference agent."""

    async def fetch(path: str) -> bytes:
        try:
            return (await LocalClient(path).text("/metrics", timeout=2)).encode()
        except (Unavailable, ApiError):
            return b""

    async def handler(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        parts = [generate_latest(metrics.registry)]
        parts += await asyncio.gather(*(fetch(p) for p in neighbours or []))
        return web.Response(body=b"".join(parts), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


def bpffs_ready() -> list[str]:
    problem = bpffs_problem("/sys/fs/bpf", try_mount=False)
    return [problem] if problem else []
