"""Root task supervision (kopf's pattern).

Every long-running task is named. When one ends (it must not: its end is logged as an
error), raises, or a stop is requested (SIGTERM), the others are cancelled and given a
grace period; tasks that do not finish in time are reported by name. The first failure,
if any, is re-raised so the process exits non-zero and is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, NoReturn

import structlog

log = structlog.get_logger("supervisor")


class TaskEnded(RuntimeError):  # noqa: N818 (a condition, not an error class name)
    """A task that must run forever returned."""


async def supervise(
    tasks: Mapping[str, Coroutine[Any, Any, Any]],
    *,
    stop: asyncio.Event,
    grace: float,
) -> None:
    running = {asyncio.create_task(coro, name=name): name for name, coro in tasks.items()}
    stopper = asyncio.create_task(stop.wait(), name="stop-request")
    try:
        done, _ = await asyncio.wait({*running, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        done = set()
    failure: BaseException | None = None
    for t in done:
        if t is stopper:
            log.info("supervisor.stopping", reason="stop requested")
            continue
        if t.cancelled():
            failure = failure or TaskEnded(f"task {running[t]} was cancelled")
        elif t.exception() is not None:
            exc = t.exception()
            log.error("supervisor.task_failed", task=running[t], error=repr(exc))
            failure = failure or exc
        else:
            log.error("supervisor.task_ended", task=running[t])
            failure = failure or TaskEnded(f"task {running[t]} ended")
    stopper.cancel()
    pending = [t for t in running if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        finished, hung = await asyncio.wait(pending, timeout=grace)
        for t in hung:
            log.error("supervisor.task_hung", task=running[t], grace=grace)
        for t in finished:
            if not t.cancelled() and t.exception() is not None:
                log.error(
                    "supervisor.task_failed_on_stop", task=running[t], error=repr(t.exception())
                )
    with contextlib.suppress(asyncio.CancelledError):
        await stopper
    if failure is not None:
        raise failure


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT request a clean stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


class StartupError(Exception):
    """A condition that prevents a process from starting, as one line: exit 1."""

    exit_code = 1


class FlagError(StartupError):
    """A flag's value that cannot work here (``invalid --flag=value: why``): exit 2."""

    exit_code = 2


def run_process(program: str, body: Callable[[asyncio.Event], Awaitable[None]]) -> NoReturn:
    """Run a node process's ``body`` until it returns or SIGTERM/SIGINT sets its stop
    event; a StartupError is one line on stderr and a non-zero exit."""

    async def amain() -> int:
        soft, hard = raise_file_limit()
        log.info("process.file_limit", soft=soft, hard=hard)
        stop = asyncio.Event()
        stop_on_signals(stop)
        try:
            await body(stop)
        except StartupError as exc:
            sys.stderr.write(f"{program}: {exc}\n")
            return exc.exit_code
        return 0

    code = 0  # a Ctrl-C before the signal handlers are in place: nothing started yet
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(amain())
    raise SystemExit(code)


def raise_file_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (as Go's runtime does for the reference
    agent): BPF maps, sockets and files share it. Returns (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("process.file_limit_unchanged", soft=soft, hard=hard, error=str(exc))
    return soft, hard
