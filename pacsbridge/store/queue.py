"""The instance queue: the one owner of an instance's state.

States (:class:`~pacsbridge.store.models.InstanceState`)::

    received --claim--> processing --> predicted        (a Prediction row exists)
                                   --> not_analysed     (a property of the image; final)
                                   --> failed           (a fault of the system; retried)
    failed --(next_attempt_at due)--> processing        (automatic retry, up to max_attempts)
    failed --retry (operator)--> received               (attempts start again from 0)
    processing --stale claim recovered--> received

``failed`` is never a verdict on the image: the spool file went missing, the decoder crashed
(out of memory, an I/O error), the model crashed or gave a non-finite score.  Each failed attempt
increments ``attempts``, records ``last_error`` and an ``analysis_failed`` event, and, while
``attempts < max_attempts``, schedules ``next_attempt_at`` with exponential backoff
(``base_s``, ``2 * base_s``, ...).  After the last attempt the row stays ``failed`` with
``next_attempt_at`` NULL and the reason, until an operator runs ``pacsbridge instances retry``.

Claims: rows due (``received``, or ``failed`` with ``next_attempt_at <= now``) are taken in arrival
order in one short transaction.  On PostgreSQL the candidate SELECT uses ``FOR UPDATE SKIP LOCKED``
so several workers never take the same row; SQLite serializes writers, so the guarded UPDATE is
enough there.  Every move out of ``processing`` is guarded by ``state='processing' AND
claimed_by=<worker>``, so a worker whose claim was taken back records nothing.

Leases: a claim holds until ``lease_until``, renewed by the holder's heartbeat
(:mod:`pacsbridge.store.workers`); any running worker returns expired leases
(:func:`recover_stale_claims`), so a dead, hung or stopped worker loses its claims within a lease
while the rest of the cluster runs.  Leases compare host clocks: keep them in sync (NTP).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from .claim_rules import stale_reason
from .models import Event, Instance, InstanceState, Series, as_utc, utcnow

log = logging.getLogger(__name__)

RECEIVED = InstanceState.RECEIVED.value
PROCESSING = InstanceState.PROCESSING.value
PREDICTED = InstanceState.PREDICTED.value
NOT_ANALYSED = InstanceState.NOT_ANALYSED.value
FAILED = InstanceState.FAILED.value

#: States whose outcome is settled: retention may delete their spool files.  ``failed`` is not one:
#: its file is needed for the next attempt (automatic or by an operator).
SETTLED_STATES = (PREDICTED, NOT_ANALYSED)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a fault of the system is retried: ``max_attempts`` in all, waits ``base_s * 2**(n-1)``."""

    max_attempts: int = 3
    base_s: float = 15.0  # 3 attempts: at 0 s, 15 s and 45 s

    def delay(self, attempts: int) -> timedelta:
        """Wait after the ``attempts``-th failed attempt (1-based)."""
        return timedelta(seconds=self.base_s * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class Claimed:
    id: int
    sop_instance_uid: str
    file_path: str
    study_id: int
    spool_deleted_at: datetime | None = None  # retention deleted the file (e.g. a row re-queued by hand)
    attempts: int = 0  # failed attempts before this one


class InstanceNotFound(LookupError):
    """No instance with that id."""


class NotRetryable(ValueError):
    """The instance exists but is not ``failed`` (``state`` says what it is)."""

    def __init__(self, instance_id: int, state: str) -> None:
        super().__init__(f"instance {instance_id} is {state}, not failed")
        self.instance_id, self.state = instance_id, state


# ----------------------------------------------------------------------------- claims


def _due(now: datetime):  # noqa: ANN202 - a SQL expression
    return or_(Instance.state == RECEIVED,
               and_(Instance.state == FAILED, Instance.next_attempt_at.is_not(None), Instance.next_attempt_at <= now))


#: Default ``claim_lease_s``: how long a claim holds without a heartbeat renewing it.
DEFAULT_LEASE_S = 60.0


def _bound_locks(session: Session, seconds: float) -> None:
    """PostgreSQL: if this process freezes inside the transaction (SIGSTOP, a hung host), the server ends
    its session after ``seconds`` and so releases the row locks the transaction took."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {max(1000, int(seconds * 1000))}"))


def claim(sessions: sessionmaker[Session], worker_id: str, limit: int, now: datetime | None = None,
          lease_s: float = DEFAULT_LEASE_S) -> list[Claimed]:
    """Claim up to ``limit`` due instances in arrival order, in one short transaction, leased for ``lease_s``."""
    if limit <= 0:
        return []
    now = now or utcnow()
    oldest = (
        select(Instance.id, Instance.attempts)
        .where(_due(now))
        .order_by(Instance.received_at, Instance.id)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer at a time anyway
    )
    with sessions.begin() as session:
        _bound_locks(session, lease_s)
        # Two statements on purpose: PostgreSQL may run an ``IN (SELECT ... LIMIT n FOR UPDATE)``
        # subquery more than once inside an UPDATE and so claim more than ``n`` rows.
        due = session.execute(oldest).all()
        if not due:
            return []
        # An instance with failed attempts behind it is scored alone: if it is what crashes the worker,
        # it must not take a batch of other images down with it again.
        candidates = [due[0].id] if due[0].attempts else [r.id for r in due if not r.attempts]
        # The due guard matters on SQLite, where the SELECT took no lock.
        ids = session.scalars(
            update(Instance)
            .where(Instance.id.in_(candidates), _due(now))
            .values(state=PROCESSING, claimed_by=worker_id, claimed_at=now, next_attempt_at=None, updated_at=now,
                    lease_until=now + timedelta(seconds=lease_s))
            .returning(Instance.id)
            .execution_options(synchronize_session=False)
        ).all()
        if not ids:
            return []
        rows = session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.file_path, Series.study_id,
                   Instance.spool_deleted_at, Instance.attempts)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.id.in_(ids))
            .order_by(Instance.received_at, Instance.id)
        ).all()
    return [Claimed(*r) for r in rows]




def recover_stale_claims(sessions: sessionmaker[Session], worker_id: str, stale_after: timedelta,
                         now: datetime | None = None, policy: RetryPolicy | None = None, *,
                         include_own: bool = True, lock_timeout_s: float = DEFAULT_LEASE_S,
                         gone: AbstractSet[str] = frozenset()) -> int:
    """Take back instances claimed by a dead, stuck or stopped worker (expired leases); returns how many.

    ``include_own=False`` from a heartbeat, which runs while this worker's own batch is in hand.
    ``gone``: ids of workers known dead (their leases are not waited for).

    A lost claim counts as a failed attempt: the worker may have died *because* of one of the images
    (a decoder that crashes the process), and an image that kills every worker that takes it must not
    stall the queue for ever.  Such rows go to ``failed``, due at once while attempts are left; a row
    with attempts behind it is then claimed alone (see :func:`claim`), so only the image that kills
    the worker runs out of attempts, not the rest of its batch.
    """
    policy = policy or RetryPolicy()
    now = as_utc(now or utcnow())
    released = 0
    maybe = [Instance.claimed_by.is_(None), Instance.lease_until.is_(None), Instance.lease_until < now,
             Instance.claimed_by.in_(sorted(gone | {worker_id} if include_own else gone))]
    with sessions.begin() as session:
        _bound_locks(session, lock_timeout_s)
        # SKIP LOCKED: rows another transaction holds (e.g. a frozen worker's) are left for a later round
        # instead of stalling this worker.
        rows = session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.claimed_by, Instance.claimed_at,
                   Instance.attempts, Instance.lease_until)
            .where(Instance.state == PROCESSING, or_(*maybe))
            .with_for_update(skip_locked=True)
        ).all()
        for iid, sop, owner, claimed_at, attempts, lease_until in rows:
            why = stale_reason(owner, claimed_at, worker_id, stale_after, now, lease_until=lease_until,
                               include_own=include_own, gone=gone)
            if why is None:
                continue
            # Not renewed meanwhile (SQLite took no lock above).
            lease_guard = (Instance.lease_until.is_(None) if lease_until is None
                           else Instance.lease_until == lease_until)
            attempts = (attempts or 0) + 1
            last = attempts >= policy.max_attempts
            reason = f"the worker scoring this image stopped ({why})"
            res = session.execute(
                update(Instance)
                .where(Instance.id == iid, Instance.state == PROCESSING, _same_owner(owner), lease_guard)
                .values(state=FAILED, claimed_by=None, claimed_at=None, lease_until=None, updated_at=now,
                        attempts=attempts,
                        state_reason=reason, last_error=reason, next_attempt_at=None if last else now)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:
                released += 1
                plan = ("no retry left; `pacsbridge instances retry` queues it again" if last
                        else "retried at once, alone")
                _event(session, "claim_released", "warning", iid, sop,
                       f"claim by {owner} released: {why}; attempt {attempts} of {policy.max_attempts}: {plan}")
    if released:
        log.warning("worker %s: released %d stale claims", worker_id, released)
    return released


def _same_owner(owner: str | None):  # noqa: ANN202 - a SQL expression
    return Instance.claimed_by.is_(None) if owner is None else Instance.claimed_by == owner


def release_claims(sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None) -> int:
    """After a clean stop: claims ``worker_id`` still holds go back to ``received``, no attempt counted
    (the worker did not die on them); returns how many."""
    now = now or utcnow()
    with sessions.begin() as session:
        rows = session.execute(
            update(Instance).where(Instance.state == PROCESSING, Instance.claimed_by == worker_id)
            .values(state=RECEIVED, claimed_by=None, claimed_at=None, lease_until=None, updated_at=now)
            .returning(Instance.id, Instance.sop_instance_uid)
            .execution_options(synchronize_session=False)).all()
        for iid, sop in rows:
            _event(session, "claim_released", "info", iid, sop, f"claim by {worker_id} returned at its clean stop")
    return len(rows)


# ----------------------------------------------------------------------------- moves out of processing

def _event(session: Session, kind: str, level: str, instance_id: int, sop_instance_uid: str | None, detail: str,
           actor: str | None = None) -> None:
    """The one place instance events are written (they share the transaction of the state move)."""
    session.add(Event(kind=kind, level=level, instance_id=instance_id, sop_instance_uid=sop_instance_uid,
                      detail=detail, actor=actor))


def _move(session: Session, inst: Claimed, worker_id: str, now: datetime, **values: object) -> bool:
    res = session.execute(
        update(Instance)
        .where(Instance.id == inst.id, Instance.state == PROCESSING, Instance.claimed_by == worker_id)
        .values(updated_at=now, lease_until=None, **values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def mark_predicted(session: Session, inst: Claimed, worker_id: str, now: datetime) -> bool:
    """``processing -> predicted`` (the caller adds the Prediction row); False if the claim is no longer ours."""
    return _move(session, inst, worker_id, now, state=PREDICTED, state_reason=None, next_attempt_at=None)


def mark_not_analysed(session: Session, inst: Claimed, worker_id: str, reason: str, level: str,
                      now: datetime, *, reasons: str | None = None) -> bool:
    """``processing -> not_analysed`` with the reason and a ``not_analysed`` event; False if the claim is gone.

    ``reasons``: every reason as JSON (``pacsbridge.scoring.reasons_json``), ``reason`` their joined text."""
    if not _move(session, inst, worker_id, now, state=NOT_ANALYSED, state_reason=reason, state_reasons=reasons,
                 next_attempt_at=None):
        return False
    _event(session, "not_analysed", level, inst.id, inst.sop_instance_uid, reason)
    return True


def mark_failed(session: Session, inst: Claimed, worker_id: str, reason: str, policy: RetryPolicy,
                now: datetime, *, retry: bool = True) -> datetime | None | bool:
    """``processing -> failed``: one more attempt counted, the next one scheduled while attempts are left.

    ``retry=False`` for a fault that no retry can mend (the file is gone for good): the row is left
    ``failed`` at once.  Returns the time of the next attempt, None when there is none, or False when
    the claim is no longer ours.
    """
    attempts = inst.attempts + 1
    last = not retry or attempts >= policy.max_attempts
    when = None if last else now + policy.delay(attempts)
    if not _move(session, inst, worker_id, now, state=FAILED, state_reason=reason, last_error=reason,
                 attempts=attempts, next_attempt_at=when):
        return False
    plan = (f"retry at {when.isoformat(timespec='seconds')}" if when is not None
            else "no retry left; `pacsbridge instances retry` queues it again")
    _event(session, "analysis_failed", "error", inst.id, inst.sop_instance_uid,
           f"attempt {attempts} of {policy.max_attempts if retry else attempts}: {reason}; {plan}")
    return when


# ----------------------------------------------------------------------------- operators

def retry(sessions: sessionmaker[Session], ids: Iterable[int] = (), *, all_failed: bool = False,
          actor: str | None = None, now: datetime | None = None) -> list[int]:
    """Put ``failed`` instances back to ``received`` with a fresh count of attempts; returns their ids.

    Raises :class:`InstanceNotFound` / :class:`NotRetryable` for a named id that does not exist or is
    not failed (nothing is changed then).
    """
    now = now or utcnow()
    with sessions.begin() as session:
        if all_failed:
            targets = list(session.execute(select(Instance.id, Instance.sop_instance_uid)
                                           .where(Instance.state == FAILED).order_by(Instance.id)).all())
        else:
            targets = []
            for iid in dict.fromkeys(ids):
                row = session.execute(select(Instance.id, Instance.sop_instance_uid, Instance.state)
                                      .where(Instance.id == iid)).first()
                if row is None:
                    raise InstanceNotFound(f"no instance {iid}")
                if row.state != FAILED:
                    raise NotRetryable(iid, row.state)
                targets.append((row.id, row.sop_instance_uid))
        moved: list[int] = []
        for iid, sop in targets:
            res = session.execute(
                update(Instance).where(Instance.id == iid, Instance.state == FAILED)
                .values(state=RECEIVED, state_reason=None, attempts=0, next_attempt_at=None, claimed_by=None,
                        claimed_at=None, lease_until=None, updated_at=now)
                .execution_options(synchronize_session=False))
            if res.rowcount == 1:
                moved.append(iid)
                _event(session, "instance_retry", "info", iid, sop, "queued again by an operator", actor=actor)
    return moved


def state_counts(session: Session) -> dict[str, int]:
    """{"received": total stored, "pending": received or processing, "predicted", "not_analysed", "failed",
    "retry_waiting": failed with an automatic retry still to come}."""
    by_state = dict(session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
    waiting = session.scalar(select(func.count()).select_from(Instance).where(
        Instance.state == FAILED, Instance.next_attempt_at.is_not(None))) or 0
    return {
        "received": sum(by_state.values()),
        "pending": by_state.get(RECEIVED, 0) + by_state.get(PROCESSING, 0),
        "predicted": by_state.get(PREDICTED, 0),
        "not_analysed": by_state.get(NOT_ANALYSED, 0),
        "failed": by_state.get(FAILED, 0),
        "retry_waiting": int(waiting),
    }


def failed_attempts(session: Session) -> int:
    """Failed attempts ever recorded (one ``analysis_failed`` event each)."""
    return int(session.scalar(select(func.count()).select_from(Event).where(Event.kind == "analysis_failed")) or 0)


# ----------------------------------------------------------------------------- retention

def retention_candidates(session: Session, cutoff: datetime, skip: Iterable[int], limit: int) -> list[Instance]:
    """Settled instances received before ``cutoff`` whose spool file is still kept, oldest first."""
    q = select(Instance).where(Instance.state.in_(SETTLED_STATES), Instance.received_at < cutoff,
                               Instance.spool_deleted_at.is_(None))
    skip = list(skip)
    if skip:
        q = q.where(Instance.id.not_in(skip))
    return list(session.scalars(q.order_by(Instance.received_at, Instance.id).limit(limit)).all())


def record_spool_deletion(session: Session, inst: Instance, deleted: bool, detail: str, now: datetime) -> None:
    """Retention's outcome for one file: ``spool_deleted_at`` when it is gone, and an event either way."""
    _event(session, "spool_file_deleted" if deleted else "spool_delete_failed", "info" if deleted else "error",
           inst.id, inst.sop_instance_uid, detail)
    if deleted:
        session.execute(update(Instance).where(Instance.id == inst.id).values(spool_deleted_at=now)
                        .execution_options(synchronize_session=False))
