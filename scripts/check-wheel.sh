#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtualenv outside the source tree, and
# check that both packages import from it and the console script serves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test >/dev/null
rm -rf dist
.venv/bin/python -m build --wheel --outdir dist . >/dev/null
wheel=$(ls dist/poolbroker-*.whl)
echo "built $wheel"
if unzip -l "$wheel" | grep -qE " (tests|demo|devtools|client)/"; then
    echo "the wheel contains files that are not part of the packages:" >&2
    unzip -l "$wheel" >&2
    exit 1
fi
tmp=$(mktemp -d /tmp/pb-wheel-XXXX)
trap 'kill "${broker:-0}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
# with the psycopg extra (psycopg 3, for the psycopg_pool drop-in)
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel[psycopg]"
cd "$tmp"  # nothing from the source tree on sys.path
"$tmp/venv/bin/python" - <<'PY'
import sys
import poolbroker, poolbroker_client, poolbroker_client.compat
from poolbroker_client import ConnectionPool, PoolError, PoolTimeout, PoolClosed
import psycopg2.pool
assert "psycopg" not in sys.modules, "importing poolbroker_client must not need psycopg 3"
import poolbroker_client.compat.psycopg2, poolbroker_client.compat.psycopg2_pool
from poolbroker_client.compat import psycopg_pool
import psycopg
for mod in (poolbroker, poolbroker_client, psycopg_pool):
    assert "site-packages" in mod.__file__, mod.__file__
assert issubclass(PoolTimeout, psycopg2.pool.PoolError)
assert issubclass(psycopg_pool.PoolTimeout, psycopg.OperationalError)
print("imports from the wheel:", poolbroker.__file__, poolbroker_client.__file__,
      psycopg_pool.__file__)
PY
url="ipc://$tmp/b.sock"
"$tmp/venv/bin/poolbroker" serve --bind "$url" --pool default=2 2>"$tmp/broker.log" &
broker=$!
for _ in $(seq 1 100); do
    if "$tmp/venv/bin/poolbroker" status --broker "$url" --json --timeout 0.2 >"$tmp/status.json" 2>/dev/null; then
        break
    fi
done
"$tmp/venv/bin/python" -c "
import json, sys
status = json.load(open('$tmp/status.json'))
pool = status['pools']['default']
assert (pool['max'], pool['leased'], pool['waiting']) == (2, 0, 0), status
print('wheel console script serves:', status['pools'])
"
kill "$broker"
wait "$broker" || true
grep -q "poolbroker stopped" "$tmp/broker.log"
echo "wheel OK"
