"""Celery: a prefork worker (4 child processes) under one budget of 4, pools opened
in worker_process_init and closed in worker_process_shutdown, as the README shows."""

import importlib
import os
import signal
import subprocess
import sys

import pytest

from helpers import HERE, Sampler, new_tag, tagged

pytestmark = pytest.mark.integration


def test_a_prefork_celery_worker_shares_one_budget(pg, broker_factory, tmp_path,
                                                    monkeypatch):
    broker = broker_factory({"default": 4}, ttl=10.0)
    tag = new_tag()
    for sub in ("queue", "done", "results"):
        (tmp_path / sub).mkdir()
    path = os.pathsep.join([os.path.dirname(HERE), os.path.join(HERE, "integration")])
    env = {**os.environ, "PB_DSN": tagged(pg.dsn, tag), "POOLBROKER_URL": broker.url,
           "PB_CELERY_DIR": str(tmp_path), "PYTHONPATH": path}
    # this process only sends, with the worker's own app (same transport and
    # folders); its signal handlers run only in worker processes
    monkeypatch.setenv("PB_CELERY_DIR", str(tmp_path))
    sys.modules.pop("celery_app", None)
    sender = importlib.import_module("celery_app").app
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "-P", "prefork",
         "-c", "4", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Sampler(pg.dsn, [tag]) as sampler:
            pending = [sender.send_task("celery_app.backend_pid", args=[0.01]) for _ in range(80)]
            results = [r.get(timeout=60) for r in pending]
        assert len(results) == 80
        assert len({pid for pid, _ in results}) >= 2, "tasks should spread over children"
        assert sampler.max[tag] <= 4, f"server saw {sampler.max[tag]} connections, budget 4"
        # nobody waits (a child runs one task at a time): each keeps its idle
        # connection, and the lease with it, until it stops
        assert broker.leased() >= 2
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: children stop, pools close
        out, _ = worker.communicate(timeout=60)
    # worker_process_shutdown closed the pools: the leases came back at once
    assert broker.wait_leased(0, 2.0) == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
