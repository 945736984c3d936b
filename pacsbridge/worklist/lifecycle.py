"""The worklist item life cycle: the one state machine, used by the HTTP API and DICOM UPS alike.

    scheduled --claim--> in_progress --complete(finding)--> completed
        ^                  |    |
        +---release--------+    +--cancel(reason)--> canceled   (also from scheduled)
        +---claim expires--+

Every function works inside the caller's session and transaction (the caller commits), locks the
item row (``SELECT ... FOR UPDATE`` on PostgreSQL) and then writes it with a compare-and-set
``UPDATE ... WHERE status = <what we read> AND claimed_by = <what we read>``, so that two claimants
can never both win, also on SQLite (which ignores FOR UPDATE).  Each successful transition adds
one :class:`Event` with the actor and logs one INFO line without patient data.

Roles: the HTTP layer decides who may call what (radiologist/admin); here, only the holder of the
claim or an admin may release or complete, and only an admin (or the UPS performer holding the
claim, with its Transaction UID) may cancel.  A claim that ran out is no claim: its holder must
claim again before completing, canceling or saving a draft (:class:`ClaimExpired`).

The holder's draft (finding, comment, cancellation reason, sent over DICOM UPS with N-SET) lives in
the item's ``draft_*`` columns for as long as the claim.  DICOM UPS's own rules (PS3.4 CC.1.1-2)
are here too (:func:`ups_change_state`), so that the UPS face only translates refusals
(:mod:`pacsbridge.worklist.refusals`) into status codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..store.models import Event, Finding, Role, WorklistItem, WorklistStatus
from .refusals import (  # noqa: F401 - re-exported: the faces catch them from here
    AlreadyCanceled, AlreadyCompleted, CannotReschedule, ClaimConflict, ClaimExpired, FindingMissing,
    IllegalTransition, InvalidValue, ItemClosed, ItemNotFound, LifecycleError, NotClaimant, NotFound, NotInProgress,
    NotPermitted, WrongTransaction,
)

log = logging.getLogger(__name__)

SCHEDULED = WorklistStatus.SCHEDULED.value
IN_PROGRESS = WorklistStatus.IN_PROGRESS.value
COMPLETED = WorklistStatus.COMPLETED.value
CANCELED = WorklistStatus.CANCELED.value
OPEN_STATUSES = (SCHEDULED, IN_PROGRESS)
FINDINGS = tuple(f.value for f in Finding)

#: Actor recorded for claims that the scheduler let expire.
SYSTEM_ACTOR = "system"
#: Event kind of a saved draft (the name it had when drafts came only over DICOM UPS N-SET).
DRAFT_EVENT = "ups_performed_data"
#: The UPS states a performer may ask for with N-ACTION Change UPS State (PS3.4 CC.2.1).
UPS_STATES = ("SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED")


@dataclass(frozen=True)
class Actor:
    name: str  # user name (for a DICOM UPS performer: the user its calling AE title is bound to)
    role: str  # "admin" | "radiologist" | "monitor"

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value


def get_item(session: Session, item_id: int | None = None, *, ups_uid: str | None = None,
             lock: bool = False) -> WorklistItem:
    """The item by id or by UPS SOP Instance UID; :class:`ItemNotFound` otherwise."""
    if (item_id is None) == (ups_uid is None):
        raise ValueError("give exactly one of item_id and ups_uid")
    q = select(WorklistItem).execution_options(populate_existing=True)
    q = q.where(WorklistItem.id == item_id) if item_id is not None else q.where(WorklistItem.ups_uid == ups_uid)
    if lock:
        q = q.with_for_update()
    item = session.scalars(q).one_or_none()
    if item is None:
        what = f"item {item_id}" if item_id is not None else f"UPS {ups_uid}"
        raise ItemNotFound(f"{what} does not exist", item_id)
    return item


def claim(session: Session, item_id: int, actor: Actor, *, now: datetime, claim_timeout_s: float,
          transaction_uid: str | None = None) -> WorklistItem:
    """scheduled -> in_progress for ``actor``, until ``now + claim_timeout_s``.

    The holder claiming again renews the expiry (keeping its Transaction UID; a different one given
    is :class:`WrongTransaction`).  Another actor gets :class:`ClaimConflict` while the claim runs.
    A claim past its expiry that the scheduler has not yet returned is returned first (the expiry
    recorded), then claimed afresh, also by its former holder.  Completed or canceled items:
    :class:`ItemClosed`.
    """
    if not claim_timeout_s > 0:
        raise InvalidValue(f"claim timeout must be positive, got {claim_timeout_s!r}", item_id)
    expires = now + timedelta(seconds=claim_timeout_s)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        if item.status == IN_PROGRESS and claim_expired(item, now) and not _expire(session, item, now):
            continue
        if item.status == IN_PROGRESS and item.claimed_by == actor.name:
            _check_transaction(item, transaction_uid)
            if _cas(session, item, claim_expires_at=expires, updated_at=now):
                _record(session, item, actor, "worklist_claim", f"claim renewed until {expires.isoformat()}", now)
                return item
            continue
        if item.status == IN_PROGRESS:
            raise _conflict(item)
        _require(item, (SCHEDULED,), "claim")
        txn = transaction_uid or generate_uid()
        if _cas(session, item, status=IN_PROGRESS, claimed_by=actor.name[:64], claimed_at=now,
                claim_expires_at=expires, transaction_uid=txn, updated_at=now, **_NO_DRAFT):
            _record(session, item, actor, "worklist_claim",
                    f"scheduled -> in_progress, claim until {expires.isoformat()}", now)
            return item
    raise ClaimConflict(f"item {item_id} changed while claiming it; try again", item_id)


def release(session: Session, item_id: int, actor: Actor, *, now: datetime,
            transaction_uid: str | None = None) -> WorklistItem:
    """in_progress -> scheduled (by the holder or an admin); a draft is dropped with the claim."""
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        _require(item, (IN_PROGRESS,), "release")
        _check_transaction(item, transaction_uid)
        _check_holder(item, actor, "release")
        holder = item.claimed_by
        if _cas(session, item, **_unclaimed(now)):
            by = "" if holder == actor.name else f" (claim held by {holder})"
            _record(session, item, actor, "worklist_release", f"in_progress -> scheduled{by}", now)
            return item
    raise LifecycleError(f"item {item_id} changed while releasing it; try again", item_id)


def complete(session: Session, item_id: int, actor: Actor, *, finding: str | None, comment: str | None = None,
             now: datetime, transaction_uid: str | None = None) -> WorklistItem:
    """in_progress -> completed with ``finding`` (by the holder or an admin); scheduled items must be claimed first.

    ``finding=None``: the drafted finding (and, unless ``comment`` is given, the drafted comment), as
    DICOM UPS completes; :class:`FindingMissing` when there is none."""
    if finding is not None and finding not in FINDINGS:
        raise InvalidValue(f"finding must be one of {', '.join(FINDINGS)}, got {finding!r}", item_id)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        _require(item, (IN_PROGRESS,), "complete")
        _check_transaction(item, transaction_uid)
        _check_holder(item, actor, "complete")
        _check_live_claim(item, actor, now, "complete")
        final, note = finding, comment
        if final is None:
            final, note = item.draft_finding, comment if comment is not None else item.draft_comment
            if final is None:
                raise FindingMissing(f"item {item.id} is in_progress; no finding was given before completing it",
                                     item.id, item.status)
        if _cas(session, item, status=COMPLETED, finding=final, comment=note, completed_at=now,
                completed_by=actor.name[:64], claim_expires_at=None, open_study_id=None, updated_at=now,
                **_NO_DRAFT):
            _record(session, item, actor, "worklist_complete", f"in_progress -> completed, finding {final}", now)
            return item
    raise LifecycleError(f"item {item_id} changed while completing it; try again", item_id)


def cancel(session: Session, item_id: int, actor: Actor, *, reason: str | None, now: datetime,
           transaction_uid: str | None = None) -> WorklistItem:
    """scheduled|in_progress -> canceled: an admin, or the holder of the claim with its Transaction UID (UPS).

    ``reason=None``: the drafted reason, else one naming the actor (a UPS performer need not give one)."""
    if reason is not None and not reason.strip():
        raise InvalidValue("a reason is required to cancel an item", item_id)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        _require(item, OPEN_STATUSES, "cancel")
        _check_transaction(item, transaction_uid)
        performer = (item.status == IN_PROGRESS and item.claimed_by == actor.name
                     and transaction_uid is not None)
        if not (actor.is_admin or performer):
            cls = NotClaimant if item.status == IN_PROGRESS and item.claimed_by != actor.name else NotPermitted
            raise cls(f"item {item.id} is {item.status}; only an admin (or the UPS performer holding the claim) "
                      "may cancel it", item.id, item.status, holder=item.claimed_by)
        _check_live_claim(item, actor, now, "cancel")
        why = (reason or item.draft_cancel_reason or f"canceled by {actor.name}").strip()
        before = item.status
        if _cas(session, item, status=CANCELED, cancel_reason=why, completed_at=now,
                completed_by=actor.name[:64], claim_expires_at=None, open_study_id=None, updated_at=now,
                **_NO_DRAFT):
            _record(session, item, actor, "worklist_cancel", f"{before} -> canceled", now)
            return item
    raise LifecycleError(f"item {item_id} changed while canceling it; try again", item_id)


def save_draft(session: Session, item_id: int, actor: Actor, *, transaction_uid: str | None, now: datetime,
               claim_timeout_s: float, finding: str | None = None, comment: str | None = None,
               cancel_reason: str | None = None) -> WorklistItem:
    """Keep what the holder has so far (UPS N-SET): values not given keep what an earlier draft said.

    Only the holder, with its claim's Transaction UID, while the claim runs; the draft lives as long as
    the claim (release, expiry, completion and cancelation drop it) and saving one renews the claim."""
    if finding is not None and finding not in FINDINGS:
        raise InvalidValue(f"finding must be one of {', '.join(FINDINGS)}, got {finding!r}", item_id)
    if not claim_timeout_s > 0:
        raise InvalidValue(f"claim timeout must be positive, got {claim_timeout_s!r}", item_id)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        _require(item, (IN_PROGRESS,), "update")
        if transaction_uid is None:
            raise WrongTransaction(f"item {item.id} is {item.status}; no Transaction UID was given",
                                   item.id, item.status)
        _check_transaction(item, transaction_uid)
        if item.claimed_by != actor.name:  # the lock's UID from another user: not even an admin writes its draft
            raise NotClaimant(f"item {item.id} is in_progress, claimed by {item.claimed_by}; only the claimant "
                              "may save a draft", item.id, item.status, holder=item.claimed_by)
        _check_live_claim(item, actor, now, "update")
        if _cas(session, item, draft_finding=finding or item.draft_finding,
                draft_comment=comment if comment is not None else item.draft_comment,
                draft_cancel_reason=cancel_reason or item.draft_cancel_reason, draft_by=actor.name[:64],
                draft_at=now, claim_expires_at=now + timedelta(seconds=claim_timeout_s), updated_at=now):
            _record(session, item, actor, DRAFT_EVENT, f"draft saved, finding {item.draft_finding or '-'}", now)
            return item
    raise LifecycleError(f"item {item_id} changed while saving its draft; try again", item_id)


def ups_change_state(session: Session, item_id: int, actor: Actor, state: str, *, transaction_uid: str,
                     now: datetime, claim_timeout_s: float) -> WorklistItem:
    """DICOM UPS Change UPS State (PS3.4 CC.1.1-2): IN PROGRESS claims, COMPLETED completes with the
    drafted finding, CANCELED cancels with the drafted reason; each refusal is typed.

    Unlike an HTTP claim, asking for IN PROGRESS while a claim runs is refused also for its holder
    (:class:`ClaimConflict`); nothing may go back to SCHEDULED (:class:`CannotReschedule`)."""
    if state not in UPS_STATES:
        raise InvalidValue(f"unknown Procedure Step State {state[:16]!r}", item_id)
    item = get_item(session, item_id, lock=True)
    if state == "SCHEDULED":
        raise CannotReschedule(f"item {item.id} is {item.status}; it cannot be scheduled again (let its claim "
                               "expire, or release it over HTTP)", item.id, item.status)
    if state == "IN PROGRESS":
        if item.status == IN_PROGRESS and not claim_expired(item, now):
            raise _conflict(item)
        return claim(session, item_id, actor, now=now, claim_timeout_s=claim_timeout_s,
                     transaction_uid=transaction_uid)
    if state == "COMPLETED":
        return complete(session, item_id, actor, finding=None, now=now, transaction_uid=transaction_uid)
    if item.status == SCHEDULED:  # a performer cancels only what it holds (an admin cancels over HTTP)
        raise NotInProgress(f"item {item.id} is scheduled; cannot cancel it (claim it first)", item.id, item.status)
    return cancel(session, item_id, actor, reason=None, now=now, transaction_uid=transaction_uid)


def claim_expired(item: WorklistItem, now: datetime) -> bool:
    """The item is in progress under a claim that has run out (the scheduler may not have returned it yet)."""
    expires = item.claim_expires_at
    return item.status == IN_PROGRESS and expires is not None and expires <= now


def expire_claims(session: Session, now: datetime) -> int:
    """Return every in_progress item whose claim expired to scheduled (one event each); returns how many."""
    expired = session.scalars(
        select(WorklistItem).where(WorklistItem.status == IN_PROGRESS, WorklistItem.claim_expires_at <= now)
        .order_by(WorklistItem.id).with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    return sum(1 for item in expired if _expire(session, item, now))


# -- helpers ---------------------------------------------------------------------------------------
_NO_DRAFT = dict(draft_finding=None, draft_comment=None, draft_cancel_reason=None, draft_by=None, draft_at=None)


def _unclaimed(now: datetime) -> dict:
    return dict(status=SCHEDULED, claimed_by=None, claimed_at=None, claim_expires_at=None,
                transaction_uid=None, updated_at=now, **_NO_DRAFT)


def _expire(session: Session, item: WorklistItem, now: datetime) -> bool:
    holder = item.claimed_by
    if not _cas(session, item, **_unclaimed(now)):
        return False
    _record(session, item, Actor(SYSTEM_ACTOR, SYSTEM_ACTOR), "worklist_claim_expired",
            f"claim by {holder} expired; returned to scheduled", now)
    return True


def _conflict(item: WorklistItem) -> ClaimConflict:
    until = item.claim_expires_at.isoformat() if item.claim_expires_at else "?"
    return ClaimConflict(f"item {item.id} is in_progress, claimed by {item.claimed_by} until {until}",
                         item.id, item.status, holder=item.claimed_by or "")


def _require(item: WorklistItem, allowed: tuple[str, ...], action: str) -> None:
    if item.status in allowed:
        return
    message = f"item {item.id} is {item.status}; cannot {action} it"
    if item.status == SCHEDULED:
        raise NotInProgress(message + (" (claim it first)" if action == "complete" else ""), item.id, item.status)
    if (item.status, action) == (COMPLETED, "complete"):
        raise AlreadyCompleted(message, item.id, item.status)
    if (item.status, action) == (CANCELED, "cancel"):
        raise AlreadyCanceled(message, item.id, item.status)
    if item.status in (COMPLETED, CANCELED):
        raise ItemClosed(message, item.id, item.status)
    raise IllegalTransition(message, item.id, item.status)


def _check_transaction(item: WorklistItem, transaction_uid: str | None) -> None:
    if transaction_uid is not None and transaction_uid != item.transaction_uid:
        raise WrongTransaction(f"item {item.id} is {item.status}; the Transaction UID does not match its claim",
                               item.id, item.status)


def _check_holder(item: WorklistItem, actor: Actor, action: str) -> None:
    if item.claimed_by != actor.name and not actor.is_admin:
        raise NotClaimant(f"item {item.id} is in_progress, claimed by {item.claimed_by}; only the claimant or an "
                          f"admin may {action} it", item.id, item.status, holder=item.claimed_by)


def _check_live_claim(item: WorklistItem, actor: Actor, now: datetime, action: str) -> None:
    """The holder's own claim must still run (an admin acts on any in-progress item)."""
    if item.claimed_by == actor.name and not actor.is_admin and claim_expired(item, now):
        raise ClaimExpired(f"item {item.id} is in_progress, but the claim by {actor.name} expired at "
                           f"{item.claim_expires_at.isoformat()}; claim it again to {action} it",
                           item.id, item.status)


def _cas(session: Session, item: WorklistItem, **values: object) -> bool:
    """Write ``values`` only if the row still has the status and claimant we read; refresh ``item``."""
    holder = WorklistItem.claimed_by.is_(None) if item.claimed_by is None else WorklistItem.claimed_by == item.claimed_by
    result = session.execute(
        update(WorklistItem).where(WorklistItem.id == item.id, WorklistItem.status == item.status, holder)
        .values(**values).execution_options(synchronize_session=False)
    )
    session.refresh(item)
    return result.rowcount == 1


def _record(session: Session, item: WorklistItem, actor: Actor, kind: str, what: str, now: datetime) -> None:
    # No patient data: item id, the transition and the actor only.
    session.add(Event(at=now, kind=kind, level="info", actor=actor.name[:64], worklist_item_id=item.id,
                      detail=f"item {item.id}: {what}"))
    log.info("worklist item %d: %s by %s", item.id, what, actor.name)
