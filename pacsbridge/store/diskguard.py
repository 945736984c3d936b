"""Free-space floor of the spool: below ``min_free_bytes`` the receiver refuses new instances.

A full disk would otherwise be found by a failing write or fsync half-way through an instance.  The
check is one ``statvfs`` of the spool, cached for ``cache_s`` seconds, so an association storing many
instances pays it about once a second, not per instance or per fragment.  The guard logs one WARNING
when space falls under the floor and one INFO when it is back; receiving resumes by itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MIN_FREE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class FreeSpace:
    free_bytes: int  # available to an unprivileged writer (f_bavail)
    total_bytes: int


def free_space(path: Path) -> FreeSpace:
    """Free and total bytes of the file system holding ``path`` (raises OSError)."""
    st = os.statvfs(path)
    return FreeSpace(free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


class DiskGuard:
    """Says whether the spool has room for another instance; thread-safe (one per process)."""

    def __init__(self, root: Path, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES, cache_s: float = 1.0,
                 on_change: Callable[[bool, str], None] | None = None) -> None:
        """``on_change(low, message)`` is called once per fall under the floor and once per recovery
        (outside the guard's lock; e.g. to record an event)."""
        self.root = Path(root)
        self.on_change = on_change
        self.min_free_bytes = int(min_free_bytes)
        self.cache_s = cache_s
        self.refused = 0  # C-STOREs refused for lack of space (counted in /metrics)
        self.last_free: int | None = None
        self._checked_at = float("-inf")
        self._low = False
        self._error: str | None = None
        self._lock = threading.Lock()

    def check(self) -> str | None:
        """None when there is room; else the reason (one line, with the free space)."""
        now = time.monotonic()
        change = None
        with self._lock:
            if now - self._checked_at >= self.cache_s:
                self._checked_at = now
                change = self._measure()
            if self._error is not None:
                reason: str | None = self._error
            elif self._low:
                reason = (f"spool free space {human_bytes(self.last_free or 0)} is below min_free_bytes "
                          f"({human_bytes(self.min_free_bytes)})")
            else:
                reason = None
        if change is not None and self.on_change is not None:
            try:
                self.on_change(*change)
            except Exception:  # noqa: BLE001 - recording the change must not fail a C-STORE
                log.warning("disk guard: on_change failed", exc_info=True)
        return reason

    def refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def _measure(self) -> tuple[bool, str] | None:
        """Read the free space; returns (low, message) when the state changed."""
        try:
            space = free_space(self.root)
        except OSError as exc:
            if self._error is None:
                log.warning("cannot read the spool's free space (%s): %s", self.root, exc.strerror or exc)
            self._error = f"cannot read the spool's free space: {exc.strerror or exc}"
            return None
        self._error = None
        self.last_free = space.free_bytes
        low = space.free_bytes < self.min_free_bytes
        change = None
        if low and not self._low:
            message = (f"spool free space {human_bytes(space.free_bytes)} is below min_free_bytes "
                       f"({human_bytes(self.min_free_bytes)}): refusing C-STORE (0xA700) until space is freed")
            log.warning("%s", message)
            change = (True, message)
        elif self._low and not low:
            message = (f"spool free space {human_bytes(space.free_bytes)} is above min_free_bytes again: "
                       "receiving resumes")
            log.info("%s", message)
            change = (False, message)
        self._low = low
        return change
