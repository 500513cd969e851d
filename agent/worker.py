"""The datapath's owner thread: every map operation runs there, never on the event loop.

Map writes are syscalls, inserting tries waits for an RCU grace period (milliseconds),
and compiling a large rule set takes milliseconds of CPU; one dedicated thread keeps the
loop responsive and serialises all datapath changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from bpf.datapath import Datapath

P = ParamSpec("P")
T = TypeVar("T")


class DatapathWorker:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
