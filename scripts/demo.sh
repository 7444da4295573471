#!/usr/bin/env bash
# The main job: a broker and a demo fleet (preloaded gunicorn web app + a
# multiprocessing batch job) against a throwaway PostgreSQL, showing the budget hold.
# Extra arguments go to demo/run.py, e.g. scripts/demo.sh --budget 6 --seconds 20
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh demo
exec .venv/bin/python -m demo.run "$@"
