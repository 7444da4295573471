"""Signal (client/core.py): the one-shot event a waiting caller sleeps on."""

import threading

from poolbroker_client.core import Signal


def test_a_wait_times_out_unset():
    s = Signal()
    assert not s.wait(0.01)
    assert not s.is_set()


def test_set_before_the_wait_passes_every_wait():
    s = Signal()
    s.set()
    s.set()  # a second set changes nothing
    assert s.is_set()
    assert s.wait(0.0)
    assert s.wait(0.0)


def test_set_from_another_thread_wakes_the_waiter():
    s = Signal()
    waiting = threading.Event()
    woke = []

    def waiter() -> None:
        waiting.set()
        woke.append(s.wait(30.0))

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(10)
    s.set()
    t.join(10)
    assert woke == [True]


def test_sets_racing_each_other_and_the_wait_raise_nothing():
    errors = []

    def set_it(s: Signal) -> None:
        try:
            s.set()
        except Exception as exc:
            errors.append(exc)

    for _ in range(200):
        s = Signal()
        setters = [threading.Thread(target=set_it, args=(s,)) for _ in range(3)]
        for t in setters:
            t.start()
        assert s.wait(10.0)
        for t in setters:
            t.join(10)
        assert s.wait(0.0)
    assert errors == []
