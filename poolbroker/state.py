"""The broker's memory across restarts: may leases be outstanding, and the key of
its lease ids.

A broker cannot tell a restart from a first start without memory. This small JSON
file says whether the last run could have left leases with clients. Only a file
that proves a clean exit with nothing leased lets a start grant at once; any other
start (a crash, a kill, a clean exit while clients still held leases, and a missing
or unreadable file: a tmp cleaner, a new container, a changed ``--state-dir``)
holds a grace period, so that clients re-announce what they hold before anything
new is granted.

It also keeps the key that makes lease ids unforgeable (see
:mod:`poolbroker.leaseids`), so the next run can check re-announced ids: the file
is created owner-only (0600), in an owner-only directory when we create one, and
written atomically and durably (fsync of the file and of its directory).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from typing import Any, Dict, Iterable, Optional, Set, Tuple

log = logging.getLogger("poolbroker")


def default_state_dir() -> str:
    """Where state files go when there is no ipc socket to put them beside: never
    the temp directory, whose cleaners would erase the memory of a crash."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/poolbroker"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "poolbroker")


def default_path(url: str, state_dir: Optional[str] = None) -> str:
    """Beside the ipc socket (``PATH.state``), else in ``state_dir`` or
    :func:`default_state_dir`."""
    if url.startswith("ipc://") and state_dir is None:
        return url[len("ipc://"):] + ".state"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url)
    return os.path.join(state_dir or default_state_dir(), f"poolbroker-{name}.state")


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> Optional[Dict[str, Any]]:
        """The previous run's record, None if there is none, {} if unreadable."""
        try:
            with open(self.path) as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("state file %s unreadable (%s): assuming leases may be outstanding",
                        self.path, exc)
            return {}

    @staticmethod
    def needs_grace(previous: Optional[Dict[str, Any]]) -> bool:
        """False only if the record proves a clean exit with nothing leased."""
        return not (previous and previous.get("clean_exit") is True
                    and previous.get("leases_outstanding") is False)

    @staticmethod
    def why_grace(previous: Optional[Dict[str, Any]]) -> str:
        if previous is None:
            return "there is no state file to prove the last run left nothing leased"
        if not previous:
            return "the state file is unreadable"
        if not previous.get("clean_exit"):
            return "the last run did not exit cleanly"
        return "the last run exited with leases outstanding"

    @staticmethod
    def lease_key(previous: Optional[Dict[str, Any]]) -> Optional[bytes]:
        """The previous run's lease id key, if the record has a usable one."""
        text = (previous or {}).get("lease_key")
        try:
            key = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            key = b""
        return key if len(key) >= 16 else None

    @staticmethod
    def fence_scopes(previous: Optional[Dict[str, Any]]) -> Set[Tuple[str, str]]:
        """The (role, database) pairs the previous run's leased sessions used."""
        pairs = (previous or {}).get("fence_scopes")
        if not isinstance(pairs, list):
            return set()
        return {(u, d) for u, d in (x for x in pairs if isinstance(x, list) and len(x) == 2)
                if isinstance(u, str) and isinstance(d, str)}

    def write(self, *, outstanding: bool, clean_exit: bool, epoch: str, key: bytes,
              scopes: Iterable[Tuple[str, str]] = ()) -> None:
        """Record atomically and durably (temp file, fsync, rename, fsync the dir)."""
        data = {"leases_outstanding": outstanding, "clean_exit": clean_exit, "epoch": epoch,
                "lease_key": key.hex(), "fence_scopes": sorted(map(list, scopes)),
                "pid": os.getpid(), "written_at": time.time()}
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pbstate-", dir=directory)  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)
