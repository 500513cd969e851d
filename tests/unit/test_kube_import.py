"""The Kubernetes adapter loads only the parts of kubernetes-asyncio it uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import common.kube as kube
loaded = [m for m in sys.modules if m.startswith("kubernetes_asyncio")]
assert not [m for m in loaded if m.startswith(("kubernetes_asyncio.client.api.",
                                                "kubernetes_asyncio.client.models."))], loaded
assert not vars(sys.modules["kubernetes_asyncio.client.models"]).get("V1Pod")
assert kube.k8s_client.ApiClient and kube.k8s_config.load_kube_config
print(len(loaded))
"""


def test_no_api_or_model_classes_are_imported() -> None:
    """Each process would otherwise carry ~35 MB of classes it never uses."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 20
