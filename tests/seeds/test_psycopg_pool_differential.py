"""Differential tests for the psycopg_pool drop-in: the same scenario against
psycopg_pool and poolbroker_client.compat.psycopg_pool, sync and async, compared
observation by observation. The drop-in runs against a real broker."""

import asyncio
import threading
import time

import psycopg
import psycopg2
import psycopg_pool
import pytest
from psycopg.rows import dict_row

from poolbroker_client.compat import psycopg_pool as compat

from helpers import count_backends, new_tag

pytestmark = pytest.mark.integration


def url(pg, tag):
    return f"postgresql://postgres@127.0.0.1:{pg.port}/postgres?application_name={tag}"


def make_table(pg):
    name = f"d_{new_tag().replace('-', '_')}"
    conn = psycopg2.connect(pg.dsn)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE TABLE {name} (v int)")
    conn.close()
    return name


def rows(pg, table):
    with psycopg.connect(url(pg, "pbt-rows")) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def kill_backend(pg, pid):
    with psycopg.connect(url(pg, "pbt-killer"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def error(exc):
    """What the caller sees of an error: its class name, and whether psycopg's
    ``except psycopg.OperationalError`` catches it."""
    return type(exc).__name__, isinstance(exc, psycopg.OperationalError)


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:
        return error(exc)


# ------------------------------------------------------------------ sync

def sync_scenario(mod, pg, **extra):
    obs = []
    table = make_table(pg)
    tag = new_tag()
    with mod.ConnectionPool(url(pg, tag), min_size=1, max_size=1, timeout=0.5,
                            kwargs={"row_factory": dict_row}, **extra) as pool:
        with pool.connection() as conn:
            obs.append(("psycopg 3 connection", isinstance(conn, psycopg.Connection)))
            obs.append(("row factory", conn.execute("SELECT 1 AS one").fetchone()))
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        obs.append(("committed on success", rows(pg, table)))

        def failing_block():
            with pool.connection() as conn:
                conn.execute(f"INSERT INTO {table} VALUES (2)")
                raise ValueError("application error")

        obs.append(("error in the block", outcome(failing_block)))
        obs.append(("rolled back on error", rows(pg, table)))

        held = pool.getconn()
        obs.append(("timeout at the local cap", outcome(lambda: pool.getconn(timeout=0.2))))
        stranger = psycopg.connect(url(pg, "pbt-stranger"))
        obs.append(("foreign connection", outcome(lambda: pool.putconn(stranger))))
        stranger.close()
        held.execute("SELECT 1")  # a transaction left open: rolled back on return
        pool.putconn(held)
        with pool.connection() as conn:
            obs.append(("returned in a transaction, rolled back",
                        conn.info.transaction_status.name))
        stats = pool.get_stats()
        obs.append(("stats", {k: stats[k] for k in (
            "pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting")}))
        obs.append(("stats keys", set(stats)))
    obs.append(("closed", pool.closed))
    obs.append(("getconn after close", outcome(pool.getconn)))
    obs.append(("reopen after close", outcome(pool.open)))
    obs.append(("server connections left", count_backends(url(pg, "x"), tag)))
    return obs


def compare(original, ours):
    original, ours = dict(original), dict(ours)
    # the drop-in has psycopg_pool's stats keys (with zeros too) plus the lease figures
    missing = original.pop("stats keys") - ours.pop("stats keys")
    assert not missing, f"stats keys missing from the drop-in: {missing}"
    assert ours == original


def test_connection_pool_differential(pg, broker):
    original = sync_scenario(psycopg_pool, pg)
    ours = sync_scenario(compat, pg, broker=broker.url)
    compare(original, ours)


def waiting_scenario(mod, pg, **extra):
    """max_waiting: one client waits, the next is refused at once."""
    obs = []
    with mod.ConnectionPool(url(pg, new_tag()), min_size=1, max_size=1, max_waiting=1,
                            timeout=5, **extra) as pool:
        held = pool.getconn()
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
        waiter.start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
        t0 = time.monotonic()
        obs.append(("one more than max_waiting", outcome(pool.getconn)))
        obs.append(("refused at once", time.monotonic() - t0 < 1.0))
        pool.putconn(held)
        waiter.join(5)
        obs.append(("the waiter got the connection", got == [held]))
        pool.putconn(got[0])
    return obs


def test_max_waiting_differential(pg, broker):
    assert waiting_scenario(compat, pg, broker=broker.url) == waiting_scenario(psycopg_pool, pg)


def check_scenario(mod, pg, **extra):
    """check=: a connection whose backend died is discarded, another is handed out."""
    obs = []
    with mod.ConnectionPool(url(pg, new_tag()), min_size=1, max_size=2, timeout=5,
                            check=mod.ConnectionPool.check_connection, **extra) as pool:
        pool.wait(5)
        conn = pool.getconn()
        pid = conn.info.backend_pid
        pool.putconn(conn)
        kill_backend(pg, pid)
        with pool.connection() as conn:
            obs.append(("a live connection", conn.execute("SELECT 1").fetchone()))
            obs.append(("not the dead one", conn.info.backend_pid != pid))
        obs.append(("counted as lost", pool.get_stats().get("connections_lost", 0)))
    return obs


def test_check_differential(pg, broker):
    assert check_scenario(compat, pg, broker=broker.url) == check_scenario(psycopg_pool, pg)


def null_scenario(mod, pg, **extra):
    obs = []
    tag = new_tag()
    with mod.NullConnectionPool(url(pg, tag), max_size=2, timeout=5, **extra) as pool:
        obs.append(("sizes", (pool.min_size, pool.max_size)))
        with pool.connection() as conn:
            obs.append(("works", conn.execute("SELECT 1").fetchone()))
        obs.append(("nothing kept", pool.get_stats()["pool_available"]))
        wait_until(lambda: count_backends(url(pg, "x"), tag) == 0)
        obs.append(("closed on return", count_backends(url(pg, "x"), tag)))
    obs.append(("min_size must be 0",
                outcome(lambda: mod.NullConnectionPool(url(pg, tag), min_size=1, open=False))))
    return obs


def test_null_pool_differential(pg, broker):
    assert null_scenario(compat, pg, broker=broker.url) == null_scenario(psycopg_pool, pg)


def test_quickstart_defaults_and_errors_match():
    for name in ("min_size", "max_size", "timeout", "max_waiting", "max_lifetime", "max_idle",
                 "reconnect_timeout", "num_workers", "close_returns"):
        a = psycopg_pool.ConnectionPool("", open=False)
        b = compat.ConnectionPool("", open=False, broker="ipc:///tmp/pbt-unused.sock")
        assert getattr(b, name) == getattr(a, name), name
    for name in ("PoolTimeout", "PoolClosed", "TooManyRequests"):
        assert issubclass(getattr(compat, name), psycopg.OperationalError)
    assert set(psycopg_pool.__all__) <= set(compat.__all__)


# ------------------------------------------------------------------ async

async def async_scenario(mod, pg, **extra):
    obs = []
    table = make_table(pg)
    tag = new_tag()
    async with mod.AsyncConnectionPool(url(pg, tag), min_size=1, max_size=1, timeout=0.5,
                                       kwargs={"row_factory": dict_row}, **extra) as pool:
        async with pool.connection() as conn:
            obs.append(("psycopg 3 async connection",
                        isinstance(conn, psycopg.AsyncConnection)))
            cur = await conn.execute("SELECT 1 AS one")
            obs.append(("row factory", await cur.fetchone()))
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        obs.append(("committed on success", rows(pg, table)))

        async def failing_block():
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
                raise ValueError("application error")

        try:
            await failing_block()
        except Exception as exc:
            obs.append(("error in the block", error(exc)))
        obs.append(("rolled back on error", rows(pg, table)))

        held = await pool.getconn()
        # the event loop keeps running while a client waits
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        try:
            await pool.getconn(timeout=0.3)
        except Exception as exc:
            obs.append(("timeout at the local cap", error(exc)))
        tick_task.cancel()
        obs.append(("the loop ran while waiting", ticks >= 10))
        await held.execute("SELECT 1")
        await pool.putconn(held)
        async with pool.connection() as conn:
            obs.append(("returned in a transaction, rolled back",
                        conn.info.transaction_status.name))
        stats = pool.get_stats()
        obs.append(("stats", {k: stats[k] for k in (
            "pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting")}))
        obs.append(("stats keys", set(stats)))
    obs.append(("closed", pool.closed))
    try:
        await pool.getconn()
    except Exception as exc:
        obs.append(("getconn after close", error(exc)))
    obs.append(("server connections left", count_backends(url(pg, "x"), tag)))
    return obs


def test_async_connection_pool_differential(pg, broker):
    original = asyncio.run(async_scenario(psycopg_pool, pg))
    ours = asyncio.run(async_scenario(compat, pg, broker=broker.url))
    compare(original, ours)


async def async_waiting_scenario(mod, pg, **extra):
    obs = []
    async with mod.AsyncConnectionPool(url(pg, new_tag()), min_size=1, max_size=1,
                                       max_waiting=1, timeout=5, **extra) as pool:
        held = await pool.getconn()
        waiter = asyncio.ensure_future(pool.getconn())
        while pool.get_stats()["requests_waiting"] < 1:
            await asyncio.sleep(0.01)
        try:
            await pool.getconn()
        except Exception as exc:
            obs.append(("one more than max_waiting", error(exc)))
        await pool.putconn(held)
        got = await asyncio.wait_for(waiter, 5)
        obs.append(("the waiter got the connection", got is held))
        await pool.putconn(got)
        # a cancelled waiter loses nothing: the connection stays in the pool
        held = await pool.getconn()
        waiter = asyncio.ensure_future(pool.getconn())
        while pool.get_stats()["requests_waiting"] < 1:
            await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await pool.putconn(held)
        async with pool.connection(timeout=2) as conn:
            obs.append(("usable after a cancelled waiter", conn is held))
    return obs


def test_async_max_waiting_and_cancel_differential(pg, broker):
    original = asyncio.run(async_waiting_scenario(psycopg_pool, pg))
    ours = asyncio.run(async_waiting_scenario(compat, pg, broker=broker.url))
    assert ours == original


async def async_check_scenario(mod, pg, **extra):
    obs = []
    async with mod.AsyncConnectionPool(
            url(pg, new_tag()), min_size=1, max_size=2, timeout=5,
            check=mod.AsyncConnectionPool.check_connection, **extra) as pool:
        await pool.wait(5)
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        await pool.putconn(conn)
        kill_backend(pg, pid)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            obs.append(("a live connection", await cur.fetchone()))
            obs.append(("not the dead one", conn.info.backend_pid != pid))
        obs.append(("counted as lost", pool.get_stats().get("connections_lost", 0)))
    return obs


def test_async_check_differential(pg, broker):
    original = asyncio.run(async_check_scenario(psycopg_pool, pg))
    ours = asyncio.run(async_check_scenario(compat, pg, broker=broker.url))
    assert ours == original


async def async_null_scenario(mod, pg, **extra):
    obs = []
    tag = new_tag()
    async with mod.AsyncNullConnectionPool(url(pg, tag), max_size=2, timeout=5,
                                           **extra) as pool:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            obs.append(("works", await cur.fetchone()))
        obs.append(("nothing kept", pool.get_stats()["pool_available"]))
        deadline = time.monotonic() + 5
        while count_backends(url(pg, "x"), tag) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        obs.append(("closed on return", count_backends(url(pg, "x"), tag)))
    return obs


def test_async_null_pool_differential(pg, broker):
    original = asyncio.run(async_null_scenario(psycopg_pool, pg))
    ours = asyncio.run(async_null_scenario(compat, pg, broker=broker.url))
    assert ours == original
