#!/usr/bin/env bash
# Set up this machine (scripts/setup.sh) and start np-sandbox: the demo's simulated node,
# kept up for kubectl (a kubectl comes with the dev dependencies, in .venv/bin) until
# Ctrl-C, then removed. It prints the KUBECONFIG to export and commands to try.
# Arguments go to np-sandbox (e.g. --state-dir DIR, up --keep-logs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec scripts/np-sandbox "$@"
