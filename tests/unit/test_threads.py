"""poolbroker_client.threads: the client's threads block asynchronous signals, so
that the kernel hands SIGTERM and the like to a thread that runs the handler."""

import signal
import threading

import pytest

from poolbroker_client import threads

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no masks")


def _started_mask():
    seen = {}

    def run():
        seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    t = threading.Thread(target=run)
    threads.start(t)
    t.join(10)
    return seen["mask"]


def test_a_started_thread_blocks_termination_signals_but_not_faults():
    mask = _started_mask()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1,
                signal.SIGCHLD):
        assert sig in mask, sig
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT):
        assert sig not in mask, sig


def test_the_callers_mask_is_left_as_it_was():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    _started_mask()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert signal.SIGTERM not in before  # the test itself must not have blocked it
