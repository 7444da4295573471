"""``poolbroker serve --metrics HOST:PORT``: Prometheus scrapes per-pool gauges,
counters and the lease wait histogram, read from a real broker serving real
worker processes; the leased gauge agrees with the server's own count."""

import subprocess
import sys
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import poolbroker_client
from devtools.pgcluster import free_port
from poolbroker_client import PoolTimeout

from helpers import Worker, count_backends, new_tag, tagged

pytestmark = pytest.mark.integration


def scrape(address: str) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def one(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_follow_grants_waits_timeouts_and_bad_frames(pg, broker_factory):
    address = f"127.0.0.1:{free_port()}"
    broker = broker_factory({"default": 2, "reports": 1}, extra=("--metrics", address))
    tag = new_tag()
    cfg = {"mode": "hold", "n": 2, "dsn": tagged(pg.dsn, tag), "broker": broker.url}
    holder = Worker(cfg)
    holder.wait_line("HOLDING")
    m = scrape(address)
    assert one(m, "poolbroker_up") == 1
    assert one(m, "poolbroker_pool_max", pool="default") == 2
    assert one(m, "poolbroker_pool_max", pool="reports") == 1
    assert one(m, "poolbroker_pool_leased", pool="default") == count_backends(pg.dsn, tag) == 2
    assert one(m, "poolbroker_pool_busy", pool="default") == 2
    assert one(m, "poolbroker_grants_total", pool="default") == 2
    assert one(m, "poolbroker_lease_wait_seconds_count", pool="default") == 2
    epoch = broker.status()["epoch"]
    assert one(m, "poolbroker_epoch_info", epoch=epoch) == 1
    assert one(m, "poolbroker_uptime_seconds") > 0

    # a request that times out at the broker, and one that waits and is served
    with pytest.raises(PoolTimeout):
        with poolbroker_client.lease(broker=broker.url, timeout=0.2):
            pass
    # the timed-out request has left the queue (the client's cancel, or the
    # broker's deadline) before the waiter comes: else ``waiting == 1`` below
    # could be that request's, not the waiter's
    left = broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 0
                           and s["pools"]["default"]["timeouts"] == 1, timeout=20)
    assert (left["pools"]["default"]["waiting"], left["pools"]["default"]["timeouts"]) == (0, 1)
    waiter = Worker({**cfg, "n": 1})
    broker.wait_for(lambda s: s["pools"]["default"]["waiting"] == 1, timeout=20)
    assert one(scrape(address), "poolbroker_pool_waiting", pool="default") == 1
    holder.finish()
    waiter.wait_line("HOLDING")
    m = scrape(address)
    assert one(m, "poolbroker_timeouts_total", pool="default") == 1
    assert one(m, "poolbroker_grants_total", pool="default") == 3
    assert one(m, "poolbroker_lease_wait_seconds_count", pool="default") == 3
    # the served waiter waited for the holder to finish: not in the 1 ms bucket
    assert one(m, "poolbroker_lease_wait_seconds_bucket", pool="default", le="0.001") == 2
    assert one(m, "poolbroker_lease_wait_seconds_sum", pool="default") > 0.001
    # the holder's other lease comes back with its exit, just after the grant
    assert broker.wait_leased(1, 5) == 1
    assert one(scrape(address), "poolbroker_pool_leased", pool="default") == 1

    # garbage on the broker's socket is counted
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.url)
    sock.send(b"\xc1 not msgpack")
    assert sock.poll(5000), "the broker answers garbage with an error"
    sock.close(0)
    assert one(scrape(address), "poolbroker_bad_frames_total") == 1
    waiter.finish()
    assert waiter.result()["use_after"] == ["ok"]
    assert holder.result()["use_after"] == ["ok", "ok"]
    broker.wait_leased(0, timeout=10)


def test_the_metrics_address_comes_from_the_config_file_or_the_environment(
        broker_factory, tmp_path, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "broker.toml"
    config.write_text(f'metrics = "{address}"\n[pools]\ndefault = 3\n')
    broker_factory(None, extra=("--config", str(config)))
    assert one(scrape(address), "poolbroker_pool_max", pool="default") == 6  # --pool wins
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("POOLBROKER_METRICS", address)
    broker_factory({"default": 3})
    assert one(scrape(address), "poolbroker_pool_max", pool="default") == 3


@pytest.mark.parametrize("address, expect", [
    ("localhost", "must be HOST:PORT"),
    ("127.0.0.1:99999", "must be HOST:PORT"),
])
def test_a_bad_metrics_address_stops_the_broker_at_start(address, expect):
    run = subprocess.run(
        [sys.executable, "-m", "poolbroker", "serve", "--bind", "ipc:///tmp/pbt-never.sock",
         "--pool", "default=1", "--metrics", address],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and expect in run.stderr, run.stderr


def test_a_metrics_port_in_use_stops_the_broker_at_start():
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        run = subprocess.run(
            [sys.executable, "-m", "poolbroker", "serve", "--bind",
             "ipc:///tmp/pbt-never2.sock", "--grace", "0", "--pool", "default=1",
             "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert run.returncode == 2, run.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in run.stderr
