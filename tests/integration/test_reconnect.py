"""The broker goes away and comes back: clients reconnect and re-announce."""

import threading
import time

import pytest

from poolbroker_client import ConnectionPool

from conftest import count_backends, new_tag, short_ipc, tagged

pytestmark = pytest.mark.integration


def test_broker_restart_held_connections_keep_working_and_are_reannounced(pg, broker_factory):
    url = short_ipc()
    first = broker_factory({"default": 3}, url=url)
    tag = new_tag()
    with ConnectionPool(tagged(pg.dsn, tag), broker=url, timeout=15) as pool:
        busy = pool.getconn()
        idle = pool.getconn()
        pool.putconn(idle)
        assert first.leased() == 2
        first.stop()

        # while the broker is away: the busy connection works, the idle one is
        # still handed out, and a request for a new lease waits instead of failing
        with busy.cursor() as cur:
            cur.execute("SELECT 1")
        busy.commit()
        again = pool.getconn(timeout=1)
        assert again is idle
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn(timeout=15)))
        waiter.start()
        deadline = time.monotonic() + 5  # the request is out, to a broker that is not there
        while pool.get_stats()["leases_requested"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.get_stats()["leases_requested"] == 1 and not got

        second = broker_factory({"default": 3}, url=url)
        waiter.join(15)
        assert got, "the waiting request was not served after the broker came back"
        # the client re-announced the two leases it held, plus the new one
        status = second.wait_for(lambda s: s["pools"]["default"]["leased"] == 3, 10)
        assert status["pools"]["default"]["leased"] == 3
        assert count_backends(pg.dsn, tag) == 3
        for conn in (busy, again, got[0]):
            pool.putconn(conn)
    status = second.wait_for(lambda s: s["pools"]["default"]["leased"] == 0, 2)
    assert status["pools"]["default"]["leased"] == 0
