"""A preloaded gunicorn app (4 workers x 4 threads) under a budget of 3 serves a
few hundred concurrent requests; the server never sees more than 3 connections."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from devtools.pgcluster import free_port

from helpers import HERE, Sampler, new_tag, tagged

pytestmark = pytest.mark.integration


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


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
                _get(url)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        with Sampler(pg.dsn, [tag]) as sampler:
            with ThreadPoolExecutor(64) as ex:
                results = list(ex.map(_get, [url] * 400))
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
