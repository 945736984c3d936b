"""Orphan spool files: left by a crash between moving a file into place and committing its row.

Such a file was never acknowledged (the sender got no success and sends the instance again, or
gives up), and nothing else would ever delete it.  ``pacsbridge serve`` sweeps them once at start,
in the background so the DICOM port opens at once.  A file is removed only when

* its name is a spool name (``ab/cd/<sha256>.dcm``; anything else under the spool is left alone),
* no instance row with a kept file names it (rows whose file retention deleted do not count), and
* it is older than ``min_age_s``: a C-STORE in flight (file moved into place, commit pending, in this
  or another receiver sharing the spool) looks like an orphan for a moment.

The rows are read once into a sorted array of 32-byte digests (32 bytes per stored file, so the sweep
does not scan the table once per file), and each batch of candidates is checked again right before
deleting, so a row committed during the sweep always keeps its file.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .models import Instance
from .records import record_event
from .spool import SPOOL_NAME_RE, Spool

log = logging.getLogger(__name__)

#: Unreferenced spool files younger than this are left for the next start (see the module docstring).
ORPHAN_MIN_AGE_S = 600.0
_RECHECK_BATCH = 500


def _recorded_digests(sessions: sessionmaker[Session]) -> np.ndarray:
    """Sorted SHA-256 digests (dtype S32) of every spool file an instance row still names."""
    parts: list[np.ndarray] = []
    with sessions() as session:
        result = session.execute(
            select(Instance.file_path).where(Instance.spool_deleted_at.is_(None))
            .execution_options(yield_per=10_000)
        )
        for chunk in result.partitions():
            digests = [bytes.fromhex(m.group(3)) for (path,) in chunk if (m := SPOOL_NAME_RE.match(path or ""))]
            parts.append(np.array(digests, dtype="S32"))
    return np.sort(np.concatenate(parts)) if parts else np.array([], dtype="S32")


def _contains(sorted_digests: np.ndarray, digest: bytes) -> bool:
    i = int(np.searchsorted(sorted_digests, digest))
    return i < len(sorted_digests) and sorted_digests[i] == digest


def _still_unrecorded(sessions: sessionmaker[Session], relpaths: list[str]) -> list[str]:
    with sessions() as session:
        recorded = set(session.scalars(
            select(Instance.file_path).where(Instance.file_path.in_(relpaths), Instance.spool_deleted_at.is_(None))
        ))
    return [p for p in relpaths if p not in recorded]


def sweep_orphans(
    sessions: sessionmaker[Session], spool: Spool, *, min_age_s: float = ORPHAN_MIN_AGE_S,
    stop: threading.Event | None = None,
) -> int:
    """Delete unreferenced spool files older than ``min_age_s``; returns how many were deleted."""
    recorded = _recorded_digests(sessions)
    cutoff = time.time() - min_age_s
    removed = 0
    candidates: list[str] = []

    def flush() -> None:
        nonlocal removed
        for rel in _still_unrecorded(sessions, candidates):
            try:
                spool.path(rel).unlink()
                removed += 1
                log.debug("removed orphan spool file %s", rel)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove orphan spool file %s: %s", rel, exc.strerror or exc)
        candidates.clear()

    for rel, entry in spool.iter_stored():
        if stop is not None and stop.is_set():
            break
        digest = bytes.fromhex(entry.name[:64])
        if _contains(recorded, digest):
            continue
        try:
            if entry.stat().st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        candidates.append(rel)
        if len(candidates) >= _RECHECK_BATCH:
            flush()
    if candidates:
        flush()
    return removed


class OrphanSweep:
    """A one-shot background sweep as a daemon component: runs :func:`sweep_orphans` once, then records
    one ``spool_orphans_removed`` Event with the count (plus ``tmp_removed``: ``tmp/`` leftovers that
    :meth:`Spool.prepare` removed before listening) when anything was removed.  With ``leader`` (a
    store.leader.Leadership) it waits until this node leads the scheduler: with several nodes on one
    spool, one sweeps."""

    name = "spool orphan sweep"

    def __init__(self, sessions: sessionmaker[Session], spool: Spool, *, tmp_removed: int = 0,
                 min_age_s: float = ORPHAN_MIN_AGE_S, leader=None) -> None:  # noqa: ANN001
        self._leader = leader
        self._sessions = sessions
        self._spool = spool
        self._tmp_removed = tmp_removed
        self._min_age_s = min_age_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.removed: int | None = None  # orphans removed, once the sweep finished

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spool-orphan-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while self._leader is not None and not self._leader.is_leader():
            if self._stop.wait(1.0):
                return
        started = time.monotonic()
        try:
            removed = sweep_orphans(self._sessions, self._spool, min_age_s=self._min_age_s, stop=self._stop)
        except Exception:  # noqa: BLE001 - e.g. the database is down: try again at the next start
            log.exception("spool orphan sweep failed; it runs again at the next start")
            removed = 0
        self.removed = removed
        if removed or self._tmp_removed:
            detail = (f"removed {removed} orphan spool file(s) (no instance row, older than "
                      f"{self._min_age_s:g} s) and {self._tmp_removed} leftover temporary file(s)")
            log.warning("spool: %s", detail)
            record_event(self._sessions, "spool_orphans_removed", detail, level="warning")
        log.info("spool orphan sweep done in %.1f s", time.monotonic() - started)
