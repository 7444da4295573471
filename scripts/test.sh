#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: virtualenv, dependencies, lint, type
# check, pytest (which starts its own throwaway PostgreSQL cluster and broker
# processes), then the unit and property tests again on the oldest and the newest
# supported Python. Extra arguments go to the main pytest run, e.g.
# scripts/test.sh -k fork
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/mypy || exit 1

pytest_ok() {  # pytest's exit code 5 (nothing collected) is a failure here
    local rc=$1
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: that is a failure here" >&2
        return 1
    fi
    return "$rc"
}

.venv/bin/python -m pytest "$@"
pytest_ok $? || exit 1

find_python() {  # the newest installed CPython X.Y: under pyenv, else on PATH
    # pyenv's shims are on PATH for every version but run only the selected
    # ones, so a candidate counts only if it actually starts.
    local want=$1 found="" cand
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".*/bin/python; do
        [ -x "$cand" ] && "$cand" --version >/dev/null 2>&1 && found=$cand
    done
    if [ -z "$found" ] && cand=$(command -v "python$want") \
        && "$cand" --version >/dev/null 2>&1; then
        found=$cand
    fi
    [ -n "$found" ] && echo "$found"
}

for version in 3.9 3.13; do
    python=$(find_python "$version") || {
        echo "Python $version not found: the unit and property tests must run on it" >&2
        exit 1
    }
    echo "== unit and property tests on $("$python" --version)"
    PYTHON=$python VENV=".venv-$version" scripts/setup-venv.sh test || exit 1
    ".venv-$version/bin/python" -m pytest -q -p no:cacheprovider tests/unit
    pytest_ok $? || exit 1
done
