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

    def __init__(self, root: Path, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES, cache_s: float = 1.0) -> None:
        self.root = Path(root)
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
        with self._lock:
            if now - self._checked_at >= self.cache_s:
                self._checked_at = now
                self._measure()
            if self._error is not None:
                return self._error
            if self._low:
                return (f"spool free space {human_bytes(self.last_free or 0)} is below min_free_bytes "
                        f"({human_bytes(self.min_free_bytes)})")
            return None

    def refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def _measure(self) -> None:
        try:
            space = free_space(self.root)
        except OSError as exc:
            if self._error is None:
                log.warning("cannot read the spool's free space (%s): %s", self.root, exc.strerror or exc)
            self._error = f"cannot read the spool's free space: {exc.strerror or exc}"
            return
        self._error = None
        self.last_free = space.free_bytes
        low = space.free_bytes < self.min_free_bytes
        if low and not self._low:
            log.warning("spool free space %s is below min_free_bytes (%s): refusing C-STORE (0xA700) until "
                        "space is freed", human_bytes(space.free_bytes), human_bytes(self.min_free_bytes))
        elif self._low and not low:
            log.info("spool free space %s is above min_free_bytes again: receiving resumes",
                     human_bytes(space.free_bytes))
        self._low = low
