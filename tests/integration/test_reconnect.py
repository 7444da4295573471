"""The broker goes away and comes back: clients reconnect and re-announce."""

import signal
import threading
import time

import pytest

from poolbroker_client import ConnectionPool

from helpers import Sampler, Worker, count_backends, new_tag, short_ipc, tagged

pytestmark = pytest.mark.integration


def test_broker_restart_held_connections_keep_working_and_are_reannounced(pg, broker_factory):
    url = short_ipc()
    # a new address: nothing can be outstanding, no grace period. With one, the
    # first getconn waits it out, the pool is contended when `idle` comes back,
    # and the janitor may give `idle` back before the broker says the queue is
    # empty (the broker is stopped first: the flag stays set)
    first = broker_factory({"default": 3}, url=url, grace=0.0)
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
        assert second.wait_leased(3, 10) == 3
        assert count_backends(pg.dsn, tag) == 3
        for conn in (busy, again, got[0]):
            pool.putconn(conn)
    assert second.wait_leased(0, 2) == 0


def test_crash_restart_with_a_frozen_holder_never_over_grants(pg, broker_factory):
    """The broker crashes while a holder has the whole budget; the holder is frozen
    (SIGSTOP) across the restart. The new broker grants nothing during its grace
    period, the holder re-announces when it wakes, and the waiting requester gets a
    lease only when the holder gives one back. pg_stat_activity never exceeds 2."""
    url = short_ipc()
    first = broker_factory({"default": 2}, url=url)
    tag = new_tag()
    holder = Worker(dict(mode="hold", n=2, dsn=tagged(pg.dsn, tag), broker=url))
    holder.wait_line("HOLDING")
    got = []
    with Sampler(pg.dsn, [tag]) as sampler:
        first.kill(signal.SIGKILL)  # a crash: the state file says leases are out
        holder.proc.send_signal(signal.SIGSTOP)
        second = broker_factory({"default": 2}, url=url)
        assert second.status()["grace_s"] > 0
        with ConnectionPool(tagged(pg.dsn, tag), broker=url, timeout=20) as pool:
            waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
            waiter.start()
            time.sleep(1.5)  # the holder stays frozen for part of the grace period
            holder.proc.send_signal(signal.SIGCONT)
            assert second.wait_leased(2, 10) == 2, "the holder did not re-announce"
            # the grace period ends; the budget is still the holder's
            second.wait_for(lambda s: s["grace_s"] == 0, 10)
            waiter.join(1.0)
            assert not got, "granted a slot that a live connection still uses"
            holder.finish()
            holder.result()
            waiter.join(15)
            assert got, "the requester was not served once the holder let go"
            pool.putconn(got[0])
    assert sampler.max[tag] <= 2, f"server saw {sampler.max[tag]} connections, budget 2"
    assert "granting nothing" in second.log_text()


def test_clean_restart_with_nothing_leased_grants_at_once(pg, broker_factory):
    url = short_ipc()
    first = broker_factory({"default": 2}, url=url)
    with ConnectionPool(pg.dsn, broker=url, timeout=5) as pool:
        with pool.connection():
            pass
    first.wait_for(lambda s: s["pools"]["default"]["leased"] == 0, 2)
    first.stop()  # SIGTERM: a clean exit with nothing leased
    second = broker_factory({"default": 2}, url=url)
    assert second.status()["grace_s"] == 0
    assert "granting nothing" not in second.log_text()
