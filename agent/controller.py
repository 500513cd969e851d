"""np-controller: the node's processes in one container, for the aws-eks-nodeagent slot.

On EKS the reference agent is one process, ``/controller``, in the ``aws-eks-nodeagent``
container of the ``aws-node`` DaemonSet; EKS passes it the reference flags. This image's
``/controller`` is this launcher, so that swapping the image is the whole change: it
validates the flags once (an invalid one exits non-zero naming it, before anything
starts), then runs np-agent and np-conntrack (and np-flowlogs with
--enable-policy-event-logs) as child processes with the same flags, forwards SIGTERM and
SIGINT to them, and ends when the first of them ends (stopping the others), with its
exit code: the kubelet restarts the container as it would the reference's. Our own chart
runs each process in a container of its own instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import structlog

from common import logs
from common.flags import Settings, parse_settings

log = structlog.get_logger("controller")


def children(settings: Settings) -> list[str]:
    """The Python modules run as child processes."""
    names = ["agent", "conntrack"]
    if settings.enable_policy_event_logs:
        names.append("flowlogs")
    return names


async def run(argv: Sequence[str], settings: Settings) -> int:
    procs = {
        name: await asyncio.create_subprocess_exec(sys.executable, "-m", name, *argv)
        for name in children(settings)
    }
    log.info("controller.started", processes={n: p.pid for n, p in procs.items()})
    loop = asyncio.get_running_loop()

    def forward(sig: int) -> None:
        for p in procs.values():
            if p.returncode is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    waits = {asyncio.create_task(p.wait(), name=n): n for n, p in procs.items()}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    first = next(iter(done))
    code = first.result()
    log.info("controller.child_ended", process=waits[first], code=code)
    forward(signal.SIGTERM)
    if pending:
        _, hung = await asyncio.wait(pending, timeout=settings.shutdown_timeout + 5)
        for task in hung:
            with contextlib.suppress(ProcessLookupError):
                procs[waits[task]].kill()
            await task
    return int(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings("np-controller", __doc__.splitlines()[0], args)
    logs.configure(settings.log_level, process="controller", json=not sys.stderr.isatty())
    raise SystemExit(asyncio.run(run(args, settings)))


if __name__ == "__main__":
    main()
