"""ConnectionPool behaviour, psycopg_pool-style, against a real broker and server."""

import threading
import time

import psycopg2
import pytest

from poolbroker_client import ConnectionPool, PoolClosed, PoolError, PoolTimeout

from helpers import Sampler, Worker, count_backends, new_tag, tagged

pytestmark = pytest.mark.integration

PSYCOPG_POOL_KEYS = {"pool_min", "pool_max", "pool_size", "pool_available",
                     "requests_waiting", "requests_num", "requests_queued",
                     "requests_wait_ms", "requests_errors", "returns_bad",
                     "connections_num", "connections_ms", "connections_errors"}


@pytest.fixture
def table(pg):
    name = f"t_{new_tag().replace('-', '_')}"
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (v int)")
    conn.close()
    return name


def _count(pg, table):
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        n = cur.fetchone()[0]
    conn.close()
    return n


def test_connection_context_commits_or_rolls_back(pg, broker, table):
    with ConnectionPool(pg.dsn, broker=broker.url) as pool:
        with pool.connection() as conn:
            conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(RuntimeError, match="application failure"):
            with pool.connection() as conn:
                conn.cursor().execute(f"INSERT INTO {table} VALUES (2)")
                raise RuntimeError("application failure")
        assert pool.get_stats()["pool_available"] == 1  # back in the pool both times
    assert _count(pg, table) == 1


def test_connection_returned_in_transaction_is_rolled_back(pg, broker, table):
    with ConnectionPool(pg.dsn, broker=broker.url, max_size=1) as pool:
        conn = pool.getconn()
        conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        pool.putconn(conn)  # no commit
        conn2 = pool.getconn()
        assert conn2 is conn
        assert conn2.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        pool.putconn(conn2)
    assert _count(pg, table) == 0


def test_connection_in_error_is_rolled_back_and_reused(pg, broker):
    with ConnectionPool(pg.dsn, broker=broker.url, max_size=1) as pool:
        conn = pool.getconn()
        with pytest.raises(psycopg2.Error):
            conn.cursor().execute("SELECT nonsense_column")
        pool.putconn(conn)
        with pool.connection() as conn2:
            assert conn2 is conn
            conn2.cursor().execute("SELECT 1")


def test_configure_and_reset_callbacks(pg, broker):
    seen = {"configure": 0, "reset": 0}

    def configure(conn):
        seen["configure"] += 1
        conn.autocommit = True
        conn.cursor().execute("SET application_name = 'configured'")

    def reset(conn):
        seen["reset"] += 1

    with ConnectionPool(pg.dsn, broker=broker.url, configure=configure, reset=reset) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute("SHOW application_name")
                assert cur.fetchone()[0] == "configured"
    assert seen == {"configure": 1, "reset": 3}


def test_putconn_of_a_foreign_connection_is_refused(pg, broker):
    with ConnectionPool(pg.dsn, broker=broker.url) as pool:
        stranger = psycopg2.connect(pg.dsn)
        with pytest.raises(PoolError, match="doesn't come from it"):
            pool.putconn(stranger)
        stranger.close()
        conn = pool.getconn()
        pool.putconn(conn)
        with pytest.raises(PoolError, match="returned twice"):
            pool.putconn(conn)


def test_closed_pool_refuses_and_wakes_waiters(pg, broker_factory):
    broker = broker_factory({"default": 1})
    pool = ConnectionPool(pg.dsn, broker=broker.url, timeout=30)
    held = pool.getconn()
    errors = []

    def wait():
        try:
            pool.getconn()
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    deadline = time.monotonic() + 5
    while pool.get_stats()["requests_waiting"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.close()
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
    assert pool.closed
    with pytest.raises(PoolClosed):
        pool.getconn()
    pool.putconn(held)  # handed back after close: closed and released
    assert broker.wait_leased(0, 2) == 0


def test_after_close_the_leases_are_back_however_the_process_ends(pg, broker_factory):
    """close() returns once the broker has confirmed its releases (they would
    otherwise ride on a next message): a process that ends right after without
    atexit (os._exit, as Celery's children do) holds nothing until the TTL."""
    broker = broker_factory({"default": 4}, ttl=30.0)
    tag = new_tag()
    result = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                         threads=2, iterations=5, sleep=0.0, hard_exit=True)).result()
    assert result["ok"] == 10 and result["stats"]["pool_size"] >= 1, result
    assert broker.leased() == 0, broker.status()
    assert count_backends(pg.dsn, tag) == 0


def test_local_max_size_caps_this_process(pg, broker_factory):
    broker = broker_factory({"default": 10})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        result = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                             max_size=2, threads=6, iterations=10, sleep=0.01)).result()
    assert result["ok"] == 60
    assert sampler.max[tag] <= 2 and result["stats"]["pool_max"] == 2


def test_min_size_kept_warm_and_max_idle_gives_leases_back(pg, broker_factory):
    broker = broker_factory({"default": 6})
    tag = new_tag()
    with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, min_size=2,
                        max_idle=0.5) as pool:
        pool.wait(10)
        assert pool.get_stats()["pool_size"] == 2
        assert broker.leased() == 2 and count_backends(pg.dsn, tag) == 2
        conns = [pool.getconn() for _ in range(5)]
        for conn in conns:
            pool.putconn(conn)
        assert broker.leased() == 5
        # idle above min_size closes after max_idle; the leases go back
        assert broker.wait_leased(2, 10) == 2
        assert count_backends(pg.dsn, tag) == 2
    assert broker.wait_leased(0, 2) == 0


def test_get_stats_has_psycopg_pool_keys_and_lease_figures(pg, broker):
    with ConnectionPool(pg.dsn, broker=broker.url, min_size=0, max_size=4) as pool:
        with pool.connection():
            stats = pool.get_stats()
    assert PSYCOPG_POOL_KEYS <= set(stats)
    assert stats["leases_held"] == 1 and stats["pool_size"] == 1
    assert stats["pool_available"] == 0 and stats["requests_num"] == 1
    assert "ConnectionPool" in repr(pool) and "closed" in repr(pool)


def test_idle_leases_elsewhere_are_recalled_for_a_waiter(pg, broker_factory):
    broker = broker_factory({"default": 2})
    tag = new_tag()
    holder = Worker(dict(mode="idle", n=2, dsn=tagged(pg.dsn, tag), broker=broker.url))
    holder.wait_line("IDLE")
    assert broker.leased() == 2
    with Sampler(pg.dsn, [tag]) as sampler:
        with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=3) as pool:
            # the holder's connections are idle: one is closed and its lease handed on
            with pool.connection() as conn:
                conn.cursor().execute("SELECT 1")
    assert sampler.max[tag] <= 2
    holder.finish()
    stats = holder.result()
    assert stats["leases_recalled"] >= 1


def test_fair_share_a_busy_process_does_not_starve_a_light_one(pg, broker_factory):
    """One process keeps 8 threads hammering a budget of 3; another asks now and
    then with a short timeout. Pure FIFO would starve it: the busy process hands
    returned connections straight to its own waiting threads."""
    broker = broker_factory({"default": 3})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        hog = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                          threads=8, iterations=60, sleep=0.02, timeout=60))
        # the light process arrives once the hog has filled the budget
        assert broker.wait_leased(3, 10) == 3
        light = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                            threads=1, iterations=15, sleep=0.005, timeout=2)).result()
        hog_result = hog.result()
    assert light["timeouts"] == 0 and light["ok"] == 15, light
    assert hog_result["ok"] == 480 and hog_result["timeouts"] == 0
    assert sampler.max[tag] <= 3


def test_more_processes_than_slots_take_turns(pg, broker_factory):
    """Two processes loop over transactions on a budget of 2, each holding its one
    lease all the time; two more arrive. Nobody is over its share (0.5 each), so
    only taking turns gets the latecomers a slot before their 3 s timeout, while
    the first two still run (about 8 s of work each)."""
    broker = broker_factory({"default": 2})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        hogs = [Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                            threads=1, iterations=400, sleep=0.02, timeout=60))
                for _ in range(2)]
        assert broker.wait_leased(2, 10) == 2
        late = [Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                            threads=1, iterations=20, sleep=0.005, timeout=3))
                for _ in range(2)]
        late_results = [w.result() for w in late]
        still_at_work = broker.status()["pools"]["default"]["clients"]
        hog_results = [w.result() for w in hogs]
    for result in late_results:
        assert result["ok"] == 20 and result["timeouts"] == 0, result
    assert still_at_work == 2  # the hogs were busy all along
    for result in hog_results:
        assert result["ok"] == 400 and result["timeouts"] == 0, result
    assert sampler.max[tag] <= 2


def test_pool_timeout_is_a_psycopg2_pool_error(pg, broker):
    import psycopg2.pool

    assert issubclass(PoolTimeout, psycopg2.pool.PoolError)
    assert issubclass(PoolClosed, psycopg2.pool.PoolError)


def test_pool_dropped_without_close_keeps_broker_and_server_in_agreement(pg, broker):
    """An open pool is not garbage-collected behind our back (its connections
    would be closed by the GC with their leases still counted)."""
    import gc

    tag = new_tag()
    pool = ConnectionPool(tagged(pg.dsn, tag), broker=broker.url)
    pool.putconn(pool.getconn())
    del pool
    gc.collect()
    assert broker.leased() == count_backends(pg.dsn, tag) == 1


@pytest.mark.parametrize("pause", [0.0, 0.08])
def test_an_idle_connection_goes_back_only_when_its_next_use_is_further_off_than_a_move(
        pg, broker_factory, pause):
    """A busy process keeps requests waiting on a budget of 2; a light one runs 25
    transactions on one thread. Back to back (no pause), its connection is reused
    at once: it keeps it. With 80 ms pauses, longer than giving the slot back and
    getting one again costs here (a few ms to a few tens), it gives the connection
    back as soon as it is idle, so the busy process can use the slot meanwhile
    (before, it kept it 100 ms, longer than the pause, and gave nothing back)."""
    broker = broker_factory({"default": 2})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        hog = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                          # busy all along the light one's run (about 3 s with pauses)
                          threads=6, seconds=8 if pause else 3, sleep=0.002, timeout=30))
        assert broker.wait_leased(2, 10) == 2
        light = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                            threads=1, iterations=25, sleep=0.002, pause=pause,
                            timeout=10)).result()
        hog_result = hog.result()
    assert hog_result["errors"] == 0 and hog_result["timeouts"] == 0, hog_result
    assert light["ok"] == 25 and light["timeouts"] == 0, light
    yielded = light["stats"]["leases_yielded"]
    if pause:
        assert yielded >= 15, light["stats"]  # nearly every pause, once it has learnt
    else:
        assert yielded == 0, light["stats"]
    assert sampler.max[tag] <= 2
