"""Chaos: a fleet under load while workers are SIGKILLed, frozen (SIGSTOP) and
resumed, the broker is killed and restarted or frozen for longer than the lease
TTL, and PostgreSQL restarts.

Checked against the server, not our counters:
- pg_stat_activity, sampled every 10 ms, never shows more than the budget (fencing on);
- every transaction whose commit returned is in the table (none lost); the others
  raised to their caller;
- at the end every lease is accounted for: 0 leased once the fleet has exited.

Short by default (CI); longer with POOLBROKER_CHAOS_SECONDS=300. The random seed is
printed and can be replayed with POOLBROKER_CHAOS_SEED.
"""

import collections
import glob
import json
import os
import random
import signal
import time

import psycopg2
import pytest

from helpers import Sampler, Worker, new_tag, short_ipc, tagged

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("POOLBROKER_CHAOS_SECONDS", "20"))
BUDGET = 4
TTL = 2.0
FLEET = 5


def _admin(pg, sql):
    conn = psycopg2.connect(pg.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall() if cur.description else None
    conn.close()
    return rows


def test_chaos(pg, broker_factory, tmp_path):
    seed = int(os.environ.get("POOLBROKER_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed}, {SECONDS:g}s")
    rng = random.Random(seed)
    _admin(pg, "DROP TABLE IF EXISTS chaos_tx; CREATE TABLE chaos_tx (id text PRIMARY KEY)")
    url = short_ipc("pbc")
    extra = ("--fence-dsn", pg.dsn)
    broker = broker_factory({"default": BUDGET}, ttl=TTL, url=url, extra=extra)
    tag = new_tag()
    end = time.monotonic() + SECONDS
    spawned = [0]

    def spawn():
        spawned[0] += 1
        return Worker(dict(mode="chaos", dsn=tagged(pg.dsn, tag), broker=url, threads=3,
                           seconds=max(0.5, end - time.monotonic()), timeout=10,
                           outcomes=str(tmp_path / f"w{spawned[0]}.txt")))

    fleet = [spawn() for _ in range(FLEET)]
    frozen = {}  # worker -> when to resume it
    faults = collections.Counter()
    log = []  # (time, fault) for the diagnosis of a failure
    with Sampler(pg.dsn, [tag], interval=0.01, limit=BUDGET) as sampler:
        while time.monotonic() < end - 1.0:
            time.sleep(rng.uniform(0.3, 1.0))  # pacing between faults
            for w, when in list(frozen.items()):
                if time.monotonic() >= when:
                    w.proc.send_signal(signal.SIGCONT)
                    del frozen[w]
            fault = rng.choices(["kill_worker", "freeze_worker", "restart_broker",
                                 "freeze_broker", "restart_postgres", "none"],
                                weights=[3, 3, 2, 1, 1, 1])[0]
            live = [w for w in fleet if w.proc.poll() is None and w not in frozen]
            if fault == "kill_worker" and live:
                victim = rng.choice(live)
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                fleet.remove(victim)
                fleet.append(spawn())
            elif fault == "freeze_worker" and live:
                victim = rng.choice(live)
                victim.proc.send_signal(signal.SIGSTOP)
                frozen[victim] = time.monotonic() + rng.uniform(0.5, 2.5 * TTL)
            elif fault == "restart_broker":
                broker.kill(signal.SIGKILL)
                time.sleep(rng.uniform(0, 1.0))  # the broker stays away a while
                broker = broker_factory({"default": BUDGET}, ttl=TTL, url=url, extra=extra)
            elif fault == "freeze_broker":
                # longer than the TTL: on waking it must expire nobody for it
                os.kill(broker.pid, signal.SIGSTOP)
                time.sleep(rng.uniform(1.2 * TTL, 2.5 * TTL))  # the fault is the duration
                os.kill(broker.pid, signal.SIGCONT)
            elif fault == "restart_postgres":
                pg.restart()
            else:
                fault = "none"
            faults[fault] += 1
            log.append((round(time.time(), 3), fault))
        for w in frozen:
            w.proc.send_signal(signal.SIGCONT)
        frozen.clear()
        for w in fleet:
            w.proc.wait(60)
    # the fleet is gone: every lease must come back (killed ones after TTL + fencing)
    status = broker.wait_for(lambda s: s["pools"]["default"]["leased"] == 0, 4 * TTL + 10)

    committed, raised = set(), collections.Counter()
    for path in glob.glob(str(tmp_path / "w*.txt")):
        with open(path) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "C":
                    committed.add(parts[1])
                elif len(parts) >= 3 and parts[0] == "R":
                    raised[parts[2]] += 1
    in_table = {row[0] for row in _admin(pg, "SELECT id FROM chaos_tx")}
    lost = committed - in_table
    report = {"seed": seed, "seconds": SECONDS, "budget": BUDGET, "workers": spawned[0],
              "faults": dict(faults), "max_connections_seen": sampler.max_total,
              "samples": sampler.samples, "committed": len(committed),
              "raised": dict(raised), "lost": len(lost),
              "leased_at_end": status["pools"]["default"]["leased"],
              "broker_errors": {k: status.get(k) for k in ("frame_errors", "loop_errors",
                                                           "fence_errors", "fence_stuck")}}
    print("CHAOS " + json.dumps(report, sort_keys=True))
    # next to the test's other files, never in the repository
    with open(tmp_path / "chaos-report.json", "w") as fh:
        json.dump(report, fh, sort_keys=True)
    print("chaos report:", tmp_path / "chaos-report.json")
    assert sampler.samples > SECONDS * 20, "the sampler must have watched the run"
    assert sum(faults.values()) - faults["none"] >= 3, "the run must have injected faults"
    if len(committed) <= 50 or sampler.max_total > BUDGET:  # what the diagnosis needs
        if sampler.max_total > BUDGET:
            print("OVER BUDGET samples:", json.dumps(sampler.violations, indent=1))
        print("faults:", log)
        for path in sorted(glob.glob(str(tmp_path / "w*.txt.log"))):  # the clients' side
            with open(path) as fh:
                print(path, "".join(line for line in fh if "WARNING" in line)[-3000:])
        print("the broker's log:", broker.log_text()[-5000:])
    assert len(committed) > 50, f"the fleet must have done work: {report}"
    assert sampler.max_total <= BUDGET, report
    assert not lost, f"commits that returned but are not in the table: {sorted(lost)[:5]}"
    assert status["pools"]["default"]["leased"] == 0, report
    assert status["frame_errors"] == 0 and status["loop_errors"] == 0, report
