"""A worker process for the integration tests: ``python worker.py '<json config>'``.

Modes:
  load   threads x iterations of ``with pool.connection(): SELECT pg_sleep(sleep)``
  idle   open ``n`` connections and keep them idle until stdin closes
  hold   take ``n`` connections, print ``HOLDING <backend pids>``, keep them until
         stdin closes, then give them back and exit cleanly
  mp     a pool used before fork, then by multiprocessing (fork) children
  fork   os.fork() with idle and in-use connections (see fork())
  preexec  subprocesses with preexec_fn while a min_size pool is open
  chaos  transactions until a deadline, outcomes recorded line by line
  aload  like load, with asyncio tasks on the psycopg_pool drop-in's AsyncConnectionPool
  sqlalchemy  like load, through poolbroker_client.sqlalchemy (Core and ORM)
Prints ``RESULT <json>`` at the end.
"""

import faulthandler
import json
import math
import signal
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
        until = time.monotonic() + cfg.get("seconds", math.inf)  # or a number of iterations
        for i in range(cfg.get("iterations", 10**9 if "seconds" in cfg else 10)):
            if i and cfg.get("pause"):
                time.sleep(cfg["pause"])  # thinking, holding no connection
            if time.monotonic() > until:
                break
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


def aload(cfg, _pool):
    import asyncio

    from poolbroker_client.compat.psycopg_pool import AsyncConnectionPool
    from poolbroker_client.compat.psycopg_pool import PoolTimeout as AsyncPoolTimeout

    counts = {"ok": 0, "timeouts": 0, "errors": 0}
    errors = []

    async def run(pool):
        for _ in range(cfg.get("iterations", 10)):
            try:
                async with pool.connection(timeout=cfg.get("timeout", 30)) as conn:
                    await conn.execute("SELECT pg_sleep(%s)", (cfg.get("sleep", 0.01),))
                counts["ok"] += 1
            except AsyncPoolTimeout:
                counts["timeouts"] += 1
            except Exception as exc:  # reported, never swallowed
                counts["errors"] += 1
                errors.append(repr(exc))

    async def main():
        async with AsyncConnectionPool(cfg["dsn"], broker=cfg["broker"], min_size=0,
                                       max_size=cfg.get("max_size", 10),
                                       timeout=cfg.get("timeout", 30)) as pool:
            await asyncio.gather(*(run(pool) for _ in range(cfg.get("tasks", 10))))
            counts["stats"] = pool.get_stats()

    asyncio.run(main())
    counts["error_samples"] = errors[:5]
    return counts


def hold(cfg, pool):
    conns = [pool.getconn(timeout=cfg.get("timeout", 30)) for _ in range(cfg["n"])]
    print("HOLDING " + " ".join(str(c.get_backend_pid()) for c in conns), flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    use_after = []
    for conn in conns:  # what using them now gives (they may have been fenced or cut)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
            use_after.append("ok")
        except psycopg2.Error as exc:
            use_after.append(f"{type(exc).__name__}: {str(exc).strip()}")
        pool.putconn(conn)
    return {"held": len(conns), "use_after": use_after}


def idle(cfg, pool):
    """Open ``n`` connections, return them (idle in the pool), wait for stdin."""
    conns = [pool.getconn() for _ in range(cfg["n"])]
    for conn in conns:
        pool.putconn(conn)
    print("IDLE", flush=True)
    sys.stdin.read()
    return pool.get_stats()


def sqlalchemy_load(cfg, _pool):
    """Like load, through an engine from poolbroker_client.sqlalchemy (URL ``sa_url``):
    Core in half the threads, an ORM session in the other half."""
    from sqlalchemy import Column, Integer, text
    from sqlalchemy.orm import Session, declarative_base

    from poolbroker_client.sqlalchemy import create_engine, leased_pool

    Base = declarative_base()

    class Item(Base):
        __tablename__ = cfg["table"]
        id = Column(Integer, primary_key=True)
        worker = Column(Integer)

    engine = create_engine(cfg["sa_url"], broker=cfg["broker"], timeout=cfg.get("timeout", 30))
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()
    errors = []

    def run(orm):
        import os

        for _ in range(cfg.get("iterations", 10)):
            try:
                if orm:
                    with Session(engine) as session, session.begin():
                        session.add(Item(worker=os.getpid()))
                else:
                    with engine.begin() as conn:
                        conn.execute(text("SELECT pg_sleep(:s)"), {"s": cfg.get("sleep", 0.005)})
                key = "ok"
            except Exception as exc:  # reported, never swallowed
                key = "errors"
                errors.append(repr(exc))
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=run, args=(i % 2 == 1,))
               for i in range(cfg.get("threads", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["error_samples"] = errors[:5]
    counts["stats"] = leased_pool(engine).get_stats()
    engine.dispose()
    return counts


def _mp_child(_):
    pool = _MP_POOL
    with pool.connection(timeout=30) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]


def _mp_with_pool(pool):
    """A task given the pool as its argument (pickled with each task)."""
    import os

    with pool.connection(timeout=30) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    return [os.getpid(), id(pool), pool is _MP_POOL, _client_threads_sigterm()]


def _client_threads_sigterm():
    """{client thread: whether it blocks SIGTERM} in this process, as the kernel
    sees it (/proc). One that does not could take Pool.terminate()'s SIGTERM while
    the main thread, which must run the handler, sleeps in a lock: the child would
    live on."""
    blocks = {}
    for thread in threading.enumerate():
        if thread.name.startswith("poolbroker") and thread.native_id is not None:
            with open(f"/proc/self/task/{thread.native_id}/status") as f:
                blocked = next(int(line.split()[1], 16) for line in f
                               if line.startswith("SigBlk:"))
            blocks[thread.name] = bool(blocked & (1 << (signal.SIGTERM - 1)))
    return blocks


def _mp_init(pool):
    global _MP_POOL
    _MP_POOL = pool


_MP_POOL = None


def mp(cfg, pool):
    """multiprocessing.Pool with the ``start`` method (fork, spawn, forkserver): the
    pool reaches the children through the initializer (pickled, but for fork) and
    as each task's argument; ``terminate`` ends them as ``with Pool()`` does."""
    import multiprocessing

    # the parent holds a connection across the start: children must not inherit it
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        parent_pid = cur.fetchone()[0]
    conn.commit()
    ctx = multiprocessing.get_context(cfg.get("start", "fork"))
    mpool = ctx.Pool(cfg.get("procs", 4), initializer=_mp_init, initargs=(pool,))
    child_pids = mpool.map(_mp_child, range(cfg.get("tasks", 20)))
    passed = mpool.map(_mp_with_pool, [pool] * cfg.get("tasks", 20))
    if cfg.get("terminate"):
        mpool.terminate()  # SIGTERM: what `with Pool()` does on exit
    else:
        mpool.close()  # workers exit normally
    mpool.join()
    with conn.cursor() as cur:  # the parent's session survived the children
        cur.execute("SELECT pg_backend_pid()")
        after = cur.fetchone()[0]
    conn.commit()
    pool.putconn(conn)
    pools_per_child = {}
    for pid, pool_id, same, _ in passed:
        pools_per_child.setdefault(pid, set()).add((pool_id, same))
    return {"parent_pid": parent_pid, "after": after, "child_pids": sorted(set(child_pids)),
            "pools_per_child": sorted(len(v) for v in pools_per_child.values()),
            "task_pool_is_initializer_pool": all(same for _, _, same, _ in passed),
            "client_threads_sigterm": [sorted(blocks.items()) for *_, blocks in passed]}


def _lost_sigterm_child(pool, lock):
    with pool.connection(timeout=30) as conn:  # this child now holds a lease
        with conn.cursor() as cur:
            cur.execute("SELECT 1")

    def stray():  # not one of the client's threads: it does not block signals
        # the main thread is asleep in lock.acquire() by then (nothing can tell us
        # so: it is in a C wait, and a poll of its state would see it wait for
        # the GIL we hold as well)
        time.sleep(0.5)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=stray, daemon=True).start()
    lock.acquire()  # held by the parent: only a signal ends this wait


def lost_sigterm(cfg, pool):
    """A multiprocessing child whose SIGTERM is taken by a thread other than the
    main one while the main thread waits in a multiprocessing lock (what a
    signal landing just before that wait amounts to): the child must still give
    its lease back and die. Returns its exit code (None: still alive)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    lock = ctx.Lock()
    lock.acquire()
    child = ctx.Process(target=_lost_sigterm_child, args=(pool, lock))
    child.start()
    child.join(cfg.get("wait", 15))
    code = child.exitcode
    if code is None:
        child.kill()
        child.join()
    return {"exitcode": code}


def fork(cfg, pool):
    """Fork with one idle and one in-use connection; the child uses the pool, even
    closes the inherited connection by mistake, and exits; the parent's sessions
    must be untouched."""
    import gc
    import os

    idle = pool.getconn()
    busy = pool.getconn()
    idle_pid, busy_pid = idle.get_backend_pid(), busy.get_backend_pid()
    pool.putconn(idle)
    child = os.fork()
    if child == 0:
        code = 0
        try:
            stats = pool.get_stats()
            assert stats["pool_size"] == 0 and stats["pool_available"] == 0, stats
            with pool.connection(timeout=10) as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid()")
                    child_pid = cur.fetchone()[0]
            assert child_pid not in (idle_pid, busy_pid)
            busy.close()  # a mistake users make: must not end the parent's session
            pool.close()
            gc.collect()
        except BaseException as exc:
            print(f"child failed: {exc!r}", file=sys.stderr, flush=True)
            code = 1
        sys.exit(code)  # a normal exit: atexit and finalizers run
    _, status = os.waitpid(child, 0)
    with busy.cursor() as cur:  # the parent's in-use session is alive
        cur.execute("SELECT pg_backend_pid()")
        busy_after = cur.fetchone()[0]
    busy.rollback()
    pool.putconn(busy)
    with pool.connection() as conn:  # and so is the idle one (LIFO: the busy one first)
        conn2 = pool.getconn()
        pids = {conn.get_backend_pid(), conn2.get_backend_pid()}
        for c in (conn, conn2):
            with c.cursor() as cur:
                cur.execute("SELECT 1")
        pool.putconn(conn2)
    return {"child_exit": os.waitstatus_to_exitcode(status), "busy_pid": busy_pid,
            "busy_after": busy_after, "idle_pid": idle_pid, "pids_after": sorted(pids)}


def preexec(cfg, pool):
    """With an open pool that keeps min_size warm, spawn subprocesses with a
    preexec_fn: CPython runs fork hooks in that child before exec, and nothing
    of ours may start there (a thread opening a ZeroMQ context made libzmq abort)."""
    import os
    import subprocess

    pool.wait(10)
    codes = []
    for _ in range(cfg.get("spawns", 10)):
        proc = subprocess.run([sys.executable, "-c", "print('child ok')"],
                              preexec_fn=os.setpgrp, capture_output=True, text=True)
        codes.append((proc.returncode, proc.stdout.strip(), proc.stderr.strip()))
    with pool.connection() as conn:  # and the pool still works here
        conn.cursor().execute("SELECT 1")
    return {"codes": codes}


def chaos(cfg, pool):
    """Transactions until the deadline, each recorded in an outcome file line by
    line (so a SIGKILL loses nothing already recorded): C id = the commit returned,
    R id = an exception reached the caller."""
    import logging
    import os

    # the client's warnings (stalls, lost leases), for the diagnosis of a failure
    logging.basicConfig(filename=cfg["outcomes"] + ".log", level=logging.INFO,
                        format="%(asctime)s %(process)d %(threadName)s %(levelname)s "
                               "%(message)s")
    out = open(cfg["outcomes"], "a", buffering=1)
    deadline = time.monotonic() + cfg["seconds"]

    def run(thread):
        n = 0
        while time.monotonic() < deadline:
            n += 1
            txid = f"{os.getpid()}-{thread}-{n}"
            try:
                with pool.connection(timeout=cfg.get("timeout", 10)) as conn:
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO chaos_tx (id) VALUES (%s)", (txid,))
                        cur.execute("SELECT pg_sleep(%s)", (cfg.get("sleep", 0.01),))
                out.write(f"C {txid}\n")
            except Exception as exc:
                out.write(f"R {txid} {type(exc).__name__}\n")
                time.sleep(0.05)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(cfg.get("threads", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {}


def main():
    # a hung worker's stacks (and its forked children's), for the test's failure message
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    cfg = json.loads(sys.argv[1])
    if cfg.get("log"):  # the client's log on stderr, for a failure's message
        import logging

        logging.basicConfig(level=cfg["log"], format="%(asctime)s %(threadName)s "
                                                     "%(levelname)s %(message)s")
    if cfg.get("app_name"):  # what the broker's quotas match
        import os

        os.environ["POOLBROKER_APPLICATION_NAME"] = cfg["app_name"]
    pool = ConnectionPool(cfg["dsn"], broker=cfg["broker"], pool=cfg.get("pool"),
                          min_size=cfg.get("min_size", 0), max_size=cfg.get("max_size"),
                          timeout=cfg.get("timeout", 30), name=cfg.get("name"))
    mode = {"load": load, "hold": hold, "mp": mp, "fork": fork, "idle": idle,
            "lost_sigterm": lost_sigterm,
            "preexec": preexec, "chaos": chaos, "aload": aload,
            "sqlalchemy": sqlalchemy_load}[cfg["mode"]]
    t0 = time.monotonic()
    result = mode(cfg, pool)
    result["elapsed"] = time.monotonic() - t0
    print("RESULT " + json.dumps(result), flush=True)
    if not cfg.get("no_close"):
        pool.close()
    if cfg.get("hard_exit"):  # no atexit, no bye: as Celery's (billiard's) children end
        import os

        os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except psycopg2.Error as exc:
        print(f"database error: {exc}", file=sys.stderr)
        sys.exit(3)
