"""Pools pickle as their configuration: the original where it exists, one rebuilt
pool per process elsewhere (a spawned child is played here by forgetting the
original)."""

import pickle

import pytest

from poolbroker_client import ConnectionPool, pickling
from poolbroker_client.compat import psycopg2 as compat_psycopg2
from poolbroker_client.compat import psycopg2_pool as compat_psycopg2_pool

URL = "ipc:///tmp/pb-nobody-listens.sock"


def _psycopg_pool():
    psycopg_pool = pytest.importorskip("poolbroker_client.compat.psycopg_pool")
    return psycopg_pool.ConnectionPool("dbname=app", broker=URL, open=False, min_size=0,
                                       max_size=2)


MAKERS = {
    "ConnectionPool": lambda: ConnectionPool("dbname=app", broker=URL, pool="web",
                                             max_size=3, timeout=7),
    "compat.psycopg2": lambda: compat_psycopg2.ThreadedConnectionPool(0, 2, "dbname=app",
                                                                       broker=URL),
    "compat.psycopg2_pool": lambda: compat_psycopg2_pool.ConnectionPool(
        0, 2, dsn="dbname=app", broker=URL),
    "compat.psycopg_pool": _psycopg_pool,
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_a_pool_pickles_as_its_configuration(kind):
    original = MAKERS[kind]()
    assert pickle.loads(pickle.dumps(original)) is original  # where it lives: itself
    frame = pickle.dumps(original)
    token = original._configuration[0]
    del pickling._pools[token]  # as in a spawned child, which never had it
    rebuilt = pickle.loads(frame)
    assert rebuilt is not original and type(rebuilt) is type(original)
    assert rebuilt._configuration[1:] == original._configuration[1:]
    assert pickle.loads(frame) is rebuilt  # once per process
    for pool in (original, rebuilt):
        if kind == "compat.psycopg2":
            pool.closeall()
        else:
            pool.close()


def test_the_rebuilt_pool_has_the_same_settings():
    original = ConnectionPool("dbname=app", broker=URL, pool="web", max_size=3, timeout=7)
    frame = pickle.dumps(original)
    del pickling._pools[original._configuration[0]]
    rebuilt = pickle.loads(frame)
    assert (rebuilt.max_size, rebuilt.timeout) == (3, 7)
    original.close()
    rebuilt.close()
