"""Worklist items: built from positive predictions (one per study) and listed in priority order.

:class:`WorklistUpdater` is what the scheduler job (and the inference worker, right after it records
a batch) calls.  It is idempotent: with the same clock it changes nothing on a second run, and it
never lowers an item's priority or probability.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..store.models import Instance, Prediction, Series, Study, WorklistItem, WorklistStatus, utcnow
from .priority import priority_score

log = logging.getLogger(__name__)

#: Skip a write when aging moved the priority by less than this (about 15 s of waiting with the
#: default 240-minute ramp): keeps the job from rewriting every row on every tick.
MIN_PRIORITY_STEP = 1e-3

OPEN_STATUSES = (WorklistStatus.PENDING.value, WorklistStatus.IN_PROGRESS.value)


def as_utc(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


@dataclass(frozen=True)
class RefreshResult:
    created: int = 0
    updated: int = 0


class WorklistUpdater:
    """Turns positive predictions into worklist items and ages their priority.

    Thread-safe within a process (one lock); across processes an insert race on the unique
    ``study_id`` is retried once.
    """

    def __init__(
        self, sessions: sessionmaker[Session], max_wait_minutes: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._max_wait = float(max_wait_minutes)
        self._clock = clock
        self._lock = threading.Lock()

    def refresh(self, study_ids: Iterable[int] | None = None, now: datetime | None = None) -> RefreshResult:
        """Create/update items for ``study_ids`` (all studies with positives when ``None``)."""
        ids = None if study_ids is None else sorted(set(study_ids))
        if ids is not None and not ids:
            return RefreshResult()
        now = as_utc(now or self._clock())
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._sessions.begin() as session:
                        return self._refresh(session, ids, now)
                except IntegrityError:
                    # Another process created the same study's item between our read and insert.
                    if attempt == 2:
                        raise
                    log.info("worklist: concurrent insert, retrying once")
        raise AssertionError("unreachable")

    def _refresh(self, session: Session, ids: list[int] | None, now: datetime) -> RefreshResult:
        positives = (
            select(Series.study_id, func.max(Prediction.probability))
            .join(Instance, Instance.series_id == Series.id)
            .join(Prediction, Prediction.instance_id == Instance.id)
            .where(Prediction.positive.is_(True))
            .group_by(Series.study_id)
        )
        if ids is not None:
            positives = positives.where(Series.study_id.in_(ids))
        best = {sid: float(p) for sid, p in session.execute(positives)}

        items_q = select(WorklistItem, Study).join(Study, Study.id == WorklistItem.study_id)
        if ids is not None:
            items_q = items_q.where(WorklistItem.study_id.in_(ids))
        items = {item.study_id: (item, study) for item, study in session.execute(items_q)}

        created = updated = 0
        missing = [sid for sid in best if sid not in items]
        if missing:
            studies = session.scalars(select(Study).where(Study.id.in_(missing))).all()
            for study in studies:
                arrived = as_utc(study.created_at)
                p = best[study.id]
                item = WorklistItem(
                    study_id=study.id, probability=p, first_positive_at=arrived,
                    status=WorklistStatus.PENDING.value,
                    priority=self._score(p, arrived, study.requested_priority, now),
                    created_at=now, updated_at=now,
                )
                session.add(item)
                created += 1

        for sid, (item, study) in items.items():
            p = max(item.probability, best.get(sid, item.probability))
            new_priority = item.priority
            if item.status in OPEN_STATUSES or p > item.probability:
                computed = self._score(p, as_utc(item.first_positive_at), study.requested_priority, now)
                if computed - item.priority >= MIN_PRIORITY_STEP:
                    new_priority = computed  # never lower: only ever replaced by a larger value
            if p > item.probability or new_priority > item.priority:
                item.probability = p
                item.priority = new_priority
                item.updated_at = now
                updated += 1
        if created or updated:
            log.debug("worklist: %d created, %d updated", created, updated)
        return RefreshResult(created, updated)

    def _score(self, probability: float, arrived: datetime, requested: str | None, now: datetime) -> float:
        waited = (now - arrived).total_seconds() / 60.0
        return priority_score(probability, waited, requested, self._max_wait)


def list_worklist(session: Session, include_completed: bool = False) -> list[dict[str, Any]]:
    """Worklist in reading order: highest priority first, then the longest-waiting study."""
    q = (
        select(WorklistItem, Study.study_instance_uid)
        .join(Study, Study.id == WorklistItem.study_id)
        .order_by(WorklistItem.priority.desc(), WorklistItem.first_positive_at, WorklistItem.id)
    )
    if not include_completed:
        q = q.where(WorklistItem.status.in_(OPEN_STATUSES))
    return [
        {
            "study_instance_uid": uid,
            "priority": round(item.priority, 6),
            "probability": round(item.probability, 6),
            "status": item.status,
            "received_at": as_utc(item.first_positive_at).isoformat(),
        }
        for item, uid in session.execute(q)
    ]


def count_items(session: Session, include_completed: bool = False) -> int:
    q = select(func.count(WorklistItem.id))
    if not include_completed:
        q = q.where(WorklistItem.status.in_(OPEN_STATUSES))
    return int(session.scalar(q) or 0)
