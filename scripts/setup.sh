#!/usr/bin/env bash
# Prepare this machine (Debian/Ubuntu, as root) to run the agent, its tests and the demo:
# system packages, bpffs, and a virtualenv at .venv with the project installed editable.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (the agent and its tests need CAP_BPF and CAP_NET_ADMIN)" >&2
    exit 1
fi

# clang/llvm/libbpf-dev rebuild the BPF objects (the staleness test compares a fresh build
# with the committed objects); the agent itself needs only libbpf1 at run time.
# EXTRA_APT_PACKAGES: more to install the same way (scripts/bench-setup.sh)
APT_PACKAGES=(libbpf1 libbpf-dev clang llvm make iproute2 nftables conntrack
              python3 python3-venv python3-pip ca-certificates ${EXTRA_APT_PACKAGES:-})
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
fi

# The newest Python >= 3.11 on PATH.
PYTHON=""
for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PYTHON=$(command -v "$candidate"); break
    fi
done
if [ -z "$PYTHON" ]; then
    echo "setup: Python >= 3.11 not found (found: $(python3 --version 2>&1))" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup: installing the project and its Python dependencies into .venv"
    log=.venv/pip-install.log
    # compat mode: the repository itself on sys.path, so new packages need no reinstall
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
         } >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: pip install failed (log above, also in $log)" >&2
        exit 1
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
fi
