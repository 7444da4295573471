"""Global caps (like PgBouncer's max_client_conn): a broker serving as many client
processes, or queueing as many requests, as it is configured for refuses more with
an error naming the cap, and goes on serving those it has."""

import pytest

import poolbroker_client
from poolbroker_client import BrokerError

from helpers import Worker, count_backends, new_tag, tagged


def test_a_client_beyond_max_clients_is_refused_at_once_and_the_others_keep_theirs(
        pg, broker_factory):
    broker = broker_factory({"default": 4}, extra=("--max-clients", "2"))
    tag = new_tag()
    holders = [Worker({"mode": "hold", "n": 1, "dsn": tagged(pg.dsn, tag),
                       "broker": broker.url}) for _ in range(2)]
    try:
        for w in holders:
            w.wait_line("HOLDING")
        # a deadline far beyond the test's patience: the refusal must not wait for it
        with pytest.raises(BrokerError, match="max_clients = 2") as caught:
            with poolbroker_client.lease(broker=broker.url, timeout=60):
                pass
        assert caught.value.code == "too_many_clients"
        status = broker.status()
        assert len(status["clients"]) == 2 and status["pools"]["default"]["leased"] == 2
        assert count_backends(pg.dsn, tag) == 2
    finally:
        for w in holders:
            w.finish()
    for w in holders:
        assert w.result()["use_after"] == ["ok"]
    broker.wait_leased(0, timeout=10)


def test_a_request_beyond_max_waiting_is_refused_and_the_queued_one_is_served(
        pg, broker_factory):
    broker = broker_factory({"default": 1}, extra=("--max-waiting", "1"))
    tag = new_tag()
    cfg = {"mode": "hold", "n": 1, "dsn": tagged(pg.dsn, tag), "broker": broker.url}
    holder = Worker(cfg)
    holder.wait_line("HOLDING")
    queued = Worker(cfg)  # waits for the only slot: the one request the broker queues
    broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 1, timeout=20)
    with pytest.raises(BrokerError, match="max_waiting = 1") as caught:
        with poolbroker_client.lease(broker=broker.url, timeout=60):
            pass
    assert caught.value.code == "too_many_requests"
    holder.finish()
    assert holder.result()["use_after"] == ["ok"]
    queued.wait_line("HOLDING")
    queued.finish()
    assert queued.result()["use_after"] == ["ok"]
    broker.wait_leased(0, timeout=10)
    assert count_backends(pg.dsn, tag) == 0
