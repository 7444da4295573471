"""The client's own threads take no signals.

A signal sent to the process (SIGTERM from ``multiprocessing.Pool.terminate()``,
SIGINT, SIGALRM) goes to any one of its threads that does not block it. Python
runs every handler in the main thread, but only the receiving thread is woken: if
that is one of ours while the main thread waits in a lock or a system call (a
multiprocessing worker waiting for its next task), the handler never runs and the
process ignores the signal it was meant to die of. Our threads block every
asynchronous signal, so the kernel picks a thread that handles it.
"""

from __future__ import annotations

import signal
import threading

# raised by a thread's own fault: blocking them would kill it without a report
_FAULTS = {getattr(signal, name) for name in
           ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP", "SIGSYS")
           if hasattr(signal, name)}


def start(thread: threading.Thread) -> None:
    """Start ``thread`` with every asynchronous signal blocked in it (a new thread
    inherits the mask of the thread that starts it; the caller's mask is restored
    at once, and a signal that arrives meanwhile waits for it, not lost)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _FAULTS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
