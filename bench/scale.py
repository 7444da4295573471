"""Broker scale: many idle clients, and many clients leasing flat out.

    python -m bench.scale [--holders 200] [--leases 20] [--window 20]
                          [--lessees 32] [--seconds 8] [--profile]

1. **Idle fleet**: ``--holders`` processes each hold ``--leases`` leases (4,000 by
   default) and heartbeat as every client does; over ``--window`` seconds: the
   broker's CPU share of one core, its RSS, and the latency of ``poolbroker
   status`` (median and worst of 20). Then the anchor: as many processes send
   the same heartbeats (fields, size, interval, when they ask for an answer)
   to a bare pyzmq ROUTER that decodes them and answers those that ask; its CPU
   share over the same window, and the broker's as a ratio of it.
2. **Leasing flat out**: ``--lessees`` processes each run ``with lease(): pass`` in
   a loop (the pool is big enough that nobody waits: this is the cost of the
   exchange), against a raw pyzmq ROUTER echo server in its own process answering
   as many DEALER processes the same way (one msgpack round trip each). Reported:
   both throughputs and their ratio, and the broker's CPU.

With ``--profile`` the brokers run under cProfile and the functions
taking the most time are printed (its hot loop). No PostgreSQL is needed: leases
are the broker's slots; nothing connects. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.run import start_broker
from poolbroker.cli import query_status

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------- processes

def _env() -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def scale_broker(url: str, budget: int, profile: Optional[str]) -> subprocess.Popen:
    # more clients than the default cap may join
    return start_broker(url, budget, extra=("--max-clients", "10000"), profile=profile)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def spawn(role: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.scale", "--role", role, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------- roles

def _timed(one: Callable[[], None]) -> None:
    """Say ready, read the window (epoch seconds ``[start, end]``) from stdin, call
    ``one`` back to back through it, print how many calls were made."""
    print("ready", flush=True)
    start, end = json.loads(sys.stdin.readline())
    while time.time() < start:
        time.sleep(0.001)
    count = 0
    while time.time() < end:
        one()
        count += 1
    print(json.dumps(count), flush=True)


def role_hold(url: str, n: int) -> None:
    """Hold ``n`` leases until stdin closes."""
    import contextlib

    import poolbroker_client

    with contextlib.ExitStack() as stack:
        for _ in range(n):
            stack.enter_context(poolbroker_client.lease(broker=url, timeout=120))
        print("held", flush=True)
        sys.stdin.read()


def role_lease(url: str) -> None:
    """``with lease(): pass`` from ``start`` to ``end`` (read from stdin)."""
    import poolbroker_client

    def one() -> None:
        with poolbroker_client.lease(broker=url):
            pass

    one()  # the link starts outside the timing
    _timed(one)


def role_echo_client(url: str) -> None:
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    payload = msgpack.packb({"v": 1, "op": "acquire", "rid": 1, "pool": "default",
                             "timeout": 30.0})

    def one() -> None:
        sock.send(payload)
        msgpack.unpackb(sock.recv())

    one()
    _timed(one)
    sock.close(0)


def role_echo_server(url: str) -> None:
    """A ROUTER that decodes each message and sends it back: the floor of a broker."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(url)
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    while True:
        events = dict(poller.poll(1000))
        if sock in events:
            for _ in range(100):
                try:
                    ident, frame = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                sock.send_multipart([ident, msgpack.packb(msgpack.unpackb(frame))])
        if sys.stdin.fileno() in events or sys.stdin in events:
            return


def role_beat_client(url: str, n: int) -> None:
    """Send what a client holding ``n`` checked-out leases sends while idle (its
    heartbeat, same fields and size) to a bare ROUTER, at the same interval and
    asking for an answer as a client does (after two beats without one), until
    stdin closes."""
    import random
    import select

    import zmq

    from poolbroker import protocol as p
    from poolbroker.cli import DEFAULT_TTL

    interval = DEFAULT_TTL / 3  # the broker's heartbeat_interval
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    ids = [random.randrange(2**40, 2**52) for _ in range(n)]
    last_reply = time.monotonic()
    print("ready", flush=True)
    time.sleep(random.uniform(0, interval))  # clients start at scattered moments
    while True:
        now = time.monotonic()
        sock.send(p.encode("heartbeat", idle={"default": 0}, leases=ids,
                           ack=now - last_reply >= 2 * interval, epoch="0" * 12, seen=n,
                           busy=[[lease, round(random.uniform(1, 100), 3)] for lease in ids]))
        while sock.poll(0):
            sock.recv()
            last_reply = time.monotonic()
        if select.select([sys.stdin], [], [], interval)[0]:
            break  # stdin closed
    sock.close(0)


def role_beat_server(url: str) -> None:
    """A ROUTER that decodes each message and answers those that ask (``ack``):
    what an idle fleet's heartbeats cost a broker that does nothing else."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(url)
    answer = msgpack.packb({"v": 1, "op": "hb", "epoch": "0" * 12, "unknown": []})
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    while True:
        events = dict(poller.poll(1000))
        if sock in events:
            for _ in range(100):
                try:
                    ident, frame = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if msgpack.unpackb(frame).get("ack"):
                    sock.send_multipart([ident, answer])
        if sys.stdin.fileno() in events or sys.stdin in events:
            return


# ---------------------------------------------------------------------- parts

def _profile_text(path: str) -> str:
    text = io.StringIO()
    pstats.Stats(path, stream=text).sort_stats("tottime").print_stats(15)
    os.unlink(path)
    return text.getvalue()


def _profile_path() -> str:
    return os.path.join(tempfile.gettempdir(), f"pb-broker-{uuid.uuid4().hex[:6]}.prof")


def idle_fleet(holders: int, leases: int, window: float, profile: bool) -> Dict[str, Any]:
    url = f"ipc:///tmp/pbs-{uuid.uuid4().hex[:8]}.sock"
    prof = _profile_path()
    broker = scale_broker(url, holders * leases, prof if profile else None)
    out: Dict[str, Any] = {}
    procs: List[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        for _ in range(holders):
            procs.append(spawn("hold", url, str(leases)))
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "held":
                raise RuntimeError("a holder did not get its leases")
        settle = time.monotonic() - t0
        status = query_status(url, 10)
        leased = status["pools"]["default"]["leased"]
        time.sleep(2.0)  # past the start-up burst: heartbeats only from here on
        cpu0, w0 = cpu_seconds(broker.pid), time.monotonic()
        time.sleep(window)
        cpu = (cpu_seconds(broker.pid) - cpu0) / (time.monotonic() - w0)
        latencies = []
        for _ in range(20):
            t = time.perf_counter()
            query_status(url, 10)
            latencies.append(time.perf_counter() - t)
        out.update({"holders": holders, "leases": leased, "start_s": round(settle, 1),
                    "cpu_share": cpu, "rss_mb": rss_mb(broker.pid),
                    "status_ms_p50": statistics.median(latencies) * 1e3,
                    "status_ms_max": max(latencies) * 1e3,
                    "clients": len(status["clients"])})
    finally:
        for proc in procs:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop(broker)
    if profile and os.path.exists(prof):
        out["profile"] = _profile_text(prof)
    out["anchor_cpu_share"] = idle_anchor(holders, leases, window)
    # /proc counts CPU in clock ticks (10 ms): a small fleet over a short window
    # may show none at all, and then there is no ratio
    anchor = out["anchor_cpu_share"]
    out["ratio"] = out["cpu_share"] / anchor if anchor > 0 else None
    return out


def idle_anchor(holders: int, leases: int, window: float) -> float:
    """The same heartbeats sent to a bare pyzmq ROUTER (``role_beat_server``):
    its CPU share of one core over ``window`` seconds."""
    url = f"ipc:///tmp/pba-{uuid.uuid4().hex[:8]}.sock"
    server = spawn("beat-server", url)
    assert server.stdout is not None and server.stdin is not None
    server.stdout.readline()
    procs = [spawn("beat-client", url, str(leases)) for _ in range(holders)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a heartbeat sender did not start")
        time.sleep(2.0)  # every sender past its first beat, as in idle_fleet
        cpu0, w0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(window)
        return (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - w0)
    finally:
        for proc in procs:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stdin.close()
        server.wait(10)


def _run_fleet(procs: List[subprocess.Popen], seconds: float,
               watch: Optional[int] = None) -> Tuple[float, Optional[float]]:
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a benchmark process did not start")
    start = time.time() + 1.0
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([start, start + seconds]) + "\n")
        proc.stdin.flush()
    time.sleep(max(0.0, start - time.time()))
    cpu0 = cpu_seconds(watch) if watch else 0.0
    time.sleep(seconds)
    cpu = (cpu_seconds(watch) - cpu0) / seconds if watch else None
    total = 0
    for proc in procs:
        assert proc.stdout is not None
        total += json.loads(proc.stdout.readline())
        proc.wait(30)
    return total / seconds, cpu


def flat_out(lessees: int, seconds: float, profile: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {"processes": lessees}
    echo_url = f"ipc:///tmp/pbe-{uuid.uuid4().hex[:8]}.sock"
    server = spawn("echo-server", echo_url)
    assert server.stdout is not None and server.stdin is not None
    server.stdout.readline()
    try:
        out["echo_rt_s"], out["echo_cpu"] = _run_fleet(
            [spawn("echo-client", echo_url) for _ in range(lessees)], seconds, server.pid)
    finally:
        server.stdin.close()
        server.wait(10)
    url = f"ipc:///tmp/pbs-{uuid.uuid4().hex[:8]}.sock"
    prof = _profile_path()
    broker = scale_broker(url, lessees * 2, prof if profile else None)
    try:
        out["lease_s"], out["broker_cpu"] = _run_fleet(
            [spawn("lease", url) for _ in range(lessees)], seconds, broker.pid)
    finally:
        stop(broker)
    out["ratio"] = out["lease_s"] / out["echo_rt_s"]
    if profile and os.path.exists(prof):
        out["profile"] = _profile_text(prof)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="poolbroker broker scale benchmark")
    parser.add_argument("--holders", type=int, default=200)
    parser.add_argument("--leases", type=int, default=20)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--lessees", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--parts", default="idle,flat")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.role:
        {"hold": lambda: role_hold(rest[0], int(rest[1])),
         "lease": lambda: role_lease(rest[0]),
         "echo-client": lambda: role_echo_client(rest[0]),
         "echo-server": lambda: role_echo_server(rest[0]),
         "beat-client": lambda: role_beat_client(rest[0], int(rest[1])),
         "beat-server": lambda: role_beat_server(rest[0])}[args.role]()
        return 0
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    parts = args.parts.split(",")
    if "idle" in parts:
        r = idle_fleet(args.holders, args.leases, args.window, args.profile)
        print(f"\nidle fleet: {r['clients']} processes holding {r['leases']} leases "
              f"(all held after {r['start_s']}s), over {args.window:g}s:")
        print(f"  broker CPU {r['cpu_share'] * 100:.2f}% of a core, RSS {r['rss_mb']:.1f} MB; "
              f"status {r['status_ms_p50']:.1f} ms median, {r['status_ms_max']:.1f} ms worst")
        ratio = "no ratio: too little CPU to measure" if r["ratio"] is None \
            else f"the broker {r['ratio']:.2f}x that"
        print(f"  a bare pyzmq ROUTER receiving the same heartbeats: "
              f"{r['anchor_cpu_share'] * 100:.2f}% of a core; {ratio}")
        if "profile" in r:
            print("\nbroker profile (by own time):\n" + r["profile"])
    if "flat" in parts:
        r = flat_out(args.lessees, args.seconds, args.profile)
        print(f"\n{r['processes']} processes flat out, {args.seconds:g}s each:")
        print(f"  raw pyzmq echo server   {r['echo_rt_s']:9,.0f} round trips/s "
              f"(server CPU {r['echo_cpu'] * 100:.0f}%)")
        print(f"  poolbroker lease+release {r['lease_s']:9,.0f} leases/s "
              f"(broker CPU {r['broker_cpu'] * 100:.0f}%)   {r['ratio']:.2f}x the echo server")
        if "profile" in r:
            print("\nbroker profile (by own time):\n" + r["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
