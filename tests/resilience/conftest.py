"""The resilience suite runs with the privileged fixtures (real namespaces, bpffs)."""

from tests.kubeapi import api  # noqa: F401 (the fake API server fixture)
from tests.privileged.conftest import (  # noqa: F401
    datapath,
    pin_root,
    podnet,
    privileged,
    rig,
    sim,
)
