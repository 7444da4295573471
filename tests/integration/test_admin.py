"""Orderly changes at run time: resize, SIGHUP reload, drain, pause and resume."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from poolbroker_client import BrokerError, ConnectionPool

from helpers import Sampler, Worker, count_backends, new_tag, tagged

pytestmark = pytest.mark.integration


def cli(*args):
    return subprocess.run([sys.executable, "-m", "poolbroker", *args], capture_output=True,
                          text=True, timeout=30)


def test_resize_shrinks_by_recalling_idle_leases_and_grows_for_waiters(pg, broker_factory):
    broker = broker_factory({"default": 4})
    tag = new_tag()
    holder = Worker(dict(mode="idle", n=4, dsn=tagged(pg.dsn, tag), broker=broker.url))
    holder.wait_line("IDLE")
    assert broker.leased() == 4
    out = cli("resize", "--broker", broker.url, "--pool", "default=2")
    assert out.returncode == 0 and "max 4 -> 2" in out.stdout, out.stderr
    # the idle connections are recalled (their heartbeat reports them idle)
    status = broker.wait_for(lambda s: s["pools"]["default"]["leased"] == 2, 10)
    assert status["pools"]["default"] == {**status["pools"]["default"], "max": 2, "leased": 2}
    assert count_backends(pg.dsn, tag) == 2
    # growing again serves a waiter at once
    with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=20) as pool:
        got = []
        # the holder's 2 idle connections fill max 2; ask for a third slot
        waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
        with Sampler(pg.dsn, [tag]) as sampler:
            cli("resize", "--broker", broker.url, "--pool", "default=3")
            waiter.start()
            waiter.join(10)
            assert got
            pool.putconn(got[0])
        assert sampler.max[tag] <= 3
    holder.finish()
    holder.result()


def test_sighup_reloads_the_config_file(pg, broker_factory, tmp_path):
    config = tmp_path / "poolbroker.toml"
    config.write_text("[pools]\ndefault = 2\nreports = 1\n")
    broker = broker_factory({}, extra=("--config", str(config)))
    assert {n: p["max"] for n, p in broker.status()["pools"].items()} == {
        "default": 2, "reports": 1}
    config.write_text("[pools]\ndefault = 5\nbatch = 3\n")
    os.kill(broker.pid, signal.SIGHUP)
    status = broker.wait_for(lambda s: "batch" in s["pools"], 5)
    assert status["pools"]["default"]["max"] == 5 and status["pools"]["batch"]["max"] == 3
    assert status["pools"]["reports"]["draining"]  # no longer configured
    # a broken file is logged and ignored; the broker keeps serving
    config.write_text("[pools\nnot toml")
    os.kill(broker.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "keeping the current configuration" not in broker.log_text():
        assert time.monotonic() < deadline, "the broker did not report the broken file"
        time.sleep(0.02)
    assert broker.status()["pools"]["default"]["max"] == 5


def test_drain_refuses_new_leases_and_closes_idle_ones_then_resume(pg, broker_factory):
    broker = broker_factory({"default": 3})
    tag = new_tag()
    holder = Worker(dict(mode="idle", n=2, dsn=tagged(pg.dsn, tag), broker=broker.url))
    holder.wait_line("IDLE")
    out = cli("drain", "--broker", broker.url, "--pool", "default")
    assert out.returncode == 0, out.stderr
    status = broker.wait_for(lambda s: s["pools"]["default"]["leased"] == 0, 5)
    assert status["pools"]["default"]["leased"] == 0 and status["pools"]["default"]["draining"]
    assert count_backends(pg.dsn, tag) == 0
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=5) as pool:
        with pytest.raises(BrokerError, match="draining"):
            pool.getconn()
        assert cli("resume", "--broker", broker.url, "--pool", "default").returncode == 0
        with pool.connection():
            pass
    holder.finish()
    holder.result()


def test_pause_makes_requests_wait_until_resume(pg, broker_factory):
    broker = broker_factory({"default": 3})
    assert cli("pause", "--broker", broker.url, "--pool", "default").returncode == 0
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=20) as pool:
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
        waiter.start()
        status = broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 1, 5)
        assert status["pools"]["default"]["paused"] and not got
        assert cli("resume", "--broker", broker.url, "--pool", "default").returncode == 0
        waiter.join(10)
        assert got
        pool.putconn(got[0])


def test_admin_on_an_unknown_pool_names_it(broker):
    out = cli("drain", "--broker", broker.url, "--pool", "nope")
    assert out.returncode == 1 and "'nope'" in out.stderr


def test_quotas_from_the_config_file_cap_batch_and_keep_web_s_reserve(
        pg, broker_factory, tmp_path):
    """Budget 4; clients named batch* hold at most 2 together, web* keep 1 slot
    nobody else takes. Three batch workers hammer the pool; an "other" worker too;
    a web worker arriving later is served at once from its reserve. Counted in
    pg_stat_activity by tag; the quotas are reported in status."""
    config = tmp_path / "poolbroker.toml"
    config.write_text('[pools]\ndefault = 4\n[quotas.default]\n"batch*" = { max = 2 }\n'
                      '"web*" = { reserve = 1 }\n')
    broker = broker_factory({}, extra=("--config", str(config)))
    batch_tag, other_tag, web_tag = new_tag(), new_tag(), new_tag()
    with Sampler(pg.dsn, [batch_tag, other_tag, web_tag]) as sampler, \
            Sampler(pg.dsn, [batch_tag, other_tag]) as not_web:
        hogs = [Worker(dict(mode="load", dsn=tagged(pg.dsn, batch_tag), broker=broker.url,
                            app_name=f"batch-{i}", threads=2, iterations=60, sleep=0.01,
                            timeout=60)) for i in range(3)]
        other = Worker(dict(mode="load", dsn=tagged(pg.dsn, other_tag), broker=broker.url,
                            app_name="reports", threads=3, iterations=40, sleep=0.01,
                            timeout=60))
        status = broker.wait_for(lambda s: s["pools"]["default"]["leased"] >= 3, 10)
        web = Worker(dict(mode="load", dsn=tagged(pg.dsn, web_tag), broker=broker.url,
                          app_name="web", threads=1, iterations=20, sleep=0.005,
                          timeout=1)).result()
        results = [w.result() for w in hogs + [other]]
    assert web["ok"] == 20 and web["timeouts"] == 0, web
    assert all(r["timeouts"] == 0 and r["errors"] == 0 for r in results), results
    assert sampler.max[batch_tag] <= 2, sampler.max  # the cap
    assert not_web.max_total <= 3, not_web.max  # web's reserve is web's alone
    assert sampler.max_total <= 4
    quotas = status["pools"]["default"]["quotas"]
    assert [(q["pattern"], q["max"], q["reserve"]) for q in quotas] == [
        ("batch*", 2, 0), ("web*", None, 1)]
