#!/usr/bin/env bash
# Set up this machine (scripts/setup.sh) and run the whole test suite: unit tests,
# privileged datapath tests with real network namespaces and packets, and static checks.
# Extra arguments go to pytest, e.g. scripts/test.sh -k tc -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== ruff";  .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy";  .venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": a suite that runs nothing must not pass silently.
    echo "test: pytest collected no tests (check the path or -k expression)" >&2
    exit 1
fi
exit "$rc"
