"""StallWatch (client/stalls.py): the gaps between two looks at the broker's socket."""

from hypothesis import given
from hypothesis import strategies as st

from poolbroker_client.stalls import StallWatch


def test_a_gap_within_the_limit_is_no_stall():
    w = StallWatch(0.0)
    assert w.check(1.0, 1.5) == 0.0
    assert w.check(2.4, 1.5) == 0.0


def test_a_longer_gap_is_reported_once_whoever_looks():
    w = StallWatch(0.0)
    assert w.check(0.5, 1.5) == 0.0
    assert w.check(7.5, 1.5) == 7.0  # frozen, say, between a read and its handling
    assert w.check(7.6, 1.5) == 0.0  # the next look (another thread) starts afresh


def test_an_earlier_time_from_another_thread_moves_nothing_back():
    w = StallWatch(0.0)
    w.check(5.0, 1.5)
    assert w.check(4.9, 1.5) == 0.0  # read before the other thread's check
    assert w.check(6.0, 1.5) == 0.0  # still measured from 5.0


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=50),
       st.floats(0.05, 5))
def test_every_stall_longer_than_the_limit_is_seen(steps, limit):
    """Whatever the pattern of looks, a gap longer than the limit between two
    successive looks is reported at the second, with its length."""
    w, now = StallWatch(0.0), 0.0
    for step in steps:
        before, now = now, now + step
        gap = w.check(now, limit)
        assert gap == (now - before if now - before > limit else 0.0)
