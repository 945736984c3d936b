"""The outbox: the one owner of forwarding state.  Each entry is one object (SR, heatmap, image,
HL7 ORU) of one result for one destination:

    pending --(acknowledged)--> sent
    pending --(permanent failure, or still failing after max age)--> dead
    pending --(transient failure)--> pending, later (exponential backoff with jitter)
    dead --(pacsbridge outbox retry)--> pending

Several nodes may forward: :func:`claim_due` claims due entries for one node (``claimed_by``) until
``lease_until`` (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL), and only claims a
destination's entries while no other node holds a live lease on that destination (checked under a
per-destination transaction advisory lock), so there is one association per destination across the
cluster.  Only the holder may record the outcome (:func:`mark_sent`, :func:`mark_failed`); a node that
dies mid-send leaves leases that expire, and the entries are sent again (with the same UIDs).

Entries are written by :meth:`Outbox.enqueue` inside the transaction that records the prediction,
so a result is never recorded without its entries.  An entry only becomes ``sent`` after the peer
acknowledged it; a crash between the acknowledgement and that commit sends it again, with the same
UIDs (see results.py), which the receiver de-duplicates.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from ..config import Destination
from ..store.claim_rules import gone_process
from ..store.models import Event, Instance, OutboxEntry, OutboxState, Prediction, Series, Study, utcnow
from .results import Result

log = logging.getLogger(__name__)

PENDING, SENT, DEAD = OutboxState.PENDING.value, OutboxState.SENT.value, OutboxState.DEAD.value
STATES = (PENDING, SENT, DEAD)


def objects_for(destination: Destination) -> list[str]:
    """The outbox objects one result makes for ``destination``."""
    return list(destination.objects) if destination.kind == "dicom" else ["oru"]


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 5.0
    max_s: float = 600.0
    max_age: timedelta = timedelta(hours=24)

    def delay(self, attempts: int, rnd: random.Random | None = None) -> float:
        """Backoff after ``attempts`` failed tries: doubling from ``initial_s`` up to ``max_s``, with
        jitter (50-100 % of it) so entries that failed together do not retry in lock step."""
        base = min(self.max_s, self.initial_s * 2 ** max(0, attempts - 1))
        return base * (0.5 + 0.5 * (rnd or random).random())


@dataclass(frozen=True)
class DueEntry:
    """A pending entry ready to be sent, with its result."""

    id: int
    destination: str
    object: str
    attempts: int
    result: Result
    claimed_by: str | None = None  # the node whose lease covers it (claim_due)


class Outbox:
    """Creates entries for new results (inside the recorder's transaction)."""

    def __init__(self, destinations: Iterable[Destination]) -> None:
        self.destinations = list(destinations)

    def enqueue(self, session: Session, prediction_id: int, positive: bool, now: datetime | None = None) -> int:
        """Add the entries of one result to ``session`` (the caller commits); returns how many."""
        now = now or utcnow()
        n = 0
        for d in self.destinations:
            if d.send == "positives" and not positive:
                continue
            for obj in objects_for(d):
                session.add(OutboxEntry(
                    prediction_id=prediction_id, destination=d.name, object=obj, state=PENDING, attempts=0,
                    next_attempt_at=now, created_at=now, queued_at=now, updated_at=now,
                ))
                n += 1
        return n


def _result_query():  # noqa: ANN202
    return (
        select(OutboxEntry, Prediction, Instance, Series.series_instance_uid, Study.study_instance_uid)
        .join(Prediction, Prediction.id == OutboxEntry.prediction_id)
        .join(Instance, Instance.id == Prediction.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
    )


def _result(p: Prediction, inst: Instance, series_uid: str, study_uid: str) -> Result:
    return Result(
        prediction_id=p.id, probability=p.probability, positive=p.positive, threshold=p.threshold,
        model_id=p.model_id, weights_sha256=p.weights_sha256, sop_instance_uid=inst.sop_instance_uid,
        sop_class_uid=inst.sop_class_uid, series_instance_uid=series_uid, study_instance_uid=study_uid,
        file_path=inst.file_path, spool_deleted=inst.spool_deleted_at is not None, calibration=p.calibration,
    )


def due_entries(session: Session, now: datetime | None = None, limit: int = 500,
                destinations: Iterable[str] | None = None) -> list[DueEntry]:
    """Pending entries whose time has come, oldest first."""
    now = now or utcnow()
    q = (_result_query().where(OutboxEntry.state == PENDING, OutboxEntry.next_attempt_at <= now)
         .order_by(OutboxEntry.next_attempt_at, OutboxEntry.id).limit(limit))
    if destinations is not None:
        q = q.where(OutboxEntry.destination.in_(list(destinations)))
    return [DueEntry(e.id, e.destination, e.object, e.attempts, _result(p, i, se, st))
            for e, p, i, se, st in session.execute(q)]


def _destination_lock(session: Session, destination: str) -> bool:
    """PostgreSQL: a transaction advisory lock on one destination (False: another node is claiming
    for it right now).  SQLite serializes writers itself."""
    if session.bind.dialect.name != "postgresql":
        return True
    from ..store.leader import current_schema, lock_key

    key = lock_key(f"pacsbridge-outbox:{destination}", current_schema(session.connection()))
    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar())


def claim_due(sessions: sessionmaker[Session], claimer: str, lease_s: float, now: datetime | None = None,
              limit: int = 500, destinations: Iterable[str] | None = None) -> list[DueEntry]:
    """Claim due entries for ``claimer`` until now + ``lease_s``, oldest first, each destination in its
    own short transaction; a destination on which another claimer holds a live lease is skipped,
    unless that claimer was a process on this machine that is gone (its leases are not waited for)."""
    now = now or utcnow()
    if destinations is None:
        with sessions() as session:
            destinations = list(session.scalars(
                select(OutboxEntry.destination).where(OutboxEntry.state == PENDING).distinct()))
    out: list[DueEntry] = []
    for dest in sorted(destinations):
        with sessions.begin() as session:
            if not _destination_lock(session, dest):
                continue
            holders = set(session.scalars(select(OutboxEntry.claimed_by).where(
                OutboxEntry.destination == dest, OutboxEntry.state == PENDING, OutboxEntry.lease_until > now,
                OutboxEntry.claimed_by != claimer).distinct()))
            # a holder that was a process on this machine and is gone (a crash, a restart) sends nothing more
            gone = {h for h in holders if gone_process(h, claimer)}
            if holders - gone:
                continue
            free = [OutboxEntry.lease_until.is_(None), OutboxEntry.lease_until <= now, OutboxEntry.claimed_by == claimer]
            if gone:
                free.append(OutboxEntry.claimed_by.in_(sorted(gone)))
            q = (select(OutboxEntry.id).where(
                OutboxEntry.destination == dest, OutboxEntry.state == PENDING, OutboxEntry.next_attempt_at <= now,
                or_(*free))
                 .order_by(OutboxEntry.next_attempt_at, OutboxEntry.id).limit(limit))
            if session.bind.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            ids = list(session.scalars(q))
            if not ids:
                continue
            session.execute(update(OutboxEntry).where(OutboxEntry.id.in_(ids))
                            .values(claimed_by=claimer, lease_until=now + timedelta(seconds=lease_s))
                            .execution_options(synchronize_session=False))
            rows = session.execute(_result_query().where(OutboxEntry.id.in_(ids))
                                   .order_by(OutboxEntry.next_attempt_at, OutboxEntry.id))
            out += [DueEntry(e.id, e.destination, e.object, e.attempts, _result(p, i, se, st), claimer)
                    for e, p, i, se, st in rows]
    return out


def renew(sessions: sessionmaker[Session], ids: Iterable[int], claimer: str, lease_s: float,
          now: datetime | None = None) -> set[int]:
    """Extend ``claimer``'s leases on ``ids`` (before each association); returns the ids still held."""
    ids = list(ids)
    if not ids:
        return set()
    now = now or utcnow()
    with sessions.begin() as session:
        held = set(session.scalars(
            update(OutboxEntry).where(OutboxEntry.id.in_(ids), OutboxEntry.claimed_by == claimer,
                                      OutboxEntry.state == PENDING)
            .values(lease_until=now + timedelta(seconds=lease_s)).returning(OutboxEntry.id)
            .execution_options(synchronize_session=False)))
    return held


def _held(claimer: str | None, now: datetime):  # noqa: ANN202 - a SQL condition
    """The claim condition of an outcome: held by ``claimer``, or (None) no live lease of anyone."""
    if claimer is not None:
        return OutboxEntry.claimed_by == claimer
    return or_(OutboxEntry.claimed_by.is_(None), OutboxEntry.lease_until.is_(None), OutboxEntry.lease_until <= now)


def mark_sent(sessions: sessionmaker[Session], entry_id: int, object_uid: str | None,
              now: datetime | None = None, claimer: str | None = None) -> bool:
    """pending -> sent (the peer acknowledged it); False when the entry was not pending any more, or
    its claim is not ``claimer``'s (``None``: refused while anyone holds a live lease on it)."""
    now = now or utcnow()
    with sessions.begin() as session:
        res = session.execute(
            update(OutboxEntry).where(OutboxEntry.id == entry_id, OutboxEntry.state == PENDING, _held(claimer, now))
            .values(state=SENT, sent_at=now, updated_at=now, last_error=None, object_uid=object_uid,
                    attempts=OutboxEntry.attempts + 1, claimed_by=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        return res.rowcount == 1


def mark_failed(sessions: sessionmaker[Session], entry_id: int, reason: str, *, permanent: bool,
                policy: RetryPolicy, now: datetime | None = None, object_uid: str | None = None,
                claimer: str | None = None) -> str | None:
    """Record a failed try: ``dead`` when permanent or older than the max age, else pending again later.

    Returns the new state (None when the entry was not pending any more, or not held: see mark_sent)."""
    now = now or utcnow()
    reason = reason[:2000]
    with sessions.begin() as session:
        entry = session.scalars(select(OutboxEntry).where(OutboxEntry.id == entry_id, _held(claimer, now))
                                .with_for_update()).first()
        if entry is None or entry.state != PENDING:
            return None
        entry.claimed_by, entry.lease_until = None, None
        attempts = entry.attempts + 1
        age = now - entry.queued_at
        if permanent:
            state, detail = DEAD, reason
        elif age >= policy.max_age:
            state = DEAD
            detail = f"gave up after {attempts} attempts in {age.total_seconds() / 3600:.1f} h: {reason}"
        else:
            state, detail = PENDING, reason
        entry.attempts = attempts
        entry.last_error = detail
        entry.updated_at = now
        entry.object_uid = object_uid or entry.object_uid
        if state == PENDING:
            entry.next_attempt_at = now + timedelta(seconds=policy.delay(attempts))
        else:
            entry.state = DEAD
            pred = session.get(Prediction, entry.prediction_id)
            session.add(Event(
                kind="outbox_dead", level="error", instance_id=pred.instance_id if pred else None,
                detail=f"{entry.object} to {entry.destination} (outbox {entry.id}): {detail}"[:4000],
            ))
        return state


def retry(sessions: sessionmaker[Session], ids: Iterable[int] | None = None, *, all_dead: bool = False,
          now: datetime | None = None) -> list[int]:
    """dead -> pending now (``pacsbridge outbox retry``); returns the ids that were moved.

    Only dead entries move: a sent entry is never sent again, a pending one is already queued."""
    now = now or utcnow()
    q = select(OutboxEntry.id).where(OutboxEntry.state == DEAD)
    if not all_dead:
        q = q.where(OutboxEntry.id.in_(list(ids or [])))
    with sessions.begin() as session:
        moved = list(session.scalars(q))
        if moved:
            session.execute(
                update(OutboxEntry).where(OutboxEntry.id.in_(moved), OutboxEntry.state == DEAD)
                .values(state=PENDING, next_attempt_at=now, queued_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            session.add(Event(kind="outbox_retry", level="info",
                              detail=f"{len(moved)} dead outbox entries queued again: {moved[:50]}"))
    return moved


def state_counts(session: Session) -> dict[str, int]:
    """{"pending": N, "sent": N, "dead": N}."""
    by_state = dict(session.execute(select(OutboxEntry.state, func.count()).group_by(OutboxEntry.state)).all())
    return {s: int(by_state.get(s, 0)) for s in STATES}


def list_entries(session: Session, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Entries, newest first, as plain dicts (``pacsbridge outbox list --json``)."""
    q = _result_query().order_by(OutboxEntry.id.desc())
    if state:
        q = q.where(OutboxEntry.state == state)
    if limit:
        q = q.limit(limit)
    out = []
    for e, p, inst, _series, study in session.execute(q):
        out.append({
            "id": e.id, "destination": e.destination, "object": e.object, "state": e.state,
            "attempts": e.attempts, "last_error": e.last_error, "object_uid": e.object_uid,
            "study_instance_uid": study, "sop_instance_uid": inst.sop_instance_uid,
            "positive": p.positive, "probability": round(p.probability, 6),
            "created_at": e.created_at.isoformat(),
            "next_attempt_at": e.next_attempt_at.isoformat() if e.state == PENDING else None,
            "sent_at": e.sent_at.isoformat() if e.sent_at else None,
            "claimed_by": e.claimed_by,
            "lease_until": e.lease_until.isoformat() if e.lease_until else None,
        })
    return out
