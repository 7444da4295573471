"""Frozen workers: with fencing the budget holds; without it the window is bounded
by the frozen process waking up, and its expired connections never go on silently."""

import signal
import threading
import time

import pytest

from poolbroker_client import ConnectionPool, lease

from helpers import Sampler, Worker, count_backends, new_tag, tagged

pytestmark = pytest.mark.integration


def _frozen_holder_scenario(pg, broker, holder_tag, requester_tag):
    holder = Worker(dict(mode="hold", n=2, dsn=tagged(pg.dsn, holder_tag), broker=broker.url))
    holder.wait_line("HOLDING")
    assert count_backends(pg.dsn, holder_tag) == 2
    holder.proc.send_signal(signal.SIGSTOP)  # frozen: no heartbeats, connections open
    got = []
    with ConnectionPool(tagged(pg.dsn, requester_tag), broker=broker.url, timeout=30) as pool:
        waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
        t0 = time.monotonic()
        waiter.start()
        waiter.join(20)
        served_after = time.monotonic() - t0
        assert got, "the requester was never served"
        holder_backends_when_served = count_backends(pg.dsn, holder_tag)
        holder.proc.send_signal(signal.SIGCONT)
        # once the woken holder has heard from the broker, its expired connections
        # are gone from the server (fenced, or cut by the holder itself)
        deadline = time.monotonic() + 10
        while count_backends(pg.dsn, holder_tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        holder_backends_after_wake = count_backends(pg.dsn, holder_tag)
        holder.finish()
        result = holder.result()
        pool.putconn(got[0])
    result["backends_after_wake"] = holder_backends_after_wake
    return served_after, holder_backends_when_served, result


def test_with_fencing_a_frozen_holder_is_fenced_before_its_slots_are_regranted(
        pg, broker_factory):
    broker = broker_factory({"default": 2}, ttl=2.0, extra=("--fence-dsn", pg.dsn))
    holder_tag, requester_tag = new_tag(), new_tag()
    with Sampler(pg.dsn, [holder_tag, requester_tag]) as sampler:
        served_after, holder_left, result = _frozen_holder_scenario(
            pg, broker, holder_tag, requester_tag)
    assert sampler.max_total <= 2, f"server saw {sampler.max_total} connections, budget 2"
    assert holder_left == 0, "a slot was regranted while the frozen holder's backend lived"
    assert served_after < 15  # the TTL (counted from the last heartbeat), then fencing
    # the woken holder's next use fails with a clear error, and it exits cleanly
    assert all("terminat" in r or "closed" in r for r in result["use_after"]), result
    assert "fenced 2 expired lease(s)" in broker.log_text()
    assert broker.wait_leased(0, 5) == 0


def test_without_fencing_a_woken_holder_cuts_its_expired_connections(pg, broker_factory):
    """The documented window: without --fence-dsn the slots go to others after the
    TTL while the frozen process still has its connections. When it wakes it learns
    its leases expired and cuts them at once; its next use fails."""
    broker = broker_factory({"default": 2}, ttl=2.0)
    holder_tag, requester_tag = new_tag(), new_tag()
    served_after, holder_left, result = _frozen_holder_scenario(
        pg, broker, holder_tag, requester_tag)
    assert served_after < 15
    assert holder_left == 2  # the over-budget window the README describes
    assert result["backends_after_wake"] == 0, "the woken holder kept its connections"
    assert all(r != "ok" for r in result["use_after"]), result  # the next use fails


def test_with_fencing_a_holder_frozen_across_a_restart_beyond_the_grace_is_swept(
        pg, broker_factory):
    from helpers import short_ipc

    url = short_ipc()
    extra = ("--fence-dsn", pg.dsn)
    first = broker_factory({"default": 2}, ttl=2.0, url=url, extra=extra)
    holder_tag, requester_tag = new_tag(), new_tag()
    holder = Worker(dict(mode="hold", n=2, dsn=tagged(pg.dsn, holder_tag), broker=url))
    holder.wait_line("HOLDING")
    with Sampler(pg.dsn, [holder_tag, requester_tag]) as sampler:
        holder.proc.send_signal(signal.SIGSTOP)
        first.kill(signal.SIGKILL)
        second = broker_factory({"default": 2}, ttl=2.0, url=url, extra=extra)
        with ConnectionPool(tagged(pg.dsn, requester_tag), broker=url, timeout=30) as pool:
            conn = pool.getconn()  # only after the grace period and the sweep
            assert count_backends(pg.dsn, holder_tag) == 0
            pool.putconn(conn)
        holder.proc.send_signal(signal.SIGCONT)
        holder.finish()
        result = holder.result()
    assert sampler.max_total <= 2, f"server saw {sampler.max_total} connections, budget 2"
    assert all(r != "ok" for r in result["use_after"]), result
    assert "restart sweep" in second.log_text()


def test_a_grant_that_waited_out_a_freeze_in_the_queue_is_not_used(pg, broker_factory):
    """A process frozen while it waits for a lease: the grant sits unread in its
    queue while the broker expires it (silent for a TTL) and grants the slot again.
    Woken, the process must not connect on that grant: it confirms with the broker
    first, learns the lease is gone and asks again (the chaos test's seed
    407049016 once saw a fifth connection on a budget of four this way)."""
    broker = broker_factory({"default": 1}, ttl=2.0, extra=("--fence-dsn", pg.dsn))
    waiter_tag, mine_tag = new_tag(), new_tag()
    with Sampler(pg.dsn, [waiter_tag, mine_tag]) as sampler, \
            ConnectionPool(tagged(pg.dsn, mine_tag), broker=broker.url, timeout=30) as pool:
        with lease(broker=broker.url):  # the whole budget
            waiter = Worker(dict(mode="hold", n=1, dsn=tagged(pg.dsn, waiter_tag),
                                 broker=broker.url, log="INFO"))
            # frozen the moment its request is queued: its caller is reading the
            # socket itself then (it leads), not only the I/O thread
            broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 1, 20)
            waiter.proc.send_signal(signal.SIGSTOP)
        # granted to the frozen waiter, which cannot read it; expired after the TTL
        status = broker.wait_for(lambda s: s["pools"]["default"]["leased"] == 0
                                 and s["pools"]["default"]["waiting"] == 0, 20)
        assert status["pools"]["default"]["leased"] == 0, status
        conn = pool.getconn()  # the slot, again
        waiter.proc.send_signal(signal.SIGCONT)
        # woken, it confirms, finds the grant stale and asks again
        status = broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 1, 20)
        if status["pools"]["default"]["waiting"] != 1:
            waiter.proc.kill()
            raise AssertionError(
                f"the woken waiter did not ask again: {status['pools']['default']}; "
                f"its backends: {count_backends(pg.dsn, waiter_tag)}; its log:\n"
                f"{waiter.proc.stderr.read()[-3000:]}\nthe broker's:\n{broker.log_text()[-3000:]}")
        assert count_backends(pg.dsn, waiter_tag) == 0
        conn.close()  # handed back closed: discarded, its lease released
        pool.putconn(conn)
        waiter.wait_line("HOLDING")  # served once the slot is free
        waiter.finish()
        waiter.result()
    assert sampler.max_total <= 1, f"server saw {sampler.max_total} connections, budget 1"
