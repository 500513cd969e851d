#!/usr/bin/env bash
# Set up this machine (scripts/setup.sh) and run the demo: a simulated node with network
# namespace pods, the eBPF datapath on their veths, sample policies step by step, allowed
# and denied traffic, and the flow-log lines of the denied flows. Cleans up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m simnode.demo "$@"
