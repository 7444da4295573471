"""poolbroker_client.lease() / alease(): leases for code that manages its own
connections, against a real broker and PostgreSQL."""

import asyncio
import threading

import psycopg2
import pytest

import poolbroker_client
from poolbroker_client import BrokerError, PoolError, PoolTimeout

from helpers import Sampler, Worker, count_backends, new_tag, tagged


def test_a_lease_holds_a_slot_and_an_attached_connection_goes_before_the_next(pg,
                                                                               broker_factory):
    broker = broker_factory({"default": 1})
    tag = new_tag()
    dsn = tagged(pg.dsn, tag)
    inside = threading.Event()
    leave = threading.Event()

    def holder():
        with poolbroker_client.lease(broker=broker.url, timeout=5) as slot:
            conn = psycopg2.connect(dsn)
            slot.attach(conn)  # closed on the way out, before the lease goes back
            inside.set()
            leave.wait(10)

    with Sampler(pg.dsn, [tag]) as sampler:
        t = threading.Thread(target=holder)
        t.start()
        assert inside.wait(10)
        with pytest.raises(PoolTimeout, match="no lease in pool 'default'"):
            with poolbroker_client.lease(broker=broker.url, timeout=0.3):
                pass
        leave.set()
        # the next lease comes only once the holder's backend has gone
        with poolbroker_client.lease("default", broker=broker.url, timeout=5) as slot:
            assert slot.pool == "default" and slot.id > 0
            conn = psycopg2.connect(dsn)
            slot.attach(conn)
            conn.cursor().execute("SELECT 1")
        t.join(5)
    assert sampler.max[tag] <= 1
    # given back while nobody waits: the broker hears it with the next message
    assert broker.wait_leased(0, timeout=5) == 0 and count_backends(pg.dsn, tag) == 0


def test_alease_with_an_async_connection(pg, broker_factory):
    psycopg = pytest.importorskip("psycopg")
    broker = broker_factory({"default": 1})
    tag = new_tag()
    dsn = tagged(pg.dsn, tag)

    async def work(results):
        async with poolbroker_client.alease(broker=broker.url, timeout=5) as slot:
            conn = await psycopg.AsyncConnection.connect(dsn)
            slot.attach(conn)  # its close() is a coroutine: awaited on the way out
            cur = await conn.execute("SELECT 1")
            results.append((await cur.fetchone())[0])

    async def main():
        results = []
        # two tasks, one slot: the second waits without blocking the loop
        await asyncio.gather(work(results), work(results))
        return results

    with Sampler(pg.dsn, [tag]) as sampler:
        assert asyncio.run(main()) == [1, 1]
    assert sampler.max[tag] <= 1
    # given back while nobody waits: the broker hears it with the next message
    assert broker.wait_leased(0, timeout=5) == 0 and count_backends(pg.dsn, tag) == 0


def test_alease_times_out_and_a_cancelled_task_leaks_nothing(pg, broker_factory):
    broker = broker_factory({"default": 1})

    async def main():
        async with poolbroker_client.alease(broker=broker.url, timeout=5):
            with pytest.raises(PoolTimeout):
                async with poolbroker_client.alease(broker=broker.url, timeout=0.3):
                    pass
            waiter = asyncio.ensure_future(
                poolbroker_client.alease(broker=broker.url, timeout=5).__aenter__())
            await asyncio.sleep(0.2)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter

    asyncio.run(main())
    assert broker.wait_leased(0, timeout=5) == 0


def test_lease_errors_name_their_cause(broker_factory, monkeypatch):
    broker = broker_factory({"default": 1})
    with pytest.raises(BrokerError, match="unknown pool 'nope'"):
        with poolbroker_client.lease("nope", broker=broker.url, timeout=2):
            pass
    monkeypatch.delenv("POOLBROKER_URL", raising=False)
    with pytest.raises(PoolError, match="no broker address"):
        with poolbroker_client.lease():
            pass
    with poolbroker_client.lease(broker=broker.url, timeout=2) as slot:
        with pytest.raises(PoolError, match="cannot find the socket"):
            slot.attach(object())
    assert broker.wait_leased(0, timeout=5) == 0


def test_a_release_kept_back_while_nobody_waits_goes_out_when_someone_does(pg, broker_factory):
    # TTL 60 s: heartbeats every 20 s, so only the contention can carry the release
    broker = broker_factory({"default": 1}, ttl=60)
    tag = new_tag()
    with poolbroker_client.lease(broker=broker.url, timeout=5):
        pass
    # the first heartbeat (a second after the link starts) carries that release
    assert broker.wait_leased(0, timeout=10) == 0
    with poolbroker_client.lease(broker=broker.url, timeout=5):
        # the I/O thread is back in its poll once the broker shows the lease, so
        # the release below waits for our next message (the slot stays counted)
        assert broker.wait_leased(1, timeout=10) == 1
    # someone waits (longer than nothing, far shorter than our next heartbeat): the
    # broker tells us the pool is contended, and that sends the release
    waiter = Worker({"mode": "hold", "n": 1, "dsn": tagged(pg.dsn, tag), "broker": broker.url,
                     "timeout": 10})
    waiter.wait_line("HOLDING", timeout=30)
    waiter.finish()
    assert waiter.result()["use_after"] == ["ok"]
