"""Fleet benchmark: one connection budget, several processes, three ways to share it.

    python -m bench.fleet [--seconds 8] [--budget 8] [--processes 4] [--threads 12]
                          [--repeat 1]

With ``--repeat N`` every mode and load runs N times, in turn (so that a slow
spell of a shared machine falls on all of them); the table shows each one's
median run, with the range of its tx/s, and the JSON keeps every run.

Each mode runs the same fleet against its own database of one throwaway cluster, so
``pg_stat_activity`` tells the modes apart:

- **static**: ``psycopg2.pool.ThreadedConnectionPool(B/P, B/P)`` in each process;
- **pgbouncer**: transaction mode, pool size B, one client connection per thread
  (installed with ``apt-get install pgbouncer`` when missing and possible; skipped
  with a note otherwise);
- **poolbroker**: ``poolbroker_client.ConnectionPool`` in each process, leasing from
  one broker with budget B;
- **poolbroker+reserve** (skewed load only): the same, with a quota
  (:mod:`poolbroker.quotas`) keeping ``--light-reserve`` slots (default 1) for the
  light processes: that slot moves among them and the busy process keeps the rest.
  Tuned for this load, unlike the other modes;
- **alone** and **alone-1** (skewed load only): bounds, not ways to share. The
  busy process by itself, no light process running, with poolbroker's pool
  capped at ``B`` (``B - 1``) connections: what the flat-out process makes when
  no slot ever moves and nothing else needs the database (with every slot but
  one: the most a policy keeping one for the light processes could leave it).
  No lease policy can make the busy process faster than **alone**; the light
  processes add at most one transaction per 52 ms each.

Loads: **uniform** (P processes x T threads, every thread flat out) and **skewed**
(process 0: T threads flat out; the others: one thread with 50 ms of think time
between transactions). A transaction is ``SELECT pg_sleep(0.002)`` inside
``with conn:`` (BEGIN, the query, COMMIT).

Per mode: tx/s; budget utilisation (tx/s divided by B / 2 ms); p50/p99 wait for a
connection (light processes apart in the skewed load; for PgBouncer the wait is
inside the query, so its transaction latency is shown instead); connects/s (server
side: ``pg_stat_database.sessions``); recalls/s (poolbroker's clients); the
fewest and most transactions one thread of the flat-out processes made (a pool
whose returning thread takes its connection straight back serves a few threads
while the others starve, and only the served threads' waits are counted); the
server connections seen (``pg_stat_activity``, sampled every 10 ms): their
average over the measured window (below B: slots moving between processes, or
free) and the most; the share of the whole machine's CPU busy meanwhile
(``/proc/stat``, all cores: whether CPU is what limits the mode). Writes a
Markdown table and a PNG chart (matplotlib, the ``bench`` extra). Not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import psycopg2
import psycopg2.pool

from bench.connect_cost import machine_cpu
from bench.run import start_broker
from devtools.pgcluster import PgCluster, free_port

QUERY = "SELECT pg_sleep(0.002)"
QUERY_S = 0.002
# poolbroker with a quota keeping slots for the light processes (skewed load only;
# see --light-reserve)
RESERVE = "poolbroker+reserve"
THINK_S = 0.050
# bounds for the skewed load: the busy process alone, on B and on B - 1 slots
ALONE, ALONE_LESS = "alone", "alone-1"
BOUNDS = (ALONE, ALONE_LESS)
MODES = ("static", "pgbouncer", "poolbroker", RESERVE, ALONE, ALONE_LESS)
LOADS = ("uniform", "skewed")


# ---------------------------------------------------------------------- worker side

def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One process of the fleet: ``threads`` threads run transactions from
    ``start`` to ``end`` (epoch seconds); figures count from ``window`` on."""
    mode, dsn, threads, think = spec["mode"], spec["dsn"], spec["threads"], spec["think"]
    if mode == RESERVE:  # the same pool; the broker's quota tells light from busy
        os.environ["POOLBROKER_APPLICATION_NAME"] = "light" if spec["light"] else "busy"
        mode = "poolbroker"
    pool: Any = None
    conns: List[Any] = []
    if mode == "static":
        # psycopg2's pools raise when exhausted instead of waiting: a semaphore
        # makes the threads queue for the B/P connections, as any real use would
        pool = psycopg2.pool.ThreadedConnectionPool(spec["share"], spec["share"], dsn)
        slots = threading.BoundedSemaphore(spec["share"])
    elif mode == "poolbroker":
        from poolbroker_client import ConnectionPool

        pool = ConnectionPool(dsn, broker=spec["broker"], timeout=60,
                              max_size=spec.get("max_size"))
    else:  # pgbouncer: one client connection per thread
        conns = [psycopg2.connect(dsn) for _ in range(threads)]
    print("ready", flush=True)
    go = json.loads(sys.stdin.readline())
    window, end = go["window"], go["end"]
    waits: List[List[float]] = [[] for _ in range(threads)]
    latencies: List[List[float]] = [[] for _ in range(threads)]
    errors: List[str] = []

    def run(i: int) -> None:
        wall_offset = time.time() - time.perf_counter()
        try:
            while True:
                t0 = time.perf_counter()
                if t0 + wall_offset >= end:
                    return
                if mode == "pgbouncer":
                    conn = conns[i]
                elif mode == "static":
                    slots.acquire()
                    conn = pool.getconn()
                else:
                    conn = pool.getconn()
                t1 = time.perf_counter()
                with conn:
                    with conn.cursor() as cur:
                        cur.execute(QUERY)
                if mode != "pgbouncer":
                    pool.putconn(conn)
                if mode == "static":
                    slots.release()
                t2 = time.perf_counter()
                if t0 + wall_offset >= window and t2 + wall_offset <= end:
                    waits[i].append(t1 - t0)
                    latencies[i].append(t2 - t0)
                if think:
                    time.sleep(think)
        except Exception as exc:  # reported, not hidden: a fleet run with errors is void
            errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    time.sleep(max(0.0, go["start"] - time.time()))
    for t in workers:
        t.start()
    stats: Dict[str, Any] = {}
    if mode == "poolbroker":
        time.sleep(max(0.0, window - time.time()))
        pool.pop_stats()  # count from the window on
    for t in workers:
        t.join()
    if mode == "poolbroker":
        stats = pool.get_stats()
        pool.close()
    elif mode == "static":
        pool.closeall()
    for conn in conns:
        conn.close()
    return {"waits": [w for ws in waits for w in ws],
            "latencies": [x for xs in latencies for x in xs],
            # per thread: a pool that lets a returning thread take its connection
            # straight back serves few threads (and their waits look short)
            "per_thread": [len(xs) for xs in latencies],
            "stats": stats, "errors": errors[:5]}


# ---------------------------------------------------------------------- PgBouncer

class PgBouncer:
    """A throwaway PgBouncer in transaction mode in front of one database."""

    def __init__(self, pg: PgCluster, dbname: str, pool_size: int) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pb-bouncer-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        conf = f"""[databases]
{dbname} = host=127.0.0.1 port={pg.port} dbname={dbname} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_db_connections = {pool_size}
max_client_conn = 1000
logfile = {self.dir}/log
pidfile = {self.dir}/pid
"""
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as fh:
            fh.write(conf)
        with open(os.path.join(self.dir, "users.txt"), "w") as fh:
            fh.write('"postgres" ""\n')
        cmd = [pgbouncer_binary() or "pgbouncer", os.path.join(self.dir, "pgbouncer.ini")]
        if os.geteuid() == 0:  # it refuses to run as root
            pw = pwd.getpwnam("postgres")
            for name in os.listdir(self.dir):
                os.chown(os.path.join(self.dir, name), pw.pw_uid, pw.pw_gid)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg2.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("PgBouncer did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def pgbouncer_binary() -> Optional[str]:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)


def ensure_pgbouncer() -> Optional[str]:
    """PgBouncer's binary, installing Debian's package if we can; else None and why."""
    if pgbouncer_binary():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "pgbouncer is not installed (and apt-get is not available to root here)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("installing pgbouncer (apt-get install pgbouncer) ...", flush=True)
    result = subprocess.run(["apt-get", "install", "-y", "-q", "pgbouncer"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or not pgbouncer_binary():
        return "apt-get install pgbouncer failed: " + result.stdout.strip()[-300:]
    return None


# ---------------------------------------------------------------------- parent side

class ServerCounter:
    """The most client backends seen on one database, sampled every 10 ms, and
    their average while :attr:`counting` (the measured window): below the budget,
    the average shows slots that hold no connection (a lease moving between
    processes: a close, the backend's exit, a connect)."""

    def __init__(self, dsn: str, dbname: str) -> None:
        self.dsn, self.dbname = dsn, dbname
        self.max = 0
        self.samples = 0
        self.counting = False
        self.total = self.counted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                            "AND backend_type = 'client backend'", (self.dbname,))
                row = cur.fetchone()
                n = row[0] if row else 0
                self.max = max(self.max, n)
                self.samples += 1
                if self.counting:
                    self.total += n
                    self.counted += 1
                self._stop.wait(0.01)
        conn.close()

    def __enter__(self) -> "ServerCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def sessions(admin_dsn: str, dbname: str) -> int:
    """Sessions ever established to ``dbname`` (the server's own count)."""
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (dbname,))
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_fleet(mode: str, load: str, dsn: str, admin_dsn: str, dbname: str, args: Any,
              broker: Optional[str], broker_pid: int = 0) -> Dict[str, Any]:
    specs = []
    for i in range(args.processes):
        light = load == "skewed" and i > 0
        specs.append({"mode": mode, "dsn": dsn, "broker": broker,
                      "share": args.budget // args.processes,
                      "threads": 1 if light else args.threads,
                      "think": THINK_S if light else 0.0, "light": light})
    if mode in BOUNDS:  # the busy process only, on (nearly) every slot: nothing moves
        specs = [dict(specs[0], mode="poolbroker",
                      max_size=args.budget - (mode == ALONE_LESS))]
    procs = []
    for spec in specs:
        proc = subprocess.Popen([sys.executable, "-m", "bench.fleet", "--worker", json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{mode}/{load}: a worker did not start: {line!r}")
    start = time.time() + 0.3
    window = start + args.warmup
    end = window + args.seconds
    with ServerCounter(admin_dsn, dbname) as counter:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"start": start, "window": window, "end": end}) + "\n")
            proc.stdin.flush()
        time.sleep(max(0.0, window - time.time()))
        sessions_before = sessions(admin_dsn, dbname)
        cpu_before = cpu_seconds(broker_pid) if broker_pid else float("nan")
        machine_before, counter.counting = machine_cpu(), True
        time.sleep(max(0.0, end - time.time()))
        counter.counting = False
        machine_after = machine_cpu()
        cpu_after = cpu_seconds(broker_pid) if broker_pid else float("nan")
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=args.seconds + args.warmup + 120)
            results.append(json.loads(out.strip().splitlines()[-1]))
    time.sleep(0.5)  # exited backends report their sessions
    connects = sessions(admin_dsn, dbname) - sessions_before
    errors = [e for r in results for e in r["errors"]]
    heavy_runs = [r for r, s in zip(results, specs) if not s["light"]]
    light_runs = [r for r, s in zip(results, specs) if s["light"]]
    tx = sum(len(r["latencies"]) for r in results)
    row: Dict[str, Any] = {
        "mode": mode, "load": load, "tx": tx, "tx_s": tx / args.seconds,
        "utilisation": tx / args.seconds / (args.budget / QUERY_S),
        "max_server": counter.max, "samples": counter.samples,
        "avg_server": counter.total / counter.counted if counter.counted else float("nan"),
        # the whole machine, all cores: what is left shows whether CPU is the limit
        "machine_cpu": (machine_after - machine_before) / args.seconds / (os.cpu_count() or 1),
        "connects_s": connects / args.seconds,
        "recalls_s": sum(r["stats"].get("leases_recalled", 0) for r in results) / args.seconds,
        # idle connections given back because others waited (the client's choice)
        "yields_s": sum(r["stats"].get("leases_yielded", 0) for r in results) / args.seconds,
        "broker_cpu": (cpu_after - cpu_before) / args.seconds,
        "errors": errors,
    }
    for label, group in (("", heavy_runs), ("light_", light_runs)):
        if not group:
            continue
        waits = [w for r in group for w in r["waits"]]
        lat = [x for r in group for x in r["latencies"]]
        row[label + "wait_p50_ms"] = percentile(waits, 0.50) * 1000
        row[label + "wait_p99_ms"] = percentile(waits, 0.99) * 1000
        row[label + "lat_p50_ms"] = percentile(lat, 0.50) * 1000
        row[label + "lat_p99_ms"] = percentile(lat, 0.99) * 1000
        row[label + "tx"] = len(lat)
    counts = [n for r in heavy_runs for n in r["per_thread"]]
    row["thread_tx_min"], row["thread_tx_max"] = min(counts), max(counts)
    return row


def without_nan(value: Any) -> Any:
    """``value`` with every NaN float, however deep in lists and dicts, as None."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def medians(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (load, mode): its run of median tx/s (the lower of the two
    middle ones for an even count), with every run's tx/s in ``tx_s_runs``."""
    rows = []
    for key in dict.fromkeys((r["load"], r["mode"]) for r in runs):
        group = [r for r in runs if (r["load"], r["mode"]) == key]
        ranked = sorted(group, key=lambda r: r["tx_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2],
                     "tx_s_runs": [r["tx_s"] for r in group]})
    return rows


def fmt(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def table(rows: List[Dict[str, Any]], budget: int) -> str:
    lines = []
    for load in LOADS:
        group = [r for r in rows if r["load"] == load]
        if not group:
            continue
        base = {r["mode"]: r["tx_s"] for r in group}
        lines.append(f"\n**{load}**\n")
        head = ("| mode | tx/s | utilisation | vs static | vs PgBouncer | wait p50/p99 ms "
                "| tx latency p50/p99 ms |")
        if load == "skewed":
            head += " light: wait p99 ms | light: tx latency p99 ms |"
        head += (" tx per thread min / max | connects/s | recalls + yields /s "
                 f"| server conns avg / max (B={budget}) | machine CPU busy |")
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for r in group:
            vs_static = r["tx_s"] / base["static"] if base.get("static") else None
            vs_bouncer = r["tx_s"] / base["pgbouncer"] if base.get("pgbouncer") else None
            wait = ("in the query" if r["mode"] == "pgbouncer"
                    else f"{fmt(r.get('wait_p50_ms'), '.2f')} / {fmt(r.get('wait_p99_ms'), '.2f')}")
            tx_s = fmt(r["tx_s"])
            if len(r.get("tx_s_runs", [])) > 1:
                tx_s += f" ({fmt(min(r['tx_s_runs']))}-{fmt(max(r['tx_s_runs']))})"
            cells = [r["mode"], tx_s, fmt(r["utilisation"], ".2f"),
                     fmt(vs_static, ".2f") + "x", fmt(vs_bouncer, ".2f") + "x", wait,
                     f"{fmt(r.get('lat_p50_ms'), '.2f')} / {fmt(r.get('lat_p99_ms'), '.2f')}"]
            if load == "skewed":
                cells.append("in the query" if r["mode"] == "pgbouncer"
                             else fmt(r.get("light_wait_p99_ms"), ".2f"))
                cells.append(fmt(r.get("light_lat_p99_ms"), ".2f"))
            cells += [f"{fmt(r.get('thread_tx_min'))} / {fmt(r.get('thread_tx_max'))}",
                      fmt(r["connects_s"], ".1f"),
                      f"{fmt(r['recalls_s'], '.1f')} + {fmt(r.get('yields_s'), '.1f')}",
                      f"{fmt(r['avg_server'], '.2f')} / {r['max_server']}",
                      fmt(100 * r["machine_cpu"], ".0f") + "%"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: List[Dict[str, Any]], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (the bench extra): no chart"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    width = 0.8 / max(1, len(modes))
    colors = {"static": "#999999", "pgbouncer": "#4c72b0", "poolbroker": "#dd8452",
              RESERVE: "#c44e52", ALONE: "#55a868", ALONE_LESS: "#8dcf9c"}
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, load in enumerate(LOADS):
            for r in rows:
                if r["mode"] == mode and r["load"] == load:
                    xs.append(j + i * width)
                    ys.append(r["tx_s"])
        ax1.bar(xs, ys, width, label=mode, color=colors[mode])
    ax1.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(LOADS))])
    ax1.set_xticklabels(LOADS)
    ax1.set_ylabel("transactions / s")
    ax1.set_title("throughput, same budget")
    ax1.set_ylim(0, ax1.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax1.legend(loc="upper center", ncol=2, fontsize=8)
    light = [r for r in rows if r["load"] == "skewed" and "light_lat_p99_ms" in r]  # no bounds
    ax2.bar([r["mode"] for r in light], [r.get("light_lat_p99_ms", 0) for r in light],
            color=[colors[r["mode"]] for r in light])
    ax2.tick_params(axis="x", labelsize=8, labelrotation=15)
    ax2.set_ylabel("ms")
    ax2.set_title("skewed: light processes' p99 transaction latency")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def database(mode: str) -> str:
    return "bench_" + mode.replace("+", "_").replace("-", "_")


def fleet_broker(mode: str, args: Any, tmp: str) -> Tuple[str, subprocess.Popen]:
    """A broker for ``mode``: budget B; for the reserve mode, with a quota that
    keeps ``--light-reserve`` slots for the light processes (a config file)."""
    url = f"ipc:///tmp/pb-fleet-{uuid.uuid4().hex[:8]}.sock"
    if mode != RESERVE:
        return url, start_broker(url, args.budget)
    path = os.path.join(tmp, "reserve.toml")
    with open(path, "w") as fh:
        fh.write(f'[pools]\ndefault = {args.budget}\n\n[quotas.default]\n'
                 f'"light*" = {{ reserve = {args.light_reserve} }}\n')
    return url, start_broker(url, args.budget, extra=("--config", path))


def main() -> int:
    parser = argparse.ArgumentParser(description="poolbroker fleet benchmark")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--out", default="bench/results", help="where the table and chart go")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every mode and load this many times, in turn; the "
                        "table shows each one's median run and the range")
    parser.add_argument("--light-reserve", type=int, default=1,
                        help=f"slots the {RESERVE} mode keeps for the light processes")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    loads = [x for x in args.loads.split(",") if x]
    notes = []
    if "pgbouncer" in modes:
        why = ensure_pgbouncer()
        if why:
            notes.append(f"PgBouncer skipped: {why}")
            modes.remove("pgbouncer")
    machine = (f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, PostgreSQL local "
               f"(throwaway cluster, TCP loopback); B={args.budget}, P={args.processes}, "
               f"T={args.threads}, {args.seconds:g} s measured after {args.warmup:g} s"
               + (f"; median of {args.repeat} runs" if args.repeat > 1 else ""))
    print(machine, flush=True)
    rows: List[Dict[str, Any]] = []
    with PgCluster(max_connections=100) as pg, tempfile.TemporaryDirectory() as tmp:
        admin = psycopg2.connect(pg.dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            for mode in modes:
                cur.execute(f"CREATE DATABASE {database(mode)}")
        admin.close()
        bouncer = None
        brokers: Dict[str, Tuple[str, subprocess.Popen]] = {}
        try:
            if "pgbouncer" in modes:
                bouncer = PgBouncer(pg, "bench_pgbouncer", args.budget)
            for mode in modes:
                if mode.startswith("poolbroker") or mode in BOUNDS:
                    brokers[mode] = fleet_broker(mode, args, tmp)
            for load, mode in [(x, m) for _ in range(args.repeat)
                               for x in loads for m in modes]:
                if (mode == RESERVE or mode in BOUNDS) and load != "skewed":
                    continue  # all processes are alike: nothing to reserve or bound
                db = database(mode)
                dsn = bouncer.dsn if mode == "pgbouncer" and bouncer else \
                    pg.dsn.replace("dbname=postgres", f"dbname={db}")
                url, broker = brokers.get(mode, (None, None))
                row = run_fleet(mode, load, dsn, pg.dsn, db, args, url,
                                broker.pid if broker else 0)
                rows.append(row)
                print(f"{load:8} {mode:10} {row['tx_s']:7.0f} tx/s  max server "
                      f"{row['max_server']} (avg {row['avg_server']:.2f})  "
                      f"machine CPU {100 * row['machine_cpu']:.0f}%  "
                      f"connects/s {row['connects_s']:.1f}  "
                      f"recalls/s {row['recalls_s']:.1f}  yields/s {row['yields_s']:.1f}  "
                      f"broker CPU "
                      f"{row['broker_cpu']:.0%}"
                      + (f"  ERRORS {row['errors']}" if row["errors"] else ""), flush=True)
        finally:
            if bouncer:
                bouncer.stop()
            for _, broker in brokers.values():
                broker.terminate()
                broker.wait(10)
    runs, rows = rows, medians(rows)
    text = table(rows, args.budget)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fleet.md"), "w") as fh:
        fh.write(f"Machine: {machine}\n{text}\n" + "".join(f"\n{n}\n" for n in notes))
    with open(os.path.join(args.out, "fleet.json"), "w") as fh:
        # a figure a mode does not have (no broker, no sample) is NaN here and
        # null in the file: NaN is not JSON, and strict readers refuse it
        json.dump(without_nan({"machine": machine, "rows": rows, "runs": runs,
                               "notes": notes}), fh, indent=1, allow_nan=False)
    why = chart(rows, os.path.join(args.out, "fleet.png"), machine)
    if why:
        notes.append(why)
    print(text)
    for note in notes:
        print(note)
    over = [r for r in runs if r["max_server"] > args.budget]
    if over:
        print(f"BUDGET EXCEEDED in {[(r['mode'], r['load']) for r in over]}")
        return 1
    if any(r["errors"] for r in runs):
        print("some runs had errors: their figures are void")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
