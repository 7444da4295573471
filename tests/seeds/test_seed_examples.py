"""Every example from the seeds runs unchanged but for its import line, against a
broker whose budget is smaller than what the example asks for, and prints what
the original prints. The originals run too, in the same test, against the same
freshly cloned database.

The examples live in tests/seeds/examples/ exactly as documented (their import
lines name the original library); only their indentation was restored, since the
seed text is flattened.
"""

import os
import re
import subprocess
import sys

import psycopg2
import pytest

from helpers import Sampler, new_tag

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "examples")

P2 = ("from psycopg2.pool import", "from poolbroker_client.compat.psycopg2 import")
P2POOL = ("from psycopg2_pool import", "from poolbroker_client.compat.psycopg2_pool import")
PSYCOPG_POOL = ("from psycopg_pool import", "from poolbroker_client.compat.psycopg_pool import")

# example -> (import swap, budget, what the example asks for at most, how to compare)
CASES = {
    "p2_simple": (P2, 2, 5, "same"),
    "p2_threaded": (P2, 3, 10, "same messages, any order"),  # threads print in any order
    "p2_managed": (P2, 2, 8, "same"),
    "p2_monitored": (P2, 3, 6, "same"),
    "p2_resilient": (P2, 2, 5, "same"),
    "p2pool_quickstart": (P2POOL, 2, 10, "same, plus close()"),
    "psycopg_pool_quickstart": (PSYCOPG_POOL, 2, 5, "same"),
}

SCHEMA = """
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE logs (id serial PRIMARY KEY, message text, level text);
CREATE TABLE profiles (user_id int, bio text);
INSERT INTO users (name) VALUES ('Ada'), ('Grace'), ('Linus');
"""


# Runs an example and reports on stderr which drivers opened its connections.
DRIVER_PROBE = """
import runpy, sys, psycopg, psycopg2
opened = set()
connect3, connect2 = psycopg.Connection.connect, psycopg2.connect
def probe3(cls, *args, **kwargs):
    opened.add("psycopg")
    return connect3.__func__(cls, *args, **kwargs)
def probe2(*args, **kwargs):
    opened.add("psycopg2")
    return connect2(*args, **kwargs)
psycopg.Connection.connect = classmethod(probe3)
psycopg2.connect = probe2
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
finally:
    print("DRIVERS", ",".join(sorted(opened)), file=sys.stderr)
"""


def _drivers(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("DRIVERS ")]
    assert lines, stderr[-3000:]
    return lines[-1][len("DRIVERS "):]


_MESSAGE = re.compile(r"Worker \d+ (?:got connection|completed: \d+|returned connection)"
                      r"|All workers completed")


def _messages(out):
    """Threads printing at once may run two messages into one line: compare the
    messages, and check nothing else was printed."""
    found = _MESSAGE.findall(out)
    assert _MESSAGE.sub("", out).strip() == "", out
    return sorted(found)


def _admin(dsn, sql, dbname="postgres"):
    conn = psycopg2.connect(dsn.replace("dbname=postgres", f"dbname={dbname}"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@pytest.fixture(scope="module")
def seed_db(pg):
    """The database the examples expect: mydb, owned by myuser (password mypass),
    cloned from a template before every run so that each run sees the same data."""
    _admin(pg.dsn, "DROP ROLE IF EXISTS myuser")
    _admin(pg.dsn, "CREATE ROLE myuser LOGIN PASSWORD 'mypass'")
    _admin(pg.dsn, "CREATE DATABASE mydb_template OWNER myuser")
    _admin(pg.dsn.replace("user=postgres", "user=myuser"), SCHEMA, "mydb_template")
    yield pg


def _fresh_db(pg):
    _admin(pg.dsn, "DROP DATABASE IF EXISTS mydb WITH (FORCE)")
    _admin(pg.dsn, "CREATE DATABASE mydb TEMPLATE mydb_template OWNER myuser")


def _run(pg, source, tag, extra_env, tmp_path, name, probe=False):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    env = {**os.environ, "PGPORT": str(pg.port), "PGAPPNAME": tag,
           "DB_HOST": "localhost", "DB_NAME": "mydb", "DB_USER": "myuser",
           "DB_PASSWORD": "mypass",
           "DATABASE_URL": f"postgresql://myuser:mypass@localhost:{pg.port}/mydb",
           **extra_env}
    _fresh_db(pg)
    with Sampler(pg.dsn, [tag]) as sampler:
        argv = [sys.executable] + (["-c", DRIVER_PROBE] if probe else []) + [str(path)]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    return proc, sampler.max[tag]


@pytest.mark.parametrize("example", sorted(CASES))
def test_seed_example_runs_unchanged_but_for_the_import(seed_db, broker_factory, tmp_path,
                                                        example):
    (old, new), budget, asks, compare = CASES[example]
    assert budget < asks, "the budget must be smaller than what the example asks for"
    with open(os.path.join(EXAMPLES, f"{example}.py")) as fh:
        original = fh.read()
    assert original.count(old) == 1
    dropin = original.replace(old, new)
    changed = [(a, b) for a, b in zip(original.splitlines(), dropin.splitlines()) if a != b]
    assert len(changed) == 1, "only the import line may differ"

    orig, orig_max = _run(seed_db, original, new_tag(), {}, tmp_path, "original")
    broker = broker_factory({"default": budget})
    ours, our_max = _run(seed_db, dropin, new_tag(), {"POOLBROKER_URL": broker.url},
                         tmp_path, "dropin", probe=True)

    assert ours.returncode == 0, ours.stderr[-3000:]
    # the drop-in hands out the original's driver's connections
    assert _drivers(ours.stderr) == ("psycopg" if old == PSYCOPG_POOL[0] else "psycopg2")
    assert ours.stdout.strip(), "the example must print something"
    assert our_max <= budget, f"server saw {our_max} connections, budget {budget}"
    if compare == "same":
        assert orig.returncode == 0, orig.stderr[-3000:]
        assert ours.stdout == orig.stdout
    elif compare == "same messages, any order":
        assert orig.returncode == 0, orig.stderr[-3000:]
        assert _messages(ours.stdout) == _messages(orig.stdout)
        assert orig_max > budget, "the original should have needed more than the budget"
    else:  # psycopg2-pool lacks the close() its documentation calls: it crashes there
        assert orig.returncode != 0 and "has no attribute 'close'" in orig.stderr
        assert ours.stdout == orig.stdout + "Connection pool closed.\n"
    assert broker.wait_leased(0, 2) == 0, "the example left leases behind"
