#!/usr/bin/env bash
# Remove the dev stack's kind cluster.
set -euo pipefail
kind delete cluster --name "${CLUSTER:-np-dev}"
