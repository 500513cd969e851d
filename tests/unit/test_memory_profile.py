"""The memory diagnostics task writes allocation growth to its file."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from common import memory


async def test_profile_writes_growth(tmp_path: Path) -> None:
    out = tmp_path / "mem.txt"
    task = asyncio.create_task(memory.profile(str(out), period=0.05, top=3), name="profile")
    keep = []
    try:
        for _ in range(20):
            keep.append(bytearray(10_000))  # something that grows
            await asyncio.sleep(0.01)
        for _ in range(100):
            if out.exists() and out.read_text().count("====") >= 2:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        tracemalloc.stop()
    text = out.read_text()
    assert text.count("====") >= 2
    assert "KiB" in text
