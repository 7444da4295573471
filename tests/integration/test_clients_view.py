"""Who holds what: ``poolbroker clients`` lists every lease with its holder (pid,
host, application name), its backend and how long its connection has been checked
out, the longest first; queued requests and idle leases too. ``poolbroker top
--once`` draws the same with each pool's bar. Real broker, real worker processes,
the backends checked against pg_stat_activity."""

import json
import socket
import subprocess
import sys
import time

import psycopg2
import pytest

from helpers import Worker, new_tag, tagged

pytestmark = pytest.mark.integration


def poolbroker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poolbroker", *args],
                          capture_output=True, text=True, timeout=60)


def rows(url: str) -> list:
    run = poolbroker("clients", "--broker", url, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def backends(dsn: str, tag: str) -> set:
    with psycopg2.connect(dsn, application_name="pbt-counter") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity "
                        "WHERE split_part(application_name, '/pb', 1) = %s", (tag,))
            found = {pid for (pid,) in cur.fetchall()}
    conn.close()
    return found


def poll_rows(url: str, states: list, timeout: float = 20.0) -> list:
    """``poolbroker clients`` until its rows have ``states`` and every lease its
    backend (checkouts and backend pids reach the broker with each client's next
    message); the last rows otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        listed = rows(url)
        known = all(r["backend_pid"] for r in listed if r["lease"] is not None)
        if ([r["state"] for r in listed] == states and known) or time.monotonic() > deadline:
            assert [r["state"] for r in listed] == states, listed
            return listed
        time.sleep(0.05)


def test_clients_shows_who_holds_what_longest_checkout_first(pg, broker_factory, monkeypatch):
    broker = broker_factory({"default": 4}, ttl=1.5)  # heartbeats every 0.5 s
    tag = new_tag()
    cfg = {"dsn": tagged(pg.dsn, tag), "broker": broker.url}
    monkeypatch.setenv("POOLBROKER_APPLICATION_NAME", "batch-job")
    batch = Worker({**cfg, "mode": "hold", "n": 1})
    batch_backends = batch.wait_line("HOLDING").split()[1:]
    monkeypatch.setenv("POOLBROKER_APPLICATION_NAME", "web")
    web = Worker({**cfg, "mode": "hold", "n": 2})
    web_backends = web.wait_line("HOLDING").split()[1:]
    idle = Worker({**cfg, "mode": "idle", "n": 1})
    idle.wait_line("IDLE")
    waiter = None
    try:
        listed = poll_rows(broker.url, ["busy", "busy", "busy", "idle"])
        first = listed[0]
        assert (first["name"], first["pid"]) == ("batch-job", batch.proc.pid)
        assert str(first["backend_pid"]) == batch_backends[0]
        assert first["checked_out_s"] >= listed[1]["checked_out_s"] >= listed[2]["checked_out_s"]
        assert {r["pid"] for r in listed[1:3]} == {web.proc.pid}
        assert {str(r["backend_pid"]) for r in listed[1:3]} == set(web_backends)
        assert all(r["host"] == socket.gethostname() and r["pool"] == "default"
                   for r in listed)
        assert listed[3]["pid"] == idle.proc.pid and listed[3]["checked_out_s"] is None
        # what the broker lists is what the server has
        assert {r["backend_pid"] for r in listed} == backends(pg.dsn, tag)

        # one more process wants two: the idle lease moves to it, its second waits
        waiter = Worker({**cfg, "mode": "hold", "n": 2})
        listed = poll_rows(broker.url, ["busy", "busy", "busy", "busy", "waiting"])
        assert listed[0]["pid"] == batch.proc.pid
        assert listed[3]["pid"] == listed[4]["pid"] == waiter.proc.pid
        assert listed[4]["lease"] is None and listed[4]["waiting_s"] >= 0
        assert {r["backend_pid"] for r in listed[:4]} == backends(pg.dsn, tag)

        text = poolbroker("clients", "--broker", broker.url)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].split()[:4] == ["pool", "state", "lease", "pid"]
        assert "batch-job" in lines[1] and str(batch.proc.pid) in lines[1]
        assert "4 lease(s), 4 busy; 1 request(s) waiting" in text.stdout

        top = poolbroker("top", "--broker", broker.url, "--once", "--interval", "0.2")
        assert top.returncode == 0, top.stderr
        assert "4/4" in top.stdout and "batch-job" in top.stdout and "waiting" in top.stdout
    finally:
        for w in (batch, web, idle, waiter):
            if w is not None and w.proc.stdin is not None:
                w.finish()
    for w in (batch, web, waiter):
        assert w is not None
        w.result()
    broker.wait_leased(0, timeout=10)


def test_clients_and_top_name_an_unreachable_broker():
    for cmd in (["clients"], ["top", "--once"]):
        run = poolbroker(*cmd, "--broker", "ipc:///tmp/pbt-nobody.sock", "--timeout", "0.3")
        assert run.returncode == 1
        assert "did not answer within 0.3s" in run.stderr, run.stderr
