"""The broker's loop clock: time the broker did not run is not counted."""

from hypothesis import given
from hypothesis import strategies as st

from poolbroker.clock import LoopClock


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_freeze_is_not_counted_and_is_reported_once():
    real = FakeTime()
    clock = LoopClock(1.5, real)
    start = clock.now()
    real.t += 1.0
    assert clock.now() - start == 1.0 and clock.take_gap() == 0.0
    real.t += 6.0  # frozen: SIGSTOP, a paused VM
    assert clock.now() - start == 2.5
    assert clock.take_gap() == 4.5 and clock.take_gap() == 0.0
    assert clock.lost == 4.5


@given(st.lists(st.floats(0, 20, allow_nan=False), max_size=50))
def test_the_clock_never_runs_ahead_of_real_time_nor_jumps(steps):
    real = FakeTime()
    clock = LoopClock(1.0, real)
    before = clock.now()
    start = real.t
    for step in steps:
        real.t += step
        now = clock.now()
        assert 0.0 <= now - before <= 1.0 + 1e-9
        before = now
    assert abs((clock.now() - 100.0) + clock.lost - (real.t - start)) < 1e-6
