"""Prometheus metrics for ``poolbroker serve --metrics HOST:PORT``.

An HTTP thread (prometheus-client's) serves ``/metrics``. The ledger belongs to the
broker's loop, so a scrape does not read it: it asks the loop for a snapshot (the
same data as ``poolbroker status``) and waits up to ``SCRAPE_WAIT`` seconds. A loop
that does not answer in time yields ``poolbroker_up 0`` and nothing else, which is
what an alert should fire on.

Needs the optional dependency prometheus-client: ``pip install 'poolbroker[metrics]'``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

log = logging.getLogger("poolbroker")

SCRAPE_WAIT = 2.0

# per pool: (metric, help, key in the status data)
_POOL_GAUGES = (
    ("poolbroker_pool_max", "The pool's budget: leases it may grant at once", "max"),
    ("poolbroker_pool_leased", "Leases counted against the budget now", "leased"),
    ("poolbroker_pool_busy", "Leased connections in use", "busy"),
    ("poolbroker_pool_idle", "Leased connections idle in their clients' local pools", "idle"),
    ("poolbroker_pool_waiting", "Lease requests queued", "waiting"),
    ("poolbroker_pool_clients", "Client processes holding or wanting leases", "clients"),
    ("poolbroker_pool_fencing", "Leases of expired clients whose backends are being ended",
     "fencing"),
    ("poolbroker_pool_unconfirmed", "Leases given back without proof the server saw "
     "their connections close (still counted)", "unconfirmed"),
)
_POOL_COUNTERS = (
    ("poolbroker_grants", "Leases granted", "grants"),
    ("poolbroker_recalls", "Leases asked back from clients", "recalls"),
    ("poolbroker_expiries", "Leases expired with a client that went silent or died",
     "expired"),
    ("poolbroker_timeouts", "Lease requests that waited until their deadline", "timeouts"),
)


class MetricsError(RuntimeError):
    """``--metrics`` cannot work: prometheus-client is not installed, or the
    address cannot be bound."""


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for all interfaces) -> (host, port); ValueError
    names what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address must be HOST:PORT (e.g. 127.0.0.1:9187), "
                         f"not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class BrokerCollector:
    """Turns a status snapshot into metric families; ``fetch`` returns the
    snapshot, or None when the broker's loop did not answer in time."""

    def __init__(self, fetch: Callable[[], Optional[Dict[str, Any]]]) -> None:
        self.fetch = fetch

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        data = self.fetch()
        up = GaugeMetricFamily("poolbroker_up", "1 if the broker's loop answered this scrape")
        up.add_metric([], 0 if data is None else 1)
        yield up
        if data is None:
            return
        pools = data["pools"]
        for metric, text, key in _POOL_GAUGES:
            gauge = GaugeMetricFamily(metric, text, labels=["pool"])
            for name, pool in sorted(pools.items()):
                gauge.add_metric([name], pool[key])
            yield gauge
        for metric, text, key in _POOL_COUNTERS:
            counter = CounterMetricFamily(metric, text, labels=["pool"])
            for name, pool in sorted(pools.items()):
                counter.add_metric([name], pool[key])
            yield counter
        wait = HistogramMetricFamily(
            "poolbroker_lease_wait_seconds",
            "How long granted lease requests waited at the broker", labels=["pool"])
        for name, pool in sorted(pools.items()):
            buckets = [(_le(bound), n) for bound, n in pool["wait_buckets"]]
            buckets.append(("+Inf", pool["wait_count"]))
            wait.add_metric([name], buckets, pool["wait_sum"])
        yield wait
        for metric, text, value in (
            ("poolbroker_fence_terminations", "Backends of expired leases terminated",
             data.get("fence_terminated", 0)),
            ("poolbroker_bad_frames", "Frames refused as malformed or hostile",
             data["bad_frames"]),
        ):
            counter = CounterMetricFamily(metric, text)
            counter.add_metric([], value)
            yield counter
        clients = GaugeMetricFamily("poolbroker_clients", "Client processes connected")
        clients.add_metric([], len(data["clients"]))
        yield clients
        info = GaugeMetricFamily("poolbroker_epoch_info",
                                 "The broker run's epoch (changes on every restart)",
                                 labels=["epoch"])
        info.add_metric([data["epoch"]], 1)
        yield info
        uptime = GaugeMetricFamily("poolbroker_uptime_seconds", "Seconds since the broker "
                                   "started")
        uptime.add_metric([], data["uptime_s"])
        yield uptime


def _le(bound: float) -> str:
    return repr(float(bound))


class MetricsServer:
    """``/metrics`` on ``address`` (HOST:PORT) until :meth:`stop`."""

    def __init__(self, address: str, fetch: Callable[[], Optional[Dict[str, Any]]]) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise MetricsError(
                "--metrics needs prometheus-client: pip install 'poolbroker[metrics]'"
            ) from None
        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(fetch))
        # its own registry: no process or GC metrics of whoever imported us
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {address}: {exc}") from None
        self.address = f"{host}:{self._server.server_port}"
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class SnapshotExchange:
    """Hands snapshots from the loop's thread to scrapers on other threads:
    :meth:`ask` (any thread) waits for the loop to call :meth:`serve`."""

    def __init__(self, poke: Callable[[], None]) -> None:
        self._poke = poke
        self._lock = threading.Lock()
        self._pending: list = []

    def ask(self, timeout: float = SCRAPE_WAIT) -> Optional[Dict[str, Any]]:
        box: Dict[str, Any] = {"done": threading.Event(), "data": None}
        with self._lock:
            self._pending.append(box)
        self._poke()
        if not box["done"].wait(timeout):
            log.warning("metrics: the broker's loop did not answer a scrape within %.1fs",
                        timeout)
            return None
        return box["data"]

    @property
    def wanted(self) -> bool:
        return bool(self._pending)  # a racy read is fine: the poke wakes us again

    def serve(self, make: Callable[[], Dict[str, Any]]) -> None:
        """Loop thread: answer every scraper waiting."""
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            data = make()
            for box in pending:
                box["data"] = data
                box["done"].set()
