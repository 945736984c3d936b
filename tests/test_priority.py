"""The worklist priority policy (a pure function)."""

from __future__ import annotations

import math

import pytest

from pacsbridge.worklist.priority import OVERDUE_BONUS, priority_score, urgency_boost

MAX = 240.0


def test_higher_probability_ranks_higher_when_fresh() -> None:
    assert priority_score(0.9, 0, None, MAX) > priority_score(0.6, 0, None, MAX)


def test_waiting_raises_priority_monotonically() -> None:
    scores = [priority_score(0.7, w, "ROUTINE", MAX) for w in (0, 1, 10, 60, 239, 240, 1000)]
    assert scores == sorted(scores)
    assert len(set(scores[:6])) == 6  # strictly increasing up to the overdue jump


def test_overdue_item_is_above_any_fresh_or_waiting_item() -> None:
    weakest_overdue = priority_score(0.0, MAX, None, MAX)
    strongest_fresh = priority_score(1.0, 0, "STAT", MAX)
    strongest_not_overdue = priority_score(1.0, MAX - 1e-6, "STAT", MAX)
    assert weakest_overdue > strongest_fresh
    assert weakest_overdue > strongest_not_overdue
    assert priority_score(0.5, MAX, None, MAX) - priority_score(0.5, MAX - 1e-6, None, MAX) >= OVERDUE_BONUS - 1e-6


def test_overdue_items_still_ordered_by_probability_and_urgency() -> None:
    assert priority_score(0.9, 500, None, MAX) > priority_score(0.6, 500, None, MAX)
    assert priority_score(0.6, 500, "STAT", MAX) > priority_score(0.9, 500, None, MAX)


@pytest.mark.parametrize("value,boost", [("STAT", 1.0), ("stat ", 1.0), ("HIGH", 0.5), ("ROUTINE", 0.0),
                                         ("LOW", 0.0), ("", 0.0), (None, 0.0), ("garbage", 0.0)])
def test_urgency_boost(value: str | None, boost: float) -> None:
    assert urgency_boost(value) == boost


def test_stat_outranks_routine_on_probability_alone() -> None:
    assert priority_score(0.55, 0, "STAT", MAX) > priority_score(1.0, 0, "ROUTINE", MAX)
    assert priority_score(0.6, 0, "HIGH", MAX) > priority_score(0.6, 0, None, MAX)


def test_inputs_are_clamped_and_validated() -> None:
    assert priority_score(1.7, 0, None, MAX) == priority_score(1.0, 0, None, MAX)
    assert priority_score(0.5, -30, None, MAX) == priority_score(0.5, 0, None, MAX)  # clock skew
    with pytest.raises(ValueError):
        priority_score(math.nan, 0, None, MAX)
    with pytest.raises(ValueError):
        priority_score(0.5, 0, None, 0)
