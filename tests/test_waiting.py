"""The test helper wait_until: returns the condition's value, fails naming what it waited for."""

from __future__ import annotations

import pytest
from waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = iter([None, 0, [], "ready"])
    assert wait_until(lambda: next(calls), 5, "the fourth call", interval=0) == "ready"


def test_fails_naming_what_it_waited_for_and_tries_at_the_deadline() -> None:
    calls = []
    with pytest.raises(AssertionError, match="waiting for the moon"):
        wait_until(lambda: calls.append(1), 0.05, "the moon", interval=0.01)
    assert len(calls) >= 2
    with pytest.raises(AssertionError, match="last seen: 3"):
        wait_until(lambda: False, 0, lambda: "last seen: 3")
