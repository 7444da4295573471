"""The lease a pool asks for ahead of need (``lease_ahead=True``): a burst of
callers finding no idle connection waits for the broker once, not once each; the
spare slot stays inside the budget and goes back as soon as someone else needs
it, or when the pool closes. Off by default; ConnectionPool and the psycopg 3
drop-ins take it. Real broker, real server, real worker processes."""

import time

import pytest

from poolbroker_client import ConnectionPool, core

from helpers import Sampler, Worker, new_tag, tagged

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.parametrize("ahead", [True, False], ids=["lease_ahead", "default"])
def test_a_burst_of_cold_getconns_waits_for_the_broker_about_once(pg, broker_factory, ahead):
    """max_lifetime 0: every connection is discarded when it comes back, so each
    getconn finds the pool empty. Only the first waits for a lease; the others
    take the one asked for while the previous caller connected. (A budget with
    room for the connections still closing: their slots are taken until the
    server sees them go, and an ask ahead finding no room is refused.)"""
    broker = broker_factory({"default": 6})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        pool = ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, max_lifetime=0.0,
                              lease_ahead=ahead)
        try:
            for _ in range(20):
                conn = pool.getconn()
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                pool.putconn(conn)
            stats = pool.get_stats()
        finally:
            pool.close()
    assert stats["connections_num"] == 20, stats
    if ahead:
        # waited for the broker: the first, and any caller who came before the
        # answer to the ask ahead (a slow spell of the machine)
        assert stats["requests_queued"] <= 4 and stats["leases_ahead"] >= 16, stats
    else:
        assert stats["requests_queued"] == 20 and stats["leases_ahead"] == 0, stats
    # (a discarded connection may still be closing while the next one opens)
    assert sampler.max[tag] <= 6
    assert broker.wait_leased(0, 5) == 0, "close gave the spare lease back"


def test_a_spare_lease_goes_back_at_once_when_another_process_waits(
        pg, broker_factory, monkeypatch):
    """A budget of 3: this process holds one connection and the spare lease (the
    broker grants a spare only while another slot stays free). A worker process
    whose two threads each want a connection at once takes the free slot, and
    its second thread is served well before the spare would expire (kept 10 s
    here): the spare went back. The server never sees more than 3."""
    monkeypatch.setattr(core, "AHEAD_HOLD", 60.0)
    broker = broker_factory({"default": 3}, ttl=60.0)  # a heartbeat of 20 s: hold 10 s
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        pool = ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, lease_ahead=True)
        try:
            conn = pool.getconn()
            assert wait_until(lambda: pool.get_stats()["leases_held"] == 2, 5), \
                pool.get_stats()
            assert broker.wait_leased(2, 5) == 2
            other = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                                threads=2, iterations=1, sleep=0.5, timeout=5)).result()
            assert other["ok"] == 2 and other["timeouts"] == 0, other
            assert pool.get_stats()["leases_held"] == 1, "the spare went back"
            pool.putconn(conn)
        finally:
            pool.close()
    assert sampler.max[tag] <= 3
    assert broker.wait_leased(0, 5) == 0


def test_no_spare_is_granted_from_the_last_free_slot(pg, broker_factory):
    """A budget of 2: after this process's first connection only one slot is
    free, and a lease asked ahead of need never takes the last one (another
    process may be about to ask for it): the broker refuses it at once."""
    broker = broker_factory({"default": 2})
    tag = new_tag()
    pool = ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, lease_ahead=True)
    try:
        conn = pool.getconn()
        assert wait_until(lambda: pool.get_stats()["leases_requested"] == 0, 5), \
            pool.get_stats()
        stats = pool.get_stats()
        assert stats["leases_held"] == 1 and broker.leased() == 1, (stats, broker.status())
        pool.putconn(conn)
    finally:
        pool.close()
    assert broker.wait_leased(0, 5) == 0


def test_no_lease_is_asked_ahead_while_others_wait_in_the_pool(pg, broker_factory):
    """A busy worker keeps requests waiting on a budget of 2: a pool here that
    has to wait for its lease asks for no second one (it would be refused, and
    a spare would go straight back)."""
    broker = broker_factory({"default": 2})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        hog = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                          threads=4, seconds=3, sleep=0.005, timeout=30))
        assert broker.wait_leased(2, 10) == 2
        assert broker.wait_for(lambda s: s["pools"]["default"]["contended"], 5)[
            "pools"]["default"]["contended"]
        pool = ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, max_lifetime=0.0,
                              lease_ahead=True)
        try:
            for _ in range(5):
                with pool.connection(timeout=20):
                    pass
            stats = pool.get_stats()
        finally:
            pool.close()
        hog_result = hog.result()
    assert hog_result["errors"] == 0 and hog_result["timeouts"] == 0, hog_result
    assert stats["leases_ahead"] == 0 and stats["requests_queued"] == 5, stats
    assert sampler.max[tag] <= 2


def test_the_psycopg_pool_drop_ins_ask_ahead_when_told(pg, broker_factory):
    """``lease_ahead=True`` on the psycopg 3 drop-ins (sync and async): a burst of
    cold getconns takes the spare lease as ConnectionPool's does; by default
    nothing is asked ahead."""
    import asyncio

    from poolbroker_client.compat import psycopg_pool as compat

    broker = broker_factory({"default": 6})
    tag = new_tag()
    dsn = tagged(pg.dsn, tag)

    def burst(ahead):
        with compat.ConnectionPool(dsn, broker=broker.url, min_size=0, max_size=6,
                                   max_lifetime=0.0, lease_ahead=ahead) as pool:
            for _ in range(10):
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            return pool.get_stats()

    async def aburst():
        async with compat.AsyncConnectionPool(dsn, broker=broker.url, min_size=0, max_size=6,
                                              max_lifetime=0.0, lease_ahead=True) as pool:
            for _ in range(10):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            return pool.get_stats()

    with Sampler(pg.dsn, [tag]) as sampler:
        ahead, default, async_ahead = burst(True), burst(False), asyncio.run(aburst())
    assert ahead.get("leases_ahead", 0) >= 5, ahead
    assert default.get("leases_ahead", 0) == 0, default
    assert async_ahead.get("leases_ahead", 0) >= 5, async_ahead
    assert sampler.max[tag] <= 6
    assert broker.wait_leased(0, 5) == 0
