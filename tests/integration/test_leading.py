"""A thread waiting for a lease reads the broker's socket itself (it *leads*, see
poolbroker_client.leases): what the I/O thread would do must still happen while
it does. Leading is stretched here (LEAD_FOR) so that a duty it skipped would
show as a stuck caller or an expired lease, not as a few milliseconds."""

import threading
import time

import pytest

from poolbroker_client import ConnectionPool, PoolTimeout, leases
from poolbroker_client.leases import LeaseClient

from helpers import new_tag, tagged


def wait_until_leading(client: LeaseClient, thread: threading.Thread) -> None:
    """Wait (at most 10 s) until ``thread`` reads the broker's socket."""
    deadline = time.monotonic() + 10
    while client.leader is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.leader == thread.ident


@pytest.fixture
def long_leads(monkeypatch):
    monkeypatch.setattr(leases, "LEAD_FOR", 60.0)


def test_a_connection_handed_to_a_leading_waiter_interrupts_its_read(pg, broker_factory,
                                                                     long_leads):
    # a long TTL: heartbeats (which a leader wakes up to send) are 40 s apart; and
    # max_size 1: the waiter asks the broker for nothing, so nothing but the
    # hand-over itself can wake it (no cancel, no grant)
    broker = broker_factory({"default": 2}, ttl=120.0)
    with ConnectionPool(tagged(pg.dsn, new_tag()), broker=broker.url, timeout=40,
                        max_size=1) as pool:
        held = pool.getconn()
        client = LeaseClient.for_url(broker.url)
        # the link's first heartbeat goes 1 s after it starts, before the broker
        # has said how often to beat: past it, the next is 40 s away
        while client.started is None or time.monotonic() - client.started < 1.5:
            time.sleep(0.05)
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
        waiter.start()
        wait_until_leading(client, waiter)
        pool.putconn(held)  # handed over: the waiter must not read on until LEAD_FOR
        waiter.join(20)
        assert not waiter.is_alive() and got == [held]
        pool.putconn(held)


def test_a_leading_waiter_keeps_the_process_heartbeating(pg, broker_factory, long_leads):
    broker = broker_factory({"default": 2}, ttl=1.0)
    with ConnectionPool(tagged(pg.dsn, new_tag()), broker=broker.url, timeout=3.5) as pool:
        a, b = pool.getconn(), pool.getconn()  # the whole budget
        client = LeaseClient.for_url(broker.url)
        errors = []

        def wait():
            try:
                pool.getconn()
            except PoolTimeout as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until_leading(client, waiter)  # for 3.5 s = 3.5 TTLs
        waiter.join(20)
        assert len(errors) == 1
        # had nobody heartbeaten meanwhile, the broker would have expired us and
        # these connections would be cut
        for conn in (a, b):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        assert pool.get_stats()["leases_held"] == 2
        pool.putconn(a)
        pool.putconn(b)


def test_an_answer_due_after_the_leader_leaves_is_read_at_once(pg, broker_factory,
                                                                monkeypatch):
    """A caller served by a grant asks for the next lease ahead (lease_ahead) and
    leaves before its answer comes: the I/O thread, which stood aside while the
    caller read the socket, must be told to watch it again. Its own next look is
    stretched here (LED_CHECK, and heartbeats 40 s apart), so a missed wake-up
    shows as an answer unread for 40 s, not as a few hundred milliseconds."""
    monkeypatch.setattr(leases, "LED_CHECK", 60.0)
    broker = broker_factory({"default": 8}, ttl=120.0)
    with ConnectionPool(tagged(pg.dsn, new_tag()), broker=broker.url, lease_ahead=True,
                        max_lifetime=0.0) as pool:  # every connection handed back is closed
        pool.putconn(pool.getconn())
        client = LeaseClient.for_url(broker.url)
        while client.started is None or time.monotonic() - client.started < 1.5:
            time.sleep(0.05)  # past the first heartbeat: the next is 40 s away
        for _ in range(10):
            conn = pool.getconn()
            deadline = time.monotonic() + 10
            while pool.get_stats()["leases_requested"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pool.get_stats()["leases_requested"] == 0, "the answer was not read"
            pool.putconn(conn)
            # the spare unused: given back, so that the next getconn waits for a grant
            deadline = time.monotonic() + 10
            while pool.get_stats()["leases_held"] and time.monotonic() < deadline:
                time.sleep(0.01)
