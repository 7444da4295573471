"""The broker's memory across restarts: may leases be outstanding?

A broker cannot tell a restart from a first start without memory. This small JSON
file says whether the last run could have left leases with clients: a first start,
or a start after a clean exit with nothing leased, grants at once; any other start
(a crash, a kill, a clean exit while clients still held leases) holds a grace
period so that clients re-announce what they hold before anything new is granted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from typing import Any, Dict, Optional

log = logging.getLogger("poolbroker")


def default_path(url: str, state_dir: Optional[str] = None) -> str:
    """Beside the ipc socket (``PATH.state``), else in ``state_dir`` or the temp dir."""
    if url.startswith("ipc://") and state_dir is None:
        return url[len("ipc://"):] + ".state"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url)
    return os.path.join(state_dir or tempfile.gettempdir(), f"poolbroker-{name}.state")


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.outstanding = False

    def read(self) -> Optional[Dict[str, Any]]:
        """The previous run's record, or None if there is none (a first start)."""
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

    def needs_grace(self, previous: Optional[Dict[str, Any]]) -> bool:
        if previous is None:
            return False
        return not (previous.get("clean_exit") is True
                    and previous.get("leases_outstanding") is False)

    def write(self, *, outstanding: bool, clean_exit: bool, epoch: str) -> None:
        """Record atomically (write a temp file, rename it over the old one)."""
        self.outstanding = outstanding
        data = {"leases_outstanding": outstanding, "clean_exit": clean_exit, "epoch": epoch,
                "pid": os.getpid(), "written_at": time.time()}
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".pbstate-", dir=directory)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
