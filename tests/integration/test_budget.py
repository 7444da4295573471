"""The budget holds across real processes, as pg_stat_activity sees it."""

import time

import pytest

from poolbroker_client import ConnectionPool, PoolTimeout

from helpers import Sampler, Worker, new_tag, tagged

pytestmark = pytest.mark.integration


def test_fleet_of_processes_and_threads_never_exceeds_budget(pg, broker_factory):
    """6 processes x 4 threads under a budget of 6, sampled every 10 ms."""
    broker = broker_factory({"default": 6})
    tag = new_tag()
    cfg = dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url, threads=4,
               iterations=15, sleep=0.01, timeout=30)
    with Sampler(pg.dsn, [tag], interval=0.01) as sampler:
        workers = [Worker(cfg) for _ in range(6)]
        results = [w.result() for w in workers]
    assert sampler.samples > 20, "the sampler must have actually watched the run"
    assert sampler.max[tag] <= 6, f"server saw {sampler.max[tag]} connections, budget 6"
    assert sampler.max[tag] >= 4, "the fleet should have used most of the budget"
    total = sum(r["ok"] for r in results)
    assert total == 6 * 4 * 15, results
    assert all(r["timeouts"] == 0 and r["errors"] == 0 for r in results), results
    # a clean exit gives every lease back at once, not after the TTL
    assert broker.wait_leased(0, 0.5) == 0
    assert broker.status()["clients"] == []


def test_asyncio_fleet_never_exceeds_budget(pg, broker_factory):
    """4 processes x 12 asyncio tasks on the psycopg_pool drop-in's
    AsyncConnectionPool (each process allowed 10 connections) under a budget of 5."""
    broker = broker_factory({"default": 5})
    tag = new_tag()
    cfg = dict(mode="aload", dsn=tagged(pg.dsn, tag), broker=broker.url, tasks=12,
               iterations=10, sleep=0.01, timeout=30, max_size=10)
    with Sampler(pg.dsn, [tag], interval=0.01) as sampler:
        workers = [Worker(cfg) for _ in range(4)]
        results = [w.result() for w in workers]
    assert sampler.samples > 20, "the sampler must have actually watched the run"
    assert sampler.max[tag] <= 5, f"server saw {sampler.max[tag]} connections, budget 5"
    assert sampler.max[tag] >= 3, "the fleet should have used most of the budget"
    assert sum(r["ok"] for r in results) == 4 * 12 * 10, results
    assert all(r["timeouts"] == 0 and r["errors"] == 0 for r in results), results
    assert broker.wait_leased(0, 0.5) == 0


def test_two_pools_have_separate_budgets(pg, broker_factory):
    broker = broker_factory({"reports": 2, "web": 3})
    tag_r, tag_w = new_tag(), new_tag()
    base = dict(mode="load", broker=broker.url, threads=4, iterations=8, sleep=0.03)
    with Sampler(pg.dsn, [tag_r, tag_w]) as sampler:
        workers = [Worker({**base, "dsn": tagged(pg.dsn, tag_r), "pool": "reports"})
                   for _ in range(2)]
        workers += [Worker({**base, "dsn": tagged(pg.dsn, tag_w), "pool": "web"})
                    for _ in range(2)]
        results = [w.result() for w in workers]
    assert all(r["ok"] == 32 for r in results), results
    assert sampler.max[tag_r] <= 2 and sampler.max[tag_w] <= 3, sampler.max
    # each pool filled its own budget: neither borrowed from nor starved the other
    assert sampler.max[tag_r] == 2 and sampler.max[tag_w] == 3, sampler.max


def test_pool_timeout_after_callers_timeout_when_budget_full(pg, broker_factory):
    broker = broker_factory({"default": 2})
    tag = new_tag()
    holder = Worker(dict(mode="hold", n=2, dsn=tagged(pg.dsn, tag), broker=broker.url))
    holder.wait_line("HOLDING")
    with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=30) as pool:
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.getconn(timeout=1.0)
        elapsed = time.monotonic() - t0
        # the caller reads the broker's socket until the deadline; what is left
        # to wait after that is nothing (it once waited the whole timeout again)
        assert 1.0 <= elapsed < 1.8, elapsed
        assert "budget is full" in str(info.value) and broker.url in str(info.value)
        # the broker dropped the request: nothing is queued or leased for us
        status = broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 0, 2)
        assert status["pools"]["default"] == {**status["pools"]["default"],
                                              "leased": 2, "waiting": 0}
        # once the holder lets go, the same pool gets a connection
        holder.finish()
        holder.result()
        with pool.connection(timeout=5) as conn:
            conn.cursor().execute("SELECT 1")
    assert broker.wait_leased(0, 1) == 0


def test_waiters_are_served_as_connections_come_back(pg, broker_factory):
    """Budget 1, one process with 8 threads: every request is served in turn."""
    broker = broker_factory({"default": 1})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        result = Worker(dict(mode="load", dsn=tagged(pg.dsn, tag), broker=broker.url,
                             threads=8, iterations=10, sleep=0.005)).result()
    assert result["ok"] == 80 and result["timeouts"] == 0, result
    assert sampler.max[tag] == 1
