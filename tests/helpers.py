"""What the tests share (imported as ``from helpers import ...``): broker handles,
worker processes, tags that tell a test's server connections apart, and the
sampler that counts them in pg_stat_activity. The fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, List

import psycopg2

from devtools.sampler import Sampler
from poolbroker.cli import query_status

__all__ = ["HERE", "BrokerHandle", "Sampler", "Worker", "count_backends", "http_get",
           "new_tag", "short_ipc", "start_gunicorn", "tagged"]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "integration", "worker.py")


def short_ipc(prefix: str = "pbt") -> str:
    # ipc paths are limited to 107 bytes: keep them in /tmp with a short name.
    return f"ipc:///tmp/{prefix}-{uuid.uuid4().hex[:10]}.sock"


class BrokerHandle:
    def __init__(self, url: str, name: str, pid: int, log: str, xprocess) -> None:
        self.url, self.name, self.pid, self.log, self._xprocess = url, name, pid, log, xprocess

    def status(self, timeout: float = 3.0) -> dict:
        return query_status(self.url, timeout)

    def leased(self, pool: str = "default") -> int:
        return self.status()["pools"][pool]["leased"]

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """Poll status until ``predicate(status)`` holds; the last status otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status) or time.monotonic() > deadline:
                return status
            time.sleep(0.02)

    def wait_leased(self, count: int, timeout: float, pool: str = "default") -> int:
        """Poll until ``pool`` has ``count`` leases; the last count seen otherwise."""
        return self.wait_for(lambda s: s["pools"][pool]["leased"] == count,
                             timeout)["pools"][pool]["leased"]

    def log_text(self) -> str:
        with open(self.log, errors="replace") as fh:
            return fh.read()

    def stop(self) -> None:
        self._xprocess.getinfo(self.name).terminate()

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal the broker and wait until it is gone (a crash, with SIGKILL)."""
        import psutil

        os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.01)
        raise AssertionError(f"broker {self.pid} did not die")


def count_backends(dsn: str, tag: str) -> int:
    with psycopg2.connect(dsn, application_name="pbt-counter") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity "
                        "WHERE split_part(application_name, '/pb', 1) = %s", (tag,))
            n = cur.fetchone()[0]
    conn.close()
    return n


def tagged(dsn: str, tag: str) -> str:
    return f"{dsn} application_name={tag}"


def new_tag() -> str:
    return f"pbt-{uuid.uuid4().hex[:8]}"


def _group(pgid: int) -> List[int]:
    """The processes of process group ``pgid`` (from /proc), the leader first."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(name))
    return sorted(pids, key=lambda pid: pid != pgid)


def _signal_state(pid: int) -> str:
    """Each thread's signal masks (pending, blocked, caught; /proc) of ``pid``."""
    lines = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            lines.append(f"pid {pid} thread {tid} {fields['Name'].strip()}: " + " ".join(
                f"{k}={fields[k].strip()}" for k in ("SigPnd", "ShdPnd", "SigBlk", "SigCgt")))
    except OSError:
        pass
    return "\n".join(lines)


class Worker:
    """A real worker process running tests/integration/worker.py with a JSON config."""

    def __init__(self, config: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True)  # its own group: a hang's stacks come from all of it

    def wait_line(self, prefix: str, timeout: float = 20.0) -> str:
        """Read stdout until a line starting with ``prefix`` (with a deadline)."""
        result: List[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith(prefix):
                    result.append(line.strip())
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self.proc.kill()
            raise AssertionError(f"worker never printed {prefix!r}; stderr: "
                                 f"{self.proc.stderr.read()[-3000:]}")
        return result[0]

    def result(self, timeout: float = 120.0) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout:g}s; "
                                 f"its stacks:\n{self.stacks()}") from None
        assert self.proc.returncode == 0, f"worker failed ({self.proc.returncode}): {err[-3000:]}"
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"worker printed no result; stderr: {err[-3000:]}"
        return json.loads(lines[-1][len("RESULT "):])

    def stacks(self) -> str:
        """Every thread's stack in the worker and its forked children (faulthandler
        on SIGUSR1, one process at a time so that their lines do not mix), then kill
        them all: what a hang's failure message shows."""
        masks = []
        for pid in _group(self.proc.pid):
            masks.append(_signal_state(pid))
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            time.sleep(0.5)  # faulthandler writes at once; nothing to wait on but that
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, err = self.proc.communicate()
        return "\n".join(masks) + "\n" + err[-12000:]

    def finish(self) -> None:
        """Let a holding worker go (it exits cleanly when stdin closes)."""
        self.proc.stdin.close()
        self.proc.stdin = None  # so that communicate() does not flush it

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(10)


def http_get(url: str) -> dict:
    """GET a JSON answer (status 200 required)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def start_gunicorn(env: dict, app: str, *args: str) -> "tuple[subprocess.Popen, str]":
    """gunicorn with poolbroker's config module serving ``app`` on a free port, once
    it answers (``PYTHONPATH`` in ``env`` must reach the app)."""
    from devtools.pgcluster import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:poolbroker_client.gunicorn",
         "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", *args, app],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:  # wait until it serves (a poll with a deadline)
        try:
            http_get(url)
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(proc.communicate()[0][-3000:]) from None
            time.sleep(0.1)
