"""A worker process for the integration tests: ``python worker.py '<json config>'``.

Modes:
  load   threads x iterations of ``with pool.connection(): SELECT pg_sleep(sleep)``
  hold   take ``n`` connections, print ``HOLDING <backend pids>``, keep them until
         stdin closes, then give them back and exit cleanly
  mp     a pool created before fork, used by multiprocessing (fork) children
Prints ``RESULT <json>`` at the end.
"""

import json
import sys
import threading
import time

import psycopg2

from poolbroker_client import ConnectionPool, PoolTimeout


def load(cfg, pool):
    counts = {"ok": 0, "timeouts": 0, "errors": 0}
    lock = threading.Lock()
    errors = []

    def run():
        for _ in range(cfg.get("iterations", 10)):
            try:
                with pool.connection(timeout=cfg.get("timeout", 30)) as conn:
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_sleep(%s)", (cfg.get("sleep", 0.01),))
                key = "ok"
            except PoolTimeout:
                key = "timeouts"
            except Exception as exc:  # reported, never swallowed
                key = "errors"
                errors.append(repr(exc))
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=run) for _ in range(cfg.get("threads", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["error_samples"] = errors[:5]
    counts["stats"] = pool.get_stats()
    return counts


def hold(cfg, pool):
    conns = [pool.getconn(timeout=cfg.get("timeout", 30)) for _ in range(cfg["n"])]
    print("HOLDING " + " ".join(str(c.get_backend_pid()) for c in conns), flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    for conn in conns:
        pool.putconn(conn)
    return {"held": len(conns)}


def _mp_child(_):
    pool = _MP_POOL
    with pool.connection(timeout=30) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]


_MP_POOL = None


def mp(cfg, pool):
    import multiprocessing

    global _MP_POOL
    _MP_POOL = pool
    # the parent uses the pool before forking: children must not inherit that
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            parent_pid = cur.fetchone()[0]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(cfg.get("procs", 4)) as mpool:
        child_pids = mpool.map(_mp_child, range(cfg.get("tasks", 20)))
    with pool.connection() as conn:  # the parent's connection survived the children
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            after = cur.fetchone()[0]
    return {"parent_pid": parent_pid, "after": after, "child_pids": sorted(set(child_pids))}


def main():
    cfg = json.loads(sys.argv[1])
    pool = ConnectionPool(cfg["dsn"], broker=cfg["broker"], pool=cfg.get("pool"),
                          max_size=cfg.get("max_size"), timeout=cfg.get("timeout", 30),
                          name=cfg.get("name"))
    mode = {"load": load, "hold": hold, "mp": mp}[cfg["mode"]]
    t0 = time.monotonic()
    result = mode(cfg, pool)
    result["elapsed"] = time.monotonic() - t0
    print("RESULT " + json.dumps(result), flush=True)
    if not cfg.get("no_close"):
        pool.close()


if __name__ == "__main__":
    try:
        main()
    except psycopg2.Error as exc:
        print(f"database error: {exc}", file=sys.stderr)
        sys.exit(3)
