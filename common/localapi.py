"""Local APIs over Unix sockets: one per process, under one runtime directory.

Sockets are root-only (mode 0600, and every peer's credentials are checked with
SO_PEERCRED: root, or the process's own user when it does not run as root), stale
socket files are removed at start and at exit, and routes are
versioned (``/v1/...``) JSON. :class:`LocalClient` is the typed client the CLI and the
processes use; failures say what to do ("is the agent running?").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

log = structlog.get_logger("localapi")
AGENT_SOCKET = "agent.sock"
CONNTRACK_SOCKET = "conntrack.sock"
FLOWLOGS_SOCKET = "flowlogs.sock"

# Pending connections a socket queues (the kernel caps it at net.core.somaxconn). When
# the queue is full, connect() on a non-blocking Unix socket fails with EAGAIN, which
# asyncio takes for "in progress": the client then fails on its first write instead of
# being told to retry. A deep queue keeps bursts of callers (a harness explaining every
# pair of pods at once) from ever seeing that.
BACKLOG = 4096

M = TypeVar("M", bound=BaseModel)
Params = Mapping[str, str] | Sequence[tuple[str, str]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@web.middleware
async def root_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Root, or the user the process runs as (the resolver may run as non-root)."""
    uid = peer_uid(request)
    if uid not in (0, os.geteuid()):
        return web.json_response({"error": "forbidden: root only"}, status=403)
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Client mistakes are 4xx with a JSON reason; nothing escapes as a bare 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except ValidationError as exc:
        return web.json_response(
            {
                "error": "invalid request",
                "details": exc.errors(include_url=False, include_context=False),
            },
            status=400,
        )
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Exception as exc:  # a fault of ours, not the caller's: logged, and still JSON
        log.exception("localapi.internal_error", route=request.path)
        return web.json_response({"error": f"internal error: {exc}"}, status=500)


def make_app() -> web.Application:
    return web.Application(middlewares=[root_only, json_errors])


def socket_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, name)


async def serve_unix(app: web.Application, path: str) -> None:
    """Serve ``app`` on a root-only Unix socket at ``path`` until cancelled."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale from a previous run
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    old_umask = os.umask(0o077)  # the socket is created 0600, never briefly open
    try:
        site = web.UnixSite(runner, path, backlog=BACKLOG)
        await site.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Unavailable(Exception):  # noqa: N818 (a state, reported to users as is)
    """The process behind a socket cannot be reached; the message says why and what to do."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LocalClient:
    def __init__(self, path: str, *, process: str = "agent") -> None:
        self.path = path
        self.process = process

    def _unavailable(self, exc: BaseException) -> Unavailable:
        if not os.path.exists(self.path):
            return Unavailable(
                f"{self.process} is not running (no socket at {self.path}; "
                "is it started, with the same --runtime-dir?)"
            )
        if isinstance(exc, PermissionError) or "Permission denied" in str(exc):
            return Unavailable(f"permission denied on {self.path}: run as root")
        return Unavailable(f"{self.process} is not answering on {self.path}: {exc}")

    async def request(
        self,
        method: str,
        route: str,
        model: type[M],
        *,
        params: Params | None = None,
        body: BaseModel | None = None,
        timeout: float = 10.0,
    ) -> M:
        connector = aiohttp.UnixConnector(path=self.path)
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=client_timeout) as s,
                s.request(
                    method,
                    f"http://localhost{route}",
                    params=params,
                    json=body.model_dump(mode="json") if body else None,
                ) as r,
            ):
                payload: Any = await r.json(content_type=None)
                if r.status >= 400:
                    reason = payload.get("error") if isinstance(payload, dict) else payload
                    raise ApiError(r.status, str(reason))
                return model.model_validate(payload)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise self._unavailable(exc) from None
        except TimeoutError:
            raise Unavailable(f"{self.process} did not answer within {timeout}s") from None

    async def text(self, route: str, *, timeout: float = 5.0) -> str:
        connector = aiohttp.UnixConnector(path=self.path)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as s,
                s.get(f"http://localhost{route}") as r,
            ):
                if r.status >= 400:
                    raise ApiError(r.status, await r.text())
                return await r.text()
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise self._unavailable(exc) from None
        except TimeoutError:
            raise Unavailable(f"{self.process} did not answer within {timeout}s") from None

    async def get(
        self, route: str, model: type[M], *, params: Params | None = None, timeout: float = 10.0
    ) -> M:
        return await self.request("GET", route, model, params=params, timeout=timeout)
