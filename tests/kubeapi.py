"""The fake API server on this host's loopback with a client through a kubeconfig: the
fixture for tests of the API layer itself (list, watch, faults)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.kube import KubeClient
from fakekube.server import FakeKube


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[FakeKube, KubeClient]]:
    server = FakeKube(bookmark_interval=0.2)
    await server.start()
    server.write_kubeconfig(str(tmp_path / "kubeconfig"))
    client = await KubeClient.connect(str(tmp_path / "kubeconfig"))
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()
