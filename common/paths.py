"""Where the node processes keep their state by default: the one definition of each."""

from __future__ import annotations

DEFAULT_PIN_ROOT = "/sys/fs/bpf/netpol"  # bpffs: the datapath's pinned maps and programs
DEFAULT_RUNTIME_DIR = "/var/run/np-agent"  # the processes' local API sockets
