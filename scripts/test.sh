#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: virtualenv, dependencies, lint, and
# pytest (which starts its own throwaway PostgreSQL cluster and broker processes).
# Extra arguments go to pytest, e.g. scripts/test.sh -k fork
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
