"""The client's rule for keeping an idle connection while others wait for a slot
(ski rental with a prediction: client/core.py keep_idle_for)."""

from hypothesis import given
from hypothesis import strategies as st

from poolbroker_client.core import HOLD_IDLE_FLOOR, HOLD_IDLE_TRUST, keep_idle_for

seconds = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


def test_callers_further_off_than_a_move_get_the_slot_given_back_at_once():
    # the skewed fleet's light process: a caller every ~50 ms, a move ~20 ms
    assert keep_idle_for(gap=0.050, cost=0.020) == HOLD_IDLE_TRUST * 0.020 < 0.005


def test_callers_sooner_than_a_move_keep_it_at_least_the_floor():
    assert keep_idle_for(gap=0.001, cost=0.020) == HOLD_IDLE_FLOOR
    assert keep_idle_for(gap=0.0, cost=0.400) == 0.400  # the measured cost, above the floor
    assert keep_idle_for(gap=0.0, cost=3.0) == 1.0  # never more than a second


@given(gap=seconds, cost=seconds, actual=seconds)
def test_when_the_prediction_says_go_a_wrong_one_costs_a_bounded_factor(gap, cost, actual):
    """Trusting a prediction of a long gap: if the next caller in fact comes after
    ``actual`` seconds, the slot time spent (kept idle, then a move if given back)
    is at most (1 + TRUST) / TRUST times what the best choice knowing ``actual``
    would spend (keep it all along, or give it back at once)."""
    hold = keep_idle_for(gap, cost)
    if gap <= cost:
        return
    spent = actual if actual <= hold else hold + cost
    best = min(actual, cost)
    assert spent <= (1 + HOLD_IDLE_TRUST) / HOLD_IDLE_TRUST * best + 1e-12


@given(gap=seconds, longer=seconds, cost=seconds)
def test_a_longer_predicted_gap_never_keeps_it_longer(gap, longer, cost):
    assert keep_idle_for(gap + longer, cost) <= keep_idle_for(gap, cost)
    assert 0.0 <= keep_idle_for(gap, cost) <= 1.0
