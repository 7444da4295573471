"""Plain-text views of a broker's status for the command line (``poolbroker
clients``); ``poolbroker.top`` draws the live one with rich."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import protocol as p

CLIENT_COLUMNS = ("pool", "state", "lease", "pid", "host", "name", "backend",
                  "checked out", "held", "waiting")


def duration(seconds: Optional[float]) -> str:
    """``-`` for None; ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def client_cells(row: Dict[str, Any]) -> List[str]:
    """One row of ``poolbroker clients`` as text cells, in CLIENT_COLUMNS order.
    Names and hosts come from clients: shown escaped, never raw."""
    def text(value: Any) -> str:
        return p.shown(value, 40).strip("'") if value else "-"

    return [text(row["pool"]), row["state"],
            "-" if row.get("lease") is None else str(row["lease"]),
            str(row["pid"] or "-"), text(row["host"]), text(row["name"]),
            str(row.get("backend_pid") or "-"), duration(row.get("checked_out_s")),
            duration(row.get("held_s")), duration(row.get("waiting_s"))]


def clients_table(rows: List[Dict[str, Any]]) -> str:
    """The rows of ``Ledger.holders`` as an aligned table (longest checkouts first,
    as the broker sorted them)."""
    if not rows:
        return "no leases and no requests waiting"
    cells = [list(CLIENT_COLUMNS)] + [client_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(CLIENT_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    busy = sum(1 for r in rows if r["state"] == "busy")
    waiting = sum(1 for r in rows if r["state"] == "waiting")
    held = sum(1 for r in rows if r.get("lease") is not None)
    lines.append(f"\n{held} lease(s), {busy} busy; {waiting} request(s) waiting. "
                 "Checkout times are as of each client's last heartbeat.")
    return "\n".join(lines)
