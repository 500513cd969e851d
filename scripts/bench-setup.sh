#!/usr/bin/env bash
# Set up this machine for the benchmarks (bench/README.md): the project (setup.sh), then
# the native load generators and the firewalls they are compared with.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_APT_PACKAGES="sockperf iperf3 iptables util-linux gcc" scripts/setup.sh
