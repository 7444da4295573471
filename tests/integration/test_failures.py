"""Bad input and failures: clear errors, nothing leaked, the broker stays up."""

import os
import signal
import socket
import subprocess
import sys
import time

import msgpack
import psycopg2
import pytest
import zmq

from devtools.pgcluster import free_port
from poolbroker import protocol as p
from poolbroker_client import BrokerError, ConnectionPool, PoolError, PoolTimeout

from helpers import Worker, count_backends, new_tag, short_ipc, tagged

pytestmark = pytest.mark.integration


def _bad_dsn(pg):
    return pg.dsn.replace("dbname=postgres", "dbname=no_such_db")


def test_failed_connects_leak_no_lease(pg, broker_factory):
    broker = broker_factory({"default": 1})
    with ConnectionPool(_bad_dsn(pg), broker=broker.url, timeout=5) as pool:
        for _ in range(25):
            with pytest.raises(psycopg2.OperationalError, match="no_such_db"):
                pool.getconn()
        assert pool.get_stats()["connections_errors"] == 25
    # releases travel asynchronously; a leaked lease would stay counted
    assert broker.wait_leased(0, 2) == 0
    # and the budget of 1 is still whole: a good connection gets it at once
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=2) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")


def test_unknown_pool_is_an_error_naming_it(pg, broker):
    with ConnectionPool(pg.dsn, broker=broker.url, pool="nosuchpool", timeout=10) as pool:
        t0 = time.monotonic()
        with pytest.raises(PoolError) as info:
            pool.getconn()
        assert time.monotonic() - t0 < 5, "an unknown pool must fail at once, not time out"
    assert isinstance(info.value, BrokerError) and info.value.code == "unknown_pool"
    assert "'nosuchpool'" in str(info.value) and "default" in str(info.value)


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_unreachable_broker_times_out_naming_the_url(pg, kind):
    url = short_ipc("pbt-none") if kind == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    with ConnectionPool(pg.dsn, broker=url, timeout=1.0) as pool:
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.getconn()
        elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.0, elapsed
    assert url in str(info.value) and "does not answer" in str(info.value)


def test_no_broker_configured_is_a_clear_error(pg, monkeypatch):
    monkeypatch.delenv("POOLBROKER_URL", raising=False)
    with pytest.raises(PoolError, match="POOLBROKER_URL"):
        ConnectionPool(pg.dsn)


def test_sigkilled_workers_leases_come_back_within_the_ttl(pg, broker_factory):
    broker = broker_factory({"default": 3})  # default ttl (4 s)
    tag = new_tag()
    worker = Worker(dict(mode="hold", n=3, dsn=tagged(pg.dsn, tag), broker=broker.url))
    worker.wait_line("HOLDING")
    assert broker.leased() == 3
    t0 = time.monotonic()
    worker.kill(signal.SIGKILL)
    status = broker.wait_for(lambda s: s["pools"]["default"]["leased"] == 0, 6.0)
    back = time.monotonic() - t0
    assert status["pools"]["default"]["leased"] == 0
    assert back <= 5.0, f"leases came back after {back:.1f}s"
    assert count_backends(pg.dsn, tag) == 0
    assert "silent for" in broker.log_text()  # the expiry is logged, with the pid


def test_closed_connection_handed_back_is_discarded_and_released(pg, broker_factory):
    broker = broker_factory({"default": 1})
    tag = new_tag()
    with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=5) as pool:
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)
        # the janitor closes and releases; the budget of 1 becomes free again
        with pool.connection(timeout=5) as conn2:
            assert not conn2.closed
            conn2.cursor().execute("SELECT 1")
        assert pool.get_stats()["returns_bad"] == 1
    assert broker.wait_leased(0, 2) == 0
    assert count_backends(pg.dsn, tag) == 0


def test_released_lease_means_backend_already_gone(pg, broker_factory):
    """A lease goes back only after the server has seen the connection close: when
    the broker has the lease back, the backend is no longer in pg_stat_activity.

    Each session creates temp tables, which its backend drops while exiting (still
    listed in pg_stat_activity), so releasing at close() would be caught here."""
    broker = broker_factory({"default": 1})
    admin = psycopg2.connect(pg.dsn, application_name="pbt-admin")
    admin.autocommit = True
    cur = admin.cursor()
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=5, max_lifetime=0.0) as pool:
        for _ in range(5):
            conn = pool.getconn()
            pid = conn.get_backend_pid()
            with conn.cursor() as c:
                c.execute("DO $$ BEGIN FOR i IN 1..300 LOOP "
                          "EXECUTE format('CREATE TEMP TABLE t%s (a int, b text)', i); "
                          "END LOOP; END $$")
            conn.commit()
            pool.putconn(conn)  # max_lifetime 0: discarded, closed, then released
            broker.wait_for(lambda s: s["pools"]["default"]["leased"] == 0, 10)
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            assert cur.fetchone()[0] == 0, "lease released while the backend still counted"
    admin.close()


def test_junk_on_the_broker_socket(pg, broker):
    ctx = zmq.Context.instance()
    junk = ctx.socket(zmq.DEALER)
    junk.setsockopt(zmq.LINGER, 0)
    junk.setsockopt(zmq.ROUTING_ID, b"junk-peer")
    junk.connect(broker.url)
    frames = [
        [b""], [b"\xc1\xc1\xc1"], [os.urandom(200)], [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"v": 1, "op": "acquire", "rid": "x", "pool": 1, "timeout": -1})],
        [msgpack.packb({"v": 1, "op": "acquire", "rid": 1, "pool": "default", "timeout": 1})],
        [msgpack.packb({"v": 2, "op": "hello"})],
        [msgpack.packb({"v": 1, "op": "nuke"})],
        [b"one", b"two", b"three"],  # wrong frame count
        [b"\x81" + msgpack.packb("v") + b"\x91" * 1000 + b"\xc0"],  # deep nesting
    ]
    for f in frames:
        junk.send_multipart(f)
    replies = []
    while junk.poll(2000):
        replies.append(p.decode(junk.recv(), p.BROKER_OPS))
        if len(replies) == len(frames):
            break
    assert len(replies) == len(frames), replies
    assert all(r["op"] == "error" for r in replies), replies  # errors only, no grant
    codes = {r["code"] for r in replies}
    assert {"bad_message", "unknown_client", "bad_version", "unknown_op"} <= codes
    # a frame over the size limit: libzmq drops it and the peer, the broker stays up
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(broker.url)
    big.send(b"\x00" * (p.MAX_MESSAGE_BYTES * 4))
    # raw bytes that are not even ZMTP
    if broker.url.startswith("ipc://"):
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(broker.url[len("ipc://"):])
        raw.sendall(os.urandom(4096))
        raw.close()
    # the broker still serves a real client, and granted nothing to junk
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=5) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
    assert broker.wait_leased(0, 2) == 0
    status = broker.status()
    assert status["bad_frames"] >= 6
    # junk never became a client: only this process's lease client is known
    assert [c["pid"] for c in status["clients"]] == [os.getpid()], status["clients"]
    junk.close()
    big.close()


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_second_broker_on_the_same_address_refuses(broker_factory, kind):
    url = short_ipc() if kind == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    first = broker_factory({"default": 2}, url=url)
    proc = subprocess.run([sys.executable, "-m", "poolbroker", "serve", "--bind", url,
                           "--pool", "default=2"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert url in proc.stderr and ("already" in proc.stderr), proc.stderr
    # the first broker still owns its address
    assert first.status()["pools"]["default"]["max"] == 2


def test_cli_errors_are_clear():
    proc = subprocess.run([sys.executable, "-m", "poolbroker", "serve", "--bind",
                           short_ipc(), "--pool", "oops"], capture_output=True, text=True)
    assert proc.returncode == 2 and "NAME=MAX" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "poolbroker", "status", "--broker",
                           short_ipc(), "--timeout", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 1 and "did not answer" in proc.stderr


def test_a_flood_of_acquires_is_capped_and_others_are_still_served(pg, broker_factory):
    broker = broker_factory({"default": 1}, extra=("--max-waiting-per-client", "50"))
    ctx = zmq.Context.instance()
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.ROUTING_ID, b"flooder")
    flood.setsockopt(zmq.SNDHWM, 20000)
    flood.connect(broker.url)
    flood.send(p.encode("hello", pid=1, host="x", name="flood", leases=[]))
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=5) as pool:
        held = pool.getconn()  # the budget is full: the flood can only queue
        for rid in range(5000):
            flood.send(p.encode("acquire", rid=rid, pool="default", timeout=60.0), zmq.NOBLOCK)
        t0 = time.monotonic()
        status = broker.status(timeout=5)  # others are answered during the flood
        assert time.monotonic() - t0 < 5
        refused = 0
        deadline = time.monotonic() + 10
        while refused < 5000 - 50 and time.monotonic() < deadline:
            if flood.poll(200):
                msg = p.decode(flood.recv(), p.BROKER_OPS)
                refused += msg["op"] == "error" and msg["code"] == "too_many_requests"
        assert refused == 5000 - 50
        status = broker.status()
        [flooder] = [c for c in status["clients"] if c["name"] == "flood"]
        assert flooder["waiting"] == 50 and status["pools"]["default"]["leased"] == 1
        pool.putconn(held)
    flood.close()
