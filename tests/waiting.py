"""Polling with a deadline, for tests: wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy and return that; fail the test, naming
    ``what``, when it is still falsy ``timeout`` seconds later (it is tried once more at the deadline).

    ``what`` may be a function, called only on a timeout, for a message that shows the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
