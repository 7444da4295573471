"""StallWatch: notices that this process did not run for a while.

A process frozen (SIGSTOP, a paused VM, a swap storm) sends no heartbeats: the
broker may expire its leases and grant them to others. A grant read after such a
stall may be one of those: it must not be used before the broker confirms it.

Every wait of whoever reads the broker's socket (the I/O thread, a leading caller)
ends by the next heartbeat at the latest, and each reader calls :meth:`check` when
its wait ends and again after reading each message, before handling it. So while
the process runs, two checks are never much more than a heartbeat apart; a longer
gap means the process stopped, wherever the stall began: in a wait, between
reading a message and handling it, or while a thread waited for the socket.
"""

from __future__ import annotations


class StallWatch:
    """Times the gaps between checks (pure: the caller passes the time)."""

    def __init__(self, now: float) -> None:
        self._seen = now  # the latest check

    def check(self, now: float, limit: float) -> float:
        """The seconds since the previous check if more than ``limit`` (the
        process stalled), else 0.0. Threads may call it concurrently: a lost
        update only leaves an earlier time, never hides a stall."""
        gap = now - self._seen
        if gap > 0:
            self._seen = now
        return gap if gap > limit else 0.0
