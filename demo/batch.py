"""The demo's batch job: multiprocessing workers sharing the same budget as the web
fleet. ``python -m demo.batch PROCS SECONDS`` prints ``BATCH <transactions>``."""

import multiprocessing
import os
import sys
import time

from poolbroker_client import ConnectionPool

pool = ConnectionPool(os.environ["PB_DSN"], timeout=30, name="batch")


def job(seconds: float) -> int:
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM generate_series(1, 20000)")
        done += 1
    return done


def main() -> None:
    procs, seconds = int(sys.argv[1]), float(sys.argv[2])
    ctx = multiprocessing.get_context("fork")
    workers = ctx.Pool(procs)
    done = sum(workers.map(job, [seconds] * procs))
    workers.close()
    workers.join()
    print(f"BATCH {done}", flush=True)


if __name__ == "__main__":
    main()
