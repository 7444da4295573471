"""``poolbroker top``: a live terminal view of a broker (needs rich).

Each refresh asks the broker for its status (with every lease, as ``poolbroker
clients``) and draws each pool's leased/max as a bar, its waiting requests and
grants per second (from the grant counter between two refreshes), then the
clients table, longest checkouts first.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .views import CLIENT_COLUMNS, client_cells, duration


class Rates:
    """Grants per second per pool, from the counters of successive snapshots."""

    def __init__(self) -> None:
        self._last: Optional[Dict[str, int]] = None
        self._at = 0.0

    def update(self, pools: Dict[str, Any], now: float) -> Dict[str, Optional[float]]:
        counts = {name: pool["grants"] for name, pool in pools.items()}
        last, at = self._last, self._at
        self._last, self._at = counts, now
        if last is None or now <= at:
            return {name: None for name in counts}
        return {name: max(0, n - last.get(name, n)) / (now - at) for name, n in counts.items()}


def screen(data: Dict[str, Any], url: str, rates: Dict[str, Optional[float]], *,
           rows: int = 20, pool: Optional[str] = None) -> Group:
    """One screen of ``poolbroker top`` for a status snapshot."""
    head = Text.assemble(
        ("poolbroker ", "bold"), url, f"  epoch {data['epoch']}",
        f"  up {duration(data.get('uptime_s'))}",
        f"  {len(data['clients'])} client(s)", f"  bad frames {data['bad_frames']}")
    pools = Table(expand=False, box=None, header_style="bold")
    columns: Tuple[Tuple[str, JustifyMethod], ...] = (
        ("pool", "left"), ("leased / max", "left"), ("", "right"), ("busy", "right"),
        ("idle", "right"), ("waiting", "right"), ("grants/s", "right"),
        ("timeouts", "right"), ("", "left"))
    for column, justify in columns:
        pools.add_column(column, justify=justify)
    for name, info in sorted(data["pools"].items()):
        if pool is not None and name != pool:
            continue
        total = max(info["max"], info["leased"], 1)
        rate = rates.get(name)
        state = "draining" if info.get("draining") else "paused" if info.get("paused") else ""
        full = info["leased"] >= info["max"]
        pools.add_row(
            name, ProgressBar(total=total, completed=info["leased"], width=30,
                              complete_style="red" if full else "green"),
            f"{info['leased']}/{info['max']}", str(info["busy"]), str(info["idle"]),
            Text(str(info["waiting"]), style="bold red" if info["waiting"] else ""),
            "-" if rate is None else f"{rate:.0f}", str(info["timeouts"]), state)
    clients = Table(box=None, header_style="bold")
    for column in CLIENT_COLUMNS:
        clients.add_column(column)
    shown = [r for r in data.get("leases", []) if pool is None or r["pool"] == pool]
    for row in shown[:rows]:
        style = {"busy": "", "waiting": "yellow", "fencing": "red", "unconfirmed": "red",
                 "idle": "dim"}[row["state"]]
        clients.add_row(*client_cells(row), style=style)
    more = len(shown) - rows
    foot = Text(f"... and {more} more (poolbroker clients lists them all)" if more > 0
                else "", style="dim")
    return Group(head, Text(""), pools, Text(""), clients, foot)


def run(fetch: Callable[[], Dict[str, Any]], url: str, *, interval: float = 1.0,
        once: bool = False, rows: int = 20, pool: Optional[str] = None,
        console: Optional[Console] = None) -> int:
    """Draw until Ctrl-C (or one screen with ``once``). ``fetch`` returns the
    broker's status with its leases; its errors propagate."""
    # a pipe gets a wide page rather than rich's 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    rates = Rates()
    if once:  # two snapshots, ``interval`` apart, so that grants/s means something
        rates.update(fetch()["pools"], time.monotonic())
        time.sleep(interval)
        data = fetch()
        console.print(screen(data, url, rates.update(data["pools"], time.monotonic()),
                             rows=rows, pool=pool))
        return 0
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                started = time.monotonic()
                data = fetch()
                live.update(screen(data, url, rates.update(data["pools"], time.monotonic()),
                                   rows=rows, pool=pool), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
