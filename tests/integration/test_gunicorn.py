"""A preloaded gunicorn app (4 workers x 4 threads) under a budget of 3 serves a
few hundred concurrent requests; the server never sees more than 3 connections."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from devtools.pgcluster import free_port
from poolbroker_client import ConnectionPool, PoolTimeout

from helpers import HERE, Sampler, count_backends, http_get, new_tag, start_gunicorn, tagged

pytestmark = pytest.mark.integration


def test_preloaded_gunicorn_fleet_under_budget(pg, broker_factory):
    broker = broker_factory({"default": 3})
    tag = new_tag()
    port = free_port()
    env = {**os.environ, "PB_DSN": tagged(pg.dsn, tag), "POOLBROKER_URL": broker.url,
           "PYTHONPATH": os.path.dirname(HERE)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", "4", "--threads", "4",
         "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "demo.webapp:app"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until it serves (a poll with a deadline)
            try:
                http_get(url)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        with Sampler(pg.dsn, [tag]) as sampler:
            with ThreadPoolExecutor(64) as ex:
                results = list(ex.map(http_get, [url] * 400))
        assert len(results) == 400
        assert len({r["worker"] for r in results}) >= 2, "requests should spread over workers"
        assert sampler.max[tag] <= 3, f"server saw {sampler.max[tag]} connections, budget 3"
        assert sampler.samples > 5
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out[-3000:]
    # workers and master exit cleanly: their leases go back at once, not after the TTL
    assert broker.wait_leased(0, 1.0) == 0, broker.status()


def _kill_worker_mid_query(pg, broker, tmp, tag):
    """gunicorn (2 workers) under a budget of 2; one worker is SIGKILLed in the middle
    of a query while this process asks for both slots. Returns how long the second
    slot took to come back, the sampler, and gunicorn's output."""
    pid_file = os.path.join(tmp, "worker.pid")
    path = os.pathsep.join([os.path.dirname(HERE), os.path.join(HERE, "integration")])
    env = {**os.environ, "PB_DSN": tagged(pg.dsn, tag), "POOLBROKER_URL": broker.url,
           "PB_PID_FILE": pid_file, "PYTHONPATH": path}
    proc, url = start_gunicorn(env, "gunicorn_app:app", "-w", "2")
    try:
        with Sampler(pg.dsn, [tag]) as sampler:
            sleeper = ThreadPoolExecutor(1)
            sleeper.submit(lambda: urllib.request.urlopen(url + "sleep", timeout=90).read())
            deadline = time.monotonic() + 20
            while not (os.path.exists(pid_file) and os.path.getsize(pid_file)):
                assert time.monotonic() < deadline, "the /sleep request never started"
                time.sleep(0.05)
            worker = int(open(pid_file).read())
            assert broker.wait_for(lambda s: s["pools"]["default"]["leased"] >= 1, 10)
            with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=20) as pool:
                # the other worker's idle lease (if any) comes back for contention;
                # the first slot is ours quickly, the second is the dead worker's
                first = pool.getconn()
                os.kill(worker, signal.SIGKILL)
                t0 = time.monotonic()
                try:
                    second = pool.getconn()
                    came_back = time.monotonic() - t0
                    pool.putconn(second)
                except PoolTimeout:
                    came_back = None
                pool.putconn(first)
            sleeper.shutdown(wait=False)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    return came_back, sampler, out


def test_a_killed_worker_gives_its_lease_back_at_once_with_fencing(
        pg, broker_factory, tmp_path):
    """With --fence-dsn, the master's exit report fences the dead worker's lease: its
    backend (still in pg_sleep) is ended, and only then is the slot granted again:
    well before the TTL (30 s here), never above the budget."""
    broker = broker_factory({"default": 2}, ttl=30.0, extra=("--fence-dsn", pg.dsn))
    came_back, sampler, out = _kill_worker_mid_query(pg, broker, str(tmp_path), new_tag())
    assert came_back is not None and came_back < 5, (came_back, out[-3000:])
    print(f"\nthe killed worker's slot came back after {came_back:.3f}s (TTL 30s)")
    assert sampler.max_total <= 2, f"server saw {sampler.max_total} connections, budget 2"
    assert "exited without giving its leases back: pid" in out, out[-3000:]
    assert "fencing 1 lease(s)" in out
    assert "exited, reported by its parent" in broker.log_text()


def test_without_fencing_a_killed_workers_lease_waits_for_the_ttl(
        pg, broker_factory, tmp_path):
    """Without fencing the broker cannot see that the dead worker's backend is gone
    (here it is still in pg_sleep): the report changes nothing and says so; the slot
    comes back at the TTL (3 s) as before."""
    broker = broker_factory({"default": 2}, ttl=3.0)
    tag = new_tag()
    came_back, sampler, out = _kill_worker_mid_query(pg, broker, str(tmp_path), tag)
    assert came_back is not None and came_back >= 1.5, came_back  # not at once
    assert "stay counted until the TTL" in out, out[-3000:]
    # the dead worker's backend is still in its pg_sleep: end it for the next tests
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE split_part(application_name, '/pb', 1) = %s", (tag,))
    conn.close()
    deadline = time.monotonic() + 10
    while count_backends(pg.dsn, tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_backends(pg.dsn, tag) == 0
