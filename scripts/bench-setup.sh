#!/usr/bin/env bash
# Set up this machine for the benchmarks (bench/README.md): the project (setup.sh), then
# the native load generators and the firewalls they are compared with.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
missing=()
for pkg in sockperf iperf3 iptables nftables util-linux gcc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench-setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
