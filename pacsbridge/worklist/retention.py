"""Retention: delete spooled DICOM files once they are old and already scored.

Rows stay (the audit trail and predictions outlive the pixels).  A deleted file is marked by
``Instance.spool_deleted_at`` (``file_path`` is kept, so the record still says where it was) plus an
``Event`` of kind ``spool_file_deleted``.
Files of instances that are not settled (``received``, ``processing``, ``failed``: a failed
instance is tried again from its file) are never touched.  The rows are selected and updated
through :mod:`pacsbridge.store.queue`, the owner of the instance state.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from ..store import queue
from ..store.models import utcnow
from ..store.spool import OutsideSpool, contained_path

log = logging.getLogger(__name__)


def purge_spool(
    sessions: sessionmaker[Session], spool_dir: Path, retention_days: float,
    now: datetime | None = None, batch: int = 500,
) -> int:
    """Delete spool files older than ``retention_days`` for scored instances; returns how many.

    ``retention_days == 0`` keeps everything.  Works in batches of ``batch`` rows per transaction.
    """
    if retention_days <= 0:
        return 0
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    root = Path(spool_dir).resolve()
    deleted = 0
    undeletable: set[int] = set()
    while True:
        with sessions.begin() as session:
            rows = queue.retention_candidates(session, cutoff, undeletable, batch)
            for inst in rows:
                ok, detail = _delete_file(root, inst.file_path)
                queue.record_spool_deletion(session, inst, ok, f"retention {retention_days:g} days: {detail}", now)
                if ok:
                    deleted += 1
                else:
                    undeletable.add(inst.id)  # retried on the next run, not in this loop
        if len(rows) < batch:
            break
    if deleted:
        log.info("retention: deleted %d spool files older than %g days", deleted, retention_days)
    return deleted


def _delete_file(root: Path, rel: str) -> tuple[bool, str]:
    """Unlink ``root/rel``, refusing paths that escape the spool.  Returns (gone now, what happened)."""
    try:
        path = contained_path(root, rel)
    except OutsideSpool:
        log.error("retention: refusing to delete %r: outside the spool", rel)
        return False, f"not deleted, path {rel!r} is outside the spool"
    try:
        path.unlink()
        return True, f"deleted {rel}"
    except FileNotFoundError:
        return True, f"{rel} was already gone"
    except OSError as exc:
        log.error("retention: cannot delete %s: %s", rel, exc)
        return False, f"could not delete {rel}: {exc.strerror or exc}"
