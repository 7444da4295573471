"""What a connection costs the machine, against what a transaction costs it.

    python -m bench.connect_cost [--cycles 300]

Moving a slot between processes costs a close (the backend exits) and a connect
(the server forks and starts a backend). On a small machine that CPU is taken from
every transaction running beside it. This measures, on a throwaway cluster over
TCP: the wall time of a connect + close, the CPU the whole machine spent on it
(``/proc/stat``: this process, the postmaster and the backend), this process's
share, and the same for one ``SELECT pg_sleep(0.002)`` transaction on an open
connection. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Tuple

import psycopg2

from devtools.pgcluster import PgCluster


def machine_cpu() -> float:
    """Seconds of CPU the machine has spent, all cores (not idle, not iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(n: int, step) -> Tuple[float, float, float]:
    """Per call of ``step``: wall, machine CPU and own CPU, in milliseconds."""
    machine, own, t0 = machine_cpu(), _own_cpu(), time.monotonic()
    for _ in range(n):
        step()
    wall, own = time.monotonic() - t0, _own_cpu() - own
    time.sleep(0.2)  # the last backends' exits land in the count
    machine = machine_cpu() - machine
    return 1000 * wall / n, 1000 * machine / n, 1000 * own / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=300)
    args = parser.parse_args()
    with PgCluster() as pg:
        for _ in range(20):  # warm: the server's caches, libpq's
            psycopg2.connect(pg.dsn).close()
        connect = _measure(args.cycles, lambda: psycopg2.connect(pg.dsn).close())
        conn = psycopg2.connect(pg.dsn)
        cur = conn.cursor()

        def transaction() -> None:
            with conn:
                cur.execute("SELECT pg_sleep(0.002)")

        tx = _measure(args.cycles * 5, transaction)
        conn.close()
    print(f"{'':16} {'wall ms':>8} {'machine CPU ms':>15} {'client CPU ms':>14}")
    for name, (wall, machine, own) in (("connect + close", connect), ("transaction", tx)):
        print(f"{name:16} {wall:8.2f} {machine:15.2f} {own:14.2f}")
    print(f"a connect + close costs the machine {connect[1] / tx[1]:.0f} transactions' CPU "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
