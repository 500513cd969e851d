#!/usr/bin/env bash
# Set up this machine (scripts/setup.sh) and run the demo: a simulated node with network
# namespace pods, the fake API server and the real node processes (np-resolver, np-agent,
# np-conntrack, np-flowlogs), the EKS walkthrough's NetworkPolicies applied step by step,
# allowed and denied traffic with the agent's explanations, and the DENY flow-log lines.
# Cleans up on exit, Ctrl-C included. Options: --no-color, --keep-logs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m simnode.demo "$@"
