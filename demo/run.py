"""The main job: a broker and a demo fleet against a throwaway PostgreSQL, showing
that the budget holds.

A preloaded gunicorn web app (4 workers x 4 threads) under load and a
multiprocessing batch job (4 processes) share one budget (default 4). Without
poolbroker each would size its own pools: 4 workers x 4 + 4 = 20 connections.
pg_stat_activity is sampled every 10 ms and the maximum is compared with the budget.
Midway, one web worker holding a lease is SIGKILLed: gunicorn's master reports it
(the poolbroker_client.gunicorn hook) and the fencing broker frees its slot once its
backend is gone; the demo prints how long that took.

    python -m demo.run [--budget 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from devtools.pgcluster import PgCluster, free_port
from devtools.sampler import Sampler
from poolbroker.cli import query_status
from poolbroker.top import run as run_top

TAG = "pb-demo"


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the web fleet did not come up at {url}") from None
            time.sleep(0.1)


def _kill_a_web_worker(url: str, master: int, dropped: list) -> int:
    """SIGKILL a gunicorn worker that holds a lease and print how long its slot
    took to come back (the master's exit report, then fencing). Returns how many
    requests were dropped (their connection closed without an answer) in the
    second after the kill: those the worker had accepted when it died."""
    workers = subprocess.run(["pgrep", "-P", str(master)], capture_output=True,
                             text=True).stdout.split()
    status = query_status(url)
    holders = [c for c in status["clients"]
               if str(c["pid"]) in workers and c["leases"].get("default")]
    if not holders:
        print("(no web worker holds a lease right now: nothing to kill)\n")
        return 0
    victim = holders[0]
    before = dropped[0]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    print(f"$ kill -9 {victim['pid']}   # a web worker holding "
          f"{victim['leases']['default']} lease(s)")
    while time.monotonic() - t0 < 10:
        status = query_status(url)
        gone = all(c["pid"] != victim["pid"] for c in status["clients"])
        if gone and not status["pools"]["default"]["fencing"]:
            break
        time.sleep(0.005)
    took = time.monotonic() - t0
    ttl = status["ttl"]
    print(f"its slot(s) were free again after {took * 1000:.0f} ms (reported by gunicorn's "
          f"master, its backend gone from pg_stat_activity; the TTL is {ttl:g} s)\n",
          flush=True)
    time.sleep(max(0.0, 1.0 - took))
    return dropped[0] - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs: list = []
    with PgCluster() as pg:
        url = f"ipc:///tmp/pb-demo-{uuid.uuid4().hex[:8]}.sock"
        env = {**os.environ, "POOLBROKER_URL": url, "PYTHONPATH": root,
               "PB_DSN": f"{pg.dsn} application_name={TAG}"}
        print(f"PostgreSQL: {pg.dsn} (throwaway, in {pg.dir})")
        try:
            broker = subprocess.Popen(
                [sys.executable, "-m", "poolbroker", "serve", "--bind", url,
                 "--pool", f"default={args.budget}", "--fence-dsn", pg.dsn,
                 "--grace", "0"],  # a throwaway address: no earlier run left leases
                env=env)
            procs.append(broker)
            port = free_port()
            web = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "python:poolbroker_client.gunicorn",
                 "--preload", "-w", "4", "--threads", "4",
                 "-b", f"127.0.0.1:{port}", "--log-level", "warning", "demo.webapp:app"],
                env={**env, "POOLBROKER_APPLICATION_NAME": "web"})
            procs.append(web)
            site = f"http://127.0.0.1:{port}/"
            _wait_http(site, web)
            print(f"web fleet: gunicorn --preload, 4 workers x 4 threads at {site}")
            print("batch job: 4 multiprocessing workers")
            print(f"budget: {args.budget} connections for all of them "
                  "(separate pools would want 4 x 4 + 4 = 20)\n")

            batch = subprocess.Popen(
                [sys.executable, "-m", "demo.batch", "4", str(args.seconds)],
                env={**env, "POOLBROKER_APPLICATION_NAME": "batch"},
                stdout=subprocess.PIPE, text=True)
            procs.append(batch)
            ok = [0]
            failed = [0]  # error answers (a pool timeout would be a 500)
            dropped = [0]  # connection closed without an answer: the worker died
            stop = threading.Event()

            def hit() -> None:
                while not stop.is_set():
                    try:
                        urllib.request.urlopen(site, timeout=60).read()
                        ok[0] += 1
                    except urllib.error.HTTPError:
                        failed[0] += 1
                    except (OSError, http.client.HTTPException):
                        dropped[0] += 1

            with Sampler(pg.dsn, [TAG], interval=0.01) as sampler:
                with ThreadPoolExecutor(32) as ex:
                    for _ in range(32):
                        ex.submit(hit)
                    start = time.monotonic()
                    shown_top = killed = False
                    lost = 0
                    while time.monotonic() - start < args.seconds:
                        time.sleep(1.0)
                        print(f"t={time.monotonic() - start:4.1f}s  server connections: "
                              f"max seen {sampler.max[TAG]} / budget {args.budget}  "
                              f"web requests ok {ok[0]}  failed {failed[0]}  "
                              f"dropped {dropped[0]}", flush=True)
                        if not shown_top and time.monotonic() - start >= args.seconds / 2:
                            shown_top = True  # what an operator sees mid-run
                            print(f"\n$ poolbroker top --broker {url} --once --rows 8")
                            run_top(lambda: query_status(url, leases=True), url, once=True,
                                    interval=1.0, rows=8)
                            print(flush=True)
                        elif shown_top and not killed:
                            killed = True
                            lost = _kill_a_web_worker(url, web.pid, dropped)
                    stop.set()
                batch_out, _ = batch.communicate(timeout=60)
            web.send_signal(signal.SIGTERM)
            web.wait(30)
            done = [line for line in batch_out.splitlines() if line.startswith("BATCH ")]
            deadline = time.monotonic() + 2.0  # the last releases are on their way
            status = query_status(url)
            while status["pools"]["default"]["leased"] and time.monotonic() < deadline:
                time.sleep(0.05)
                status = query_status(url)
            print(f"\nweb requests served: {ok[0]} ok, {failed[0]} failed, {dropped[0]} "
                  f"dropped ({lost} by the killed worker)")
            print(f"batch transactions: {done[0].split()[1] if done else '?'}")
            print(f"pg_stat_activity samples: {sampler.samples}, "
                  f"max server connections seen: {sampler.max[TAG]}")
            print(f"broker after the fleet exited: {status['pools']['default']['leased']} "
                  f"leased, {len(status['clients'])} clients")
            # the requests the killed worker had accepted die with it (gunicorn's
            # threaded worker accepts more than its threads run); any error answer,
            # or a dropped request at any other time, is a failure
            bad = failed[0] + dropped[0] - lost
            held = sampler.max[TAG] <= args.budget and bad == 0
            verdict = "OK: the budget held" if held else "FAILED"
            print(f"\n{verdict}: max {sampler.max[TAG]} server connections, budget "
                  f"{args.budget}, {bad} failed requests (besides the {lost} the killed "
                  "worker had accepted)")
            return 0 if held else 1
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()


if __name__ == "__main__":
    sys.exit(main())
