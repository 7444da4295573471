"""Hostile peers and unlucky timing, against a real broker and real PostgreSQL."""

import os
import signal
import time

import msgpack
import pytest
import zmq

from poolbroker import protocol as p
from poolbroker_client import ConnectionPool

from conftest import Worker, count_backends, new_tag, tagged

pytestmark = pytest.mark.integration


def _dealer(url: str, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(url)
    return sock


def _replies(sock: zmq.Socket, count: int, timeout: float = 3.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count and sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        out.append(p.decode(sock.recv(), p.BROKER_OPS, max_bytes=p.MAX_STATUS_BYTES))
    return out


def test_one_deeply_nested_frame_does_not_stop_the_broker(pg, broker):
    """Item 1: ~1,000 nested arrays in a field used to raise RecursionError out of
    the loop and end the broker."""
    junk = _dealer(broker.url, b"nester")
    deep = b"\x91" * 1000 + b"\xc0"
    for field in ("v", "op", "rid"):
        body = {"v": msgpack.packb(1), "op": msgpack.packb("acquire")}
        body[field] = deep
        junk.send(b"\x82" + b"".join(msgpack.packb(k) + v for k, v in body.items())[:])
    replies = _replies(junk, 3)
    assert [r["op"] for r in replies] == ["error"] * 3, replies
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=5) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
    assert broker.status()["bad_frames"] >= 3
    junk.close()


def test_a_frozen_broker_expires_nobody_when_it_wakes(pg, broker_factory):
    """Item 3: a broker stopped for longer than the TTL used to run its expiry
    before reading the heartbeats queued meanwhile (with fencing: every backend
    terminated mid-transaction)."""
    ttl = 2.0
    broker = broker_factory({"default": 2}, ttl=ttl, extra=("--fence-dsn", pg.dsn))
    tag = new_tag()
    holder = Worker(dict(mode="hold", n=1, dsn=tagged(pg.dsn, tag), broker=broker.url))
    holder.wait_line("HOLDING")
    os.kill(broker.pid, signal.SIGSTOP)
    time.sleep(2.5 * ttl)  # the fault itself: the broker does not run for 5 s
    os.kill(broker.pid, signal.SIGCONT)
    deadline = time.monotonic() + 2 * ttl + 1
    while time.monotonic() < deadline:  # long enough for a wrong expiry and its fencing
        assert broker.leased() == 1, broker.log_text()[-2000:]
        assert count_backends(pg.dsn, tag) == 1
        time.sleep(0.1)
    holder.finish()
    result = holder.result()
    assert result["use_after"] == ["ok"], result
    text = broker.log_text()
    assert "did not run for" in text
    assert "silent for" not in text and "fenced" not in text  # nobody expired
