"""Schedule: window, period and reproducible probability."""
from __future__ import annotations

import pytest
import torch

from attacks import Schedule, build_schedule


def test_default_is_always_active():
    s = Schedule()
    assert all(s.is_active(r, 0) for r in range(50))


def test_window_is_start_inclusive_end_exclusive():
    s = Schedule(start_round=3, end_round=6)
    assert [r for r in range(10) if s.is_active(r, 0)] == [3, 4, 5]


def test_period_counts_from_start_round():
    s = Schedule(start_round=2, period_on=2, period_off=3)
    assert [r for r in range(14) if s.is_active(r, 0)] == [2, 3, 7, 8, 12, 13]
    s = Schedule(start_round=1, end_round=9, period_on=1, period_off=1)
    assert [r for r in range(12) if s.is_active(r, 0)] == [1, 3, 5, 7]


def test_probability_is_reproducible_and_seed_dependent():
    s = Schedule(probability=0.4)
    a = [s.is_active(r, 11) for r in range(400)]
    assert a == [s.is_active(r, 11) for r in range(400)]
    assert a[::-1] == [s.is_active(r, 11) for r in reversed(range(400))]  # order-independent
    b = [s.is_active(r, 12) for r in range(400)]
    assert a != b
    assert 0.3 < sum(a) / len(a) < 0.5


def test_generator_uses_its_initial_seed_without_consuming_state():
    s = Schedule(probability=0.5)
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    assert [s.is_active(r, g) for r in range(30)] == [s.is_active(r, 11) for r in range(30)]
    assert torch.equal(state, g.get_state())


def test_probability_combines_with_window():
    s = Schedule(start_round=5, end_round=10, probability=0.999999)
    assert [r for r in range(12) if s.is_active(r, 1)] == [5, 6, 7, 8, 9]
    assert not any(Schedule(probability=0.0).is_active(r, 1) for r in range(20))


@pytest.mark.parametrize("params, key", [
    (dict(start_round=-1), "start_round"),
    (dict(start_round=4, end_round=4), "end_round"),
    (dict(period_on=2), "period_off"),
    (dict(period_off=2), "period_on"),
    (dict(period_on=0, period_off=1), "period_on"),
    (dict(probability=1.5), "probability"),
    (dict(probabilty=0.5), "probabilty"),
])
def test_schedule_validation_names_the_key(params, key):
    with pytest.raises(ValueError, match=key):
        build_schedule(params)
