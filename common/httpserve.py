"""Plain HTTP endpoints of a process: /healthz and /readyz for the kubelet, served on
the ``--health-probe-bind-addr`` (and anything else on a TCP address, such as metrics).

Healthy means the event loop answers; ready means every readiness check reports no
problem (the body lists the problems otherwise).

These ports listen on every address by default (as the reference agent's do), so any
peer can open connections. None may hold what the process needs:

- at most ``MAX_CONNECTIONS`` connections per port; one more is closed at once (and
  counted), never queued in memory;
- a request's head must arrive within ``HEADER_TIMEOUT`` seconds of the connection
  (slow or partial requests are cut), and the whole exchange within
  ``REQUEST_TIMEOUT``; one request per connection (no idle keep-alive);
- the process raises its soft descriptor limit to the hard one at start
  (``common.supervisor.raise_file_limit``), so sockets and BPF maps share a large budget, and the
  caps above keep the ports' share bounded whatever the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from common.flags import parse_bind_addr

ReadyCheck = Callable[[], list[str]]
log = structlog.get_logger("httpserve")

MAX_CONNECTIONS = 64
HEADER_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0


@dataclass
class _Limiter:
    name: str
    max_connections: int
    header_timeout: float
    request_timeout: float
    active: int = 0  # connections open now (counted from protocol creation)
    guards: dict[Any, _Guard] = field(default_factory=dict)  # transport -> guard
    _full_logged: bool = False

    def full(self) -> bool:
        if self.active < self.max_connections:
            self._full_logged = False
            return False
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "http.connection_limit",
                server=self.name,
                limit=self.max_connections,
                effect="further connections are closed until some end",
            )
        return True


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _abort(transport)


class _Guard(asyncio.Protocol):
    """Forwards to aiohttp's protocol; counts the connection and cuts it when its
    request head (then its whole exchange) takes too long."""

    def __init__(self, inner: Any, limiter: _Limiter) -> None:
        self.inner = inner
        self.limiter = limiter
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        # counted when created, not when connection_made runs: asyncio accepts a whole
        # batch (creating every protocol) before any of their connection_made calls
        limiter.active += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        lim = self.limiter
        lim.guards[transport] = self
        self.timer = asyncio.get_running_loop().call_later(lim.header_timeout, self._expire)
        self.inner.connection_made(transport)

    def started(self) -> None:
        """The request head is complete: the rest of the exchange has its own bound."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(
            self.limiter.request_timeout, self._expire
        )

    def _expire(self) -> None:
        if self.transport is not None:
            _abort(self.transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        lim = self.limiter
        lim.guards.pop(self.transport, None)
        lim.active -= 1
        self.inner.connection_lost(exc)


def health_app(
    ready_checks: list[ReadyCheck], warning_checks: list[ReadyCheck] | None = None
) -> web.Application:
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


async def serve(
    app: web.Application,
    bind_addr: str,
    *,
    max_connections: int = MAX_CONNECTIONS,
    header_timeout: float = HEADER_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
) -> None:
    """Serve until cancelled, within the bounds in the module docstring."""
    host, port = parse_bind_addr(bind_addr)
    limiter = _Limiter(bind_addr, max_connections, header_timeout, request_timeout)
    app.middlewares.append(_middleware(limiter))
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=1,
        keepalive_timeout=0,
        max_line_size=4096,
        max_field_size=4096,
    )
    await runner.setup()
    handler = runner.server
    assert handler is not None

    def factory() -> asyncio.Protocol:
        if limiter.full():
            return _Refuse()
        return _Guard(handler(), limiter)

    server = await asyncio.get_running_loop().create_server(
        factory, host or None, port, reuse_address=True, backlog=128
    )
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        for t in list(limiter.guards):
            _abort(t)
        await runner.cleanup()


def _middleware(limiter: _Limiter) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def bounded_exchange(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guard = limiter.guards.get(request.transport)
        if guard is not None:
            guard.started()
        response = await handler(request)
        response.force_close()  # one request per connection: nothing idles
        return response

    return bounded_exchange
