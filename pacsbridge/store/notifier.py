"""A thread-safe "something new was stored" signal between the receiver and the worker of one process.

The database stays the hand-off: the notifier only says "look now" so an idle worker does not sleep
out its poll interval after a C-STORE.  Waiters still poll on a timeout for instances stored by
other processes (a separate receiver, another host).  A sequence number instead of a bare
``threading.Event`` means a notification that arrives while the worker is busy is not lost, and
any number of threads may wait without clearing each other's signal.
"""

from __future__ import annotations

import threading


class StoreNotifier:
    """``notify()`` after a commit; ``wait(seen, timeout)`` until a notification newer than ``seen``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0

    @property
    def count(self) -> int:
        """Notifications so far; take it *before* looking for work, pass it to :meth:`wait`."""
        with self._cond:
            return self._seq

    def notify(self) -> None:
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float | None) -> int:
        """Block until :attr:`count` differs from ``seen`` or ``timeout`` seconds pass; returns the count."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq != seen, timeout)
            return self._seq
