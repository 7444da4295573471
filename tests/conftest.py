"""Fixtures with real parts: a throwaway PostgreSQL cluster (one per session), real
broker processes started with pytest-xprocess. The budget is proven by what the
server sees (helpers.Sampler), never by our own counters. Shared helpers live in
helpers.py."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from typing import Dict, List, Optional

import pytest
from xprocess import ProcessStarter

from devtools.pgcluster import PgCluster

from helpers import BrokerHandle, short_ipc


@pytest.fixture(scope="session")
def pg():
    cluster = PgCluster(max_connections=300).start()
    yield cluster
    cluster.stop()


TCP_STATE_DIR = "/tmp/pbt-state"


@pytest.fixture
def broker_factory(xprocess):
    started: List[BrokerHandle] = []

    def start(pools: Optional[Dict[str, int]] = None, ttl: Optional[float] = None,
              url: Optional[str] = None, extra: tuple = (),
              grace: Optional[float] = None) -> BrokerHandle:
        """A broker on ``url`` (default: a new address). Without a state file a
        start holds a grace period; on a new address nothing can be outstanding,
        so it gets ``--grace 0`` unless ``grace`` says otherwise. Tests of restarts
        pass the same ``url`` again and get the real default."""
        if url is None:
            url = short_ipc()
            grace = 0.0 if grace is None else grace
        argv = [sys.executable, "-m", "poolbroker", "serve", "--bind", url, *extra]
        if url.startswith("tcp://") and "--state-dir" not in extra:
            argv += ["--state-dir", TCP_STATE_DIR]  # not the user's real state directory
        if grace is not None:
            argv += ["--grace", str(grace)]
        for name, size in (pools if pools is not None else {"default": 6}).items():
            argv += ["--pool", f"{name}={size}"]
        if ttl is not None:
            argv += ["--ttl", str(ttl)]

        class Starter(ProcessStarter):
            pattern = "poolbroker ready"
            timeout = 20
            terminate_on_interrupt = True
            args = argv
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        name = f"broker-{uuid.uuid4().hex[:8]}"
        pid, log = xprocess.ensure(name, Starter)
        handle = BrokerHandle(url, name, pid, str(log), xprocess)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()
    for path in {h.url[len("ipc://"):] for h in started if h.url.startswith("ipc://")}:
        for leftover in (path, path + ".lock", path + ".state", path + ".admin"):
            try:
                os.unlink(leftover)
            except OSError:
                pass
    shutil.rmtree(TCP_STATE_DIR, ignore_errors=True)


@pytest.fixture
def broker(broker_factory):
    return broker_factory({"default": 6})
