"""Worklist items: built from positive predictions and listed in priority order.

:class:`WorklistUpdater` is what the scheduler job (and the inference worker, right after it records
a batch) calls.  It is idempotent: with the same clock it changes nothing on a second run, and it
never lowers an item's priority or probability.  Its cost does not grow with the history: each run
looks only at studies with predictions recorded since the previous run, and ages the priority of
``scheduled`` items only (ageing stops once an item is claimed, completed or canceled).

A study has at most one open item.  A study that receives new positive images after its item was
completed or canceled gets a NEW item (the closed one keeps its finding); its ``first_positive_at``
is the first positive prediction recorded after the closure.

Predictions made in shadow mode (``predictions.shadow``) never open or raise an item, also after
the site switches to live: switching acts on images scored from then on.

With ``audit_fraction`` > 0, studies scored negative are drawn for a blinded audit read
(pacsbridge.worklist.audit); an open audit item whose study then gets a positive image becomes a flag.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Sequence

from pydicom.uid import generate_uid
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..store.models import Instance, Prediction, Series, Study, WorklistItem, WorklistStatus, utcnow
from . import audit
from .lifecycle import OPEN_STATUSES
from .priority import audit_priority_score, priority_score

log = logging.getLogger(__name__)

#: Skip a write when aging moved the priority by less than this (about 15 s of waiting with the
#: default 240-minute ramp): keeps the job from rewriting every row on every tick.
MIN_PRIORITY_STEP = 1e-3

#: Each incremental run looks this many prediction ids below the highest it saw: a transaction
#: that took a lower id but committed later (several workers on PostgreSQL) is not missed.
LOOKBACK_IDS = 64

ALL_STATUSES = tuple(s.value for s in WorklistStatus)
#: Refused images are looked for this far before the previous full run (a commit that came late).
AUDIT_REFUSED_MARGIN = timedelta(minutes=1)


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
        clock: Callable[[], datetime] = utcnow, *, audit_fraction: float = 0.0, audit_max_per_day: int = 0,
    ) -> None:
        self._sessions = sessions
        self._max_wait = float(max_wait_minutes)
        self._audit_fraction = float(audit_fraction)
        self._audit_max_per_day = int(audit_max_per_day)
        self._clock = clock
        self._lock = threading.Lock()
        self._watermark: int | None = None  # highest prediction id seen by a full (scheduler) run
        self._scanned_at: datetime | None = None  # clock of the last full run

    def refresh(self, study_ids: Iterable[int] | None = None, now: datetime | None = None) -> RefreshResult:
        """Create/update items for ``study_ids``; with ``None``, for the studies with predictions
        recorded since the last run (every study on the first run), and age scheduled items."""
        ids = None if study_ids is None else sorted(set(study_ids))
        if ids is not None and not ids:
            return RefreshResult()
        now = now or self._clock()
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._sessions.begin() as session:
                        return self._refresh(session, ids, now)
                except IntegrityError:
                    # Another process opened the same study's item between our read and insert.
                    if attempt == 2:
                        raise
                    log.info("worklist: concurrent insert, retrying once")
        raise AssertionError("unreachable")

    def _refresh(self, session: Session, ids: list[int] | None, now: datetime) -> RefreshResult:
        scan_all = ids is None
        if scan_all:
            top = session.scalar(select(func.max(Prediction.id))) or 0
            changed = select(Series.study_id).join(Instance, Instance.series_id == Series.id).join(
                Prediction, Prediction.instance_id == Instance.id).where(
                Prediction.positive.is_(True), Prediction.shadow.is_(False))
            if self._watermark is not None:
                changed = changed.where(Prediction.id > self._watermark - LOOKBACK_IDS)
            ids = sorted(set(session.scalars(changed.distinct())))
        created, updated = self._update_studies(session, ids, now) if ids else (0, 0)
        if self._audit_fraction > 0:
            negatives = (audit.recent_study_ids(
                session, now, None if self._watermark is None else self._watermark - LOOKBACK_IDS,
                None if self._scanned_at is None else self._scanned_at - AUDIT_REFUSED_MARGIN) if scan_all else ids)
            created += audit.choose_audits(session, negatives, now, fraction=self._audit_fraction,
                                           max_per_day=self._audit_max_per_day, max_wait_minutes=self._max_wait)
        if scan_all:
            updated += self._age_scheduled(session, now, skip=set(ids))
            self._watermark = top
            self._scanned_at = now
        if created or updated:
            log.debug("worklist: %d created, %d updated", created, updated)
        return RefreshResult(created, updated)

    def _update_studies(self, session: Session, ids: list[int], now: datetime) -> tuple[int, int]:
        """Open or update the items of these studies from their positive predictions."""
        positives: dict[int, list[tuple[float, datetime]]] = {}
        for sid, p, at in session.execute(
            select(Series.study_id, Prediction.probability, Prediction.created_at)
            .join(Instance, Instance.series_id == Series.id).join(Prediction, Prediction.instance_id == Instance.id)
            .where(Prediction.positive.is_(True), Prediction.shadow.is_(False), Series.study_id.in_(ids))
        ):
            positives.setdefault(sid, []).append((float(p), at))
        studies = {st.id: st for st in session.scalars(select(Study).where(Study.id.in_(list(positives))))}
        open_items: dict[int, WorklistItem] = {}
        closed_at: dict[int, datetime] = {}
        for item in session.scalars(select(WorklistItem).where(WorklistItem.study_id.in_(list(positives)))):
            if item.status in OPEN_STATUSES:
                open_items[item.study_id] = item
            elif item.completed_at is not None:
                closed = item.completed_at
                closed_at[item.study_id] = max(closed, closed_at.get(item.study_id, closed))
        created = updated = 0
        for sid, preds in positives.items():
            study = studies[sid]
            item = open_items.get(sid)
            if item is None:
                after = closed_at.get(sid)
                fresh = [(p, at) for p, at in preds if after is None or at > after]
                if not fresh:
                    continue  # every positive was already read on a closed item
                first = min(at for _, at in fresh)
                p = max(p for p, _ in fresh)
                session.add(WorklistItem(
                    study_id=sid, open_study_id=sid, ups_uid=generate_uid(), probability=p, first_positive_at=first,
                    status=WorklistStatus.SCHEDULED.value,
                    priority=self._score(p, first, study.requested_priority, now), created_at=now, updated_at=now,
                ))
                created += 1
                continue
            if item.kind == audit.AUDIT:
                self._promote(session, item, preds, study.requested_priority, now)
                updated += 1
                continue
            since = item.first_positive_at
            p = max([item.probability] + [q for q, at in preds if at >= since])
            if self._update(session, item, p, study.requested_priority, now):
                updated += 1
        return created, updated

    def _promote(self, session: Session, item: WorklistItem, preds: list[tuple[float, datetime]],
                 requested: str | None, now: datetime) -> None:
        """An open audit item whose study now has a positive image becomes a flag (unblinded)."""
        first = min(at for _, at in preds)
        p = max(p for p, _ in preds)
        session.execute(
            update(WorklistItem).where(WorklistItem.id == item.id, WorklistItem.kind == audit.AUDIT)
            .values(kind=audit.FLAG, probability=p, first_positive_at=first, updated_at=now,
                    priority=max(item.priority, self._score(p, first, requested, now)))
            .execution_options(synchronize_session=False))
        session.expire(item)
        log.info("worklist item %d: audit item became a flag (a positive image arrived)", item.id)

    def _age_scheduled(self, session: Session, now: datetime, skip: set[int]) -> int:
        """Age the priority of every scheduled item (cost: the open queue, not the history).

        Plain columns in, one executemany out: this runs every few seconds over the whole queue."""
        rows = session.execute(
            select(WorklistItem.id, WorklistItem.study_id, WorklistItem.priority, WorklistItem.probability,
                   WorklistItem.first_positive_at, Study.requested_priority, WorklistItem.kind)
            .join(Study, Study.id == WorklistItem.study_id)
            .where(WorklistItem.status == WorklistStatus.SCHEDULED.value)
        ).all()
        changes = []
        for iid, sid, priority, p, since, requested, kind in rows:
            if sid in skip:
                continue
            computed = (self._score(p, since, requested, now) if kind != audit.AUDIT else
                        audit_priority_score((now - since).total_seconds() / 60.0, self._max_wait))
            if computed - priority >= MIN_PRIORITY_STEP:  # never lower
                changes.append({"b_id": iid, "b_priority": computed})
        if changes:
            # Only while still scheduled: a claim made meanwhile stops the ageing.
            session.connection().execute(
                update(WorklistItem.__table__)
                .where(WorklistItem.__table__.c.id == bindparam("b_id"),
                       WorklistItem.__table__.c.status == WorklistStatus.SCHEDULED.value)
                .values(priority=bindparam("b_priority"), updated_at=now), changes)
        return len(changes)

    def _update(self, session: Session, item: WorklistItem, p: float, requested: str | None, now: datetime) -> bool:
        """Raise the item's probability/priority if warranted; a plain UPDATE of those columns only, so
        it never overwrites a claim made meanwhile (the life cycle owns status and claim columns)."""
        new_priority = item.priority
        if item.status == WorklistStatus.SCHEDULED.value or p > item.probability:
            computed = self._score(p, item.first_positive_at, requested, now)
            if computed - item.priority >= MIN_PRIORITY_STEP:
                new_priority = computed  # never lower: only ever replaced by a larger value
        if p > item.probability or new_priority > item.priority:
            session.execute(
                update(WorklistItem).where(WorklistItem.id == item.id)
                .values(probability=max(p, item.probability), priority=new_priority, updated_at=now)
                .execution_options(synchronize_session=False))
            session.expire(item)
            return True
        return False

    def _score(self, probability: float, since: datetime, requested: str | None, now: datetime) -> float:
        waited = (now - since).total_seconds() / 60.0
        return priority_score(probability, waited, requested, self._max_wait)


def _statuses(status: str | Sequence[str] | None, include_completed: bool) -> tuple[str, ...]:
    if include_completed or status == "all":
        return ALL_STATUSES
    if status is None:
        return OPEN_STATUSES
    values = (status,) if isinstance(status, str) else tuple(status)
    bad = [v for v in values if v not in ALL_STATUSES]
    if bad:
        raise ValueError(f"unknown status {bad[0]!r}; use one of {', '.join(ALL_STATUSES)} or all")
    return values


def _modality_subquery():  # noqa: ANN202
    return (select(func.min(Series.modality)).where(Series.study_id == Study.id)
            .correlate(Study).scalar_subquery())


W, S = WorklistItem, Study
#: The columns behind :func:`item_row` (plain columns, not ORM objects: listing stays cheap).
ROW_COLUMNS = (
    W.id, W.status, W.priority, W.probability, W.first_positive_at, W.claimed_by, W.claim_expires_at, W.finding,
    W.completed_by, W.completed_at, W.ups_uid, W.comment, W.cancel_reason, W.claimed_at, W.kind,
    S.study_instance_uid, S.accession_number, S.patient_name, S.patient_id, S.patient_age, S.patient_sex,
    S.patient_birth_date, S.study_date, S.study_description, S.referring_physician, S.requested_priority,
    S.created_at.label("study_received_at"), _modality_subquery().label("modality"),
)


def row_query():  # noqa: ANN201 - a Select
    """SELECT of :data:`ROW_COLUMNS` (items joined with their study)."""
    return select(*ROW_COLUMNS).join(Study, Study.id == WorklistItem.study_id)


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def item_row(r: Any, now: datetime) -> dict[str, Any]:
    """The fields of one item, as the API and ``pacsbridge worklist --json`` show them.

    ``r``: a row of :func:`row_query` as a dict (``dict(zip(result.keys(), row))``: cheaper than
    attribute access on 200 rows)."""
    received = r["study_received_at"]
    completed = r["completed_at"]
    end = completed if completed else now
    in_progress = r["status"] == WorklistStatus.IN_PROGRESS.value
    blinded = audit.is_blinded(r)  # an audit read not yet completed: no AI score shown
    return {
        "id": r["id"],
        "status": r["status"],
        "priority": round(r["priority"], 6),
        "probability": None if blinded else round(r["probability"], 6),
        "study_instance_uid": r["study_instance_uid"],
        "accession_number": r["accession_number"],
        "patient_name": r["patient_name"],
        "patient_id": r["patient_id"],
        "patient_age": r["patient_age"],
        "study_date": r["study_date"],
        "study_description": r["study_description"],
        "modality": r["modality"],
        "requested_priority": r["requested_priority"],
        "received_at": received.isoformat(),
        "first_positive_at": _iso(r["first_positive_at"]),
        "waiting_s": round(max((end - received).total_seconds(), 0.0), 1),
        "claimed_by": r["claimed_by"] if in_progress else None,
        "claim_expires_at": _iso(r["claim_expires_at"]) if in_progress else None,
        "finding": r["finding"],
        "completed_by": r["completed_by"],
        "completed_at": _iso(completed),
        "ups_uid": r["ups_uid"],
        "kind": r["kind"],
        "blinded": blinded,
    }


def fetch_rows(session: Session, query: Any) -> list[dict[str, Any]]:
    """Rows of ``query`` as dicts keyed by column label."""
    result = session.execute(query)
    keys = list(result.keys())
    return [dict(zip(keys, row)) for row in result]


def list_worklist(
    session: Session, include_completed: bool = False, *, status: str | Sequence[str] | None = None,
    limit: int | None = None, offset: int = 0, now: datetime | None = None, kind: str | None = None,
) -> list[dict[str, Any]]:
    """Worklist in reading order: highest priority first, then the longest-waiting item.

    ``status``: one status, several, or ``"all"``; default the open ones (scheduled, in_progress).
    ``kind``: ``flag`` or ``audit`` only; None or ``"all"``: both.
    """
    now = now or utcnow()
    if kind not in (None, "all", *audit.KINDS):
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(audit.KINDS)} or all")
    q = (
        row_query()
        .where(WorklistItem.status.in_(_statuses(status, include_completed)),
               *([WorklistItem.kind == kind] if kind in audit.KINDS else []))
        .order_by(WorklistItem.priority.desc(), WorklistItem.first_positive_at, WorklistItem.id)
        .offset(offset)
    )
    if limit is not None:
        q = q.limit(limit)
    return [item_row(r, now) for r in fetch_rows(session, q)]


def count_items(session: Session, include_completed: bool = False) -> int:
    q = select(func.count(WorklistItem.id))
    if not include_completed:
        q = q.where(WorklistItem.status.in_(OPEN_STATUSES))
    return int(session.scalar(q) or 0)
