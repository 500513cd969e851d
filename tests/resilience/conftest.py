"""The resilience suite runs with the privileged fixtures (real namespaces, bpffs)."""

from tests.privileged.conftest import pin_root, privileged, rig, sim  # noqa: F401
