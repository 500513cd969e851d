"""A burst of callers larger than a default listen queue is served, none refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel

from common.localapi import BACKLOG, LocalClient, make_app, serve_unix


class Echo(BaseModel):
    n: int


async def test_a_burst_beyond_128_callers_is_served(tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"n": body["n"]})

    app = make_app()
    app.router.add_post("/v1/echo", echo)
    path = str(tmp_path / "run" / "t.sock")
    server = asyncio.create_task(serve_unix(app, path), name="test-local-api")
    try:
        for _ in range(500):
            if await asyncio.to_thread(os.path.exists, path):
                break
            await asyncio.sleep(0.01)
        client = LocalClient(path, process="test")
        # 600 connections at once: three times aiohttp's default listen queue of 128,
        # which made callers fail with "Can not write request body"
        answers = await asyncio.gather(
            *(client.request("POST", "/v1/echo", Echo, body=Echo(n=i)) for i in range(600))
        )
        assert [a.n for a in answers] == list(range(600))
        assert BACKLOG >= 600
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    assert not await asyncio.to_thread(os.path.exists, path)
