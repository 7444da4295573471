"""The README's benchmark commands run from a clone, in a tiny configuration.

Not a measurement: nothing here looks at a time. Each benchmark runs as the
README says (``python -m bench.X`` from the repository's root), with its own
throwaway cluster and broker, and must finish, print its figures and, for the
fleet, never have seen more server connections than the budget (the fleet
samples ``pg_stat_activity`` itself and exits 1 if it did)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import List

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(args: List[str], timeout: float = 240) -> str:
    """``python -m bench...`` from the root; its output (stdout and stderr), or a
    failure that shows it. On a timeout the benchmark's whole process group goes
    (its broker and worker processes with it)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {timeout:g}s:\n{out}")
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out}"
    return out


def test_the_micro_benchmark_runs_and_compares_with_every_anchor():
    out = run_bench(["bench.run", "--quick"])
    for line in ("psycopg2.pool Threaded get+put", "psycopg_pool connection()",
                 "poolbroker compat Threaded get+put", "bare psycopg2.connect",
                 "poolbroker cold getconn (lease+connect)", "raw pyzmq echo, a process of its own",
                 "poolbroker lease() + release"):
        assert line in out, f"{line!r} missing from bench.run's output:\n{out}"


def test_the_scale_benchmark_runs_both_parts():
    out = run_bench(["bench.scale", "--holders", "4", "--leases", "2", "--window", "1",
                     "--lessees", "2", "--seconds", "1"])
    assert "4 processes holding 8 leases" in out, out
    assert "raw pyzmq echo server" in out and "poolbroker lease+release" in out, out


def test_the_fleet_benchmark_writes_its_table_and_keeps_the_budget(tmp_path):
    results = tmp_path / "results"
    out = run_bench(["bench.fleet", "--seconds", "1", "--warmup", "0.5", "--budget", "2",
                     "--processes", "2", "--threads", "3",
                     "--modes", "static,poolbroker,alone", "--out", str(results)])
    assert "BUDGET EXCEEDED" not in out, out
    report = json.loads((results / "fleet.json").read_text(),  # strict: no NaN
                        parse_constant=lambda name: pytest.fail(f"{name} in fleet.json"))
    runs = {(r["mode"], r["load"]) for r in report["runs"]}
    assert runs == {("static", "uniform"), ("poolbroker", "uniform"), ("static", "skewed"),
                    ("poolbroker", "skewed"), ("alone", "skewed")}, runs
    for run in report["runs"]:
        assert run["errors"] == [], run
        assert run["tx"] > 0, f"{run['mode']}/{run['load']} made no transaction"
        assert run["samples"] > 0, "pg_stat_activity must have been sampled"
        assert run["max_server"] <= 2, run
    table = (results / "fleet.md").read_text()
    assert "| poolbroker |" in table and "vs static" in table, table
    try:
        import matplotlib  # noqa: F401  (the bench extra draws the chart)
    except ImportError:
        assert "matplotlib is not installed" in out, out
    else:
        assert (results / "fleet.png").stat().st_size > 0
