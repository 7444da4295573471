"""The broker's clock: monotonic time minus the time the broker itself did not run.

Lease expiry asks "has this client been silent for a TTL?". If the broker was frozen
(SIGSTOP, a paused VM, a long swap stall), the clients were not silent: their
heartbeats sit queued in the broker's socket. Measured on the plain monotonic clock,
the broker would wake up and expire every client before reading them (and, with
fencing, terminate every backend mid-transaction).

So the ledger runs on a clock that advances by at most ``max_step`` between two
readings. The loop reads it at least every ``max_step / 2`` or so, so a longer step
means the broker did not run; that time is not counted, which extends every lease,
deadline and grace period by the gap (as etcd extends leases on a leader change).
Lost time only ever makes expiry later, never earlier, so the budget stays safe.
"""

from __future__ import annotations

import time
from typing import Callable


class LoopClock:
    """``now()`` never advances by more than ``max_step`` per call."""

    def __init__(self, max_step: float, source: Callable[[], float] = time.monotonic) -> None:
        if max_step <= 0:
            raise ValueError("max_step must be > 0")
        self.max_step = max_step
        self._source = source
        self._real = source()
        self._now = self._real
        self.lost = 0.0  # seconds not counted, in total
        self.last_gap = 0.0  # the latest gap, until taken by take_gap()

    def now(self) -> float:
        real = self._source()
        step = real - self._real
        self._real = real
        if step > self.max_step:
            gap = step - self.max_step
            self.lost += gap
            self.last_gap += gap
            step = self.max_step
        self._now += max(0.0, step)
        return self._now

    def take_gap(self) -> float:
        """Seconds lost since the last call (0.0 if the loop ran all along)."""
        gap, self.last_gap = self.last_gap, 0.0
        return gap
