"""Plain HTTP endpoints of a process: /healthz and /readyz for the kubelet, served on
the ``--health-probe-bind-addr`` (and anything else on a TCP address).

Healthy means the event loop answers; ready means every readiness check reports no
problem (the body lists the problems otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from common.flags import parse_bind_addr

ReadyCheck = Callable[[], list[str]]


def health_app(ready_checks: list[ReadyCheck],
               warning_checks: list[ReadyCheck] | None = None) -> web.Application:
    """``warning_checks`` are shown in /readyz's body but do not fail it (a table
    filling up: an operator must see it before it bites)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        problems = [p for check in ready_checks for p in check()]
        warnings = [w for check in warning_checks or [] for w in check()]
        body: dict[str, object] = {"ready": not problems}
        if problems:
            body["problems"] = problems
        if warnings:
            body["warnings"] = warnings
        return web.json_response(body, status=503 if problems else 200)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(app: web.Application, bind_addr: str) -> None:
    """Serve until cancelled."""
    host, port = parse_bind_addr(bind_addr)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port)
    try:
        await site.start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
