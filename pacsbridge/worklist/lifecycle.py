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
claim, with its Transaction UID) may cancel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..store.models import Event, Finding, Role, WorklistItem, WorklistStatus

log = logging.getLogger(__name__)

SCHEDULED = WorklistStatus.SCHEDULED.value
IN_PROGRESS = WorklistStatus.IN_PROGRESS.value
COMPLETED = WorklistStatus.COMPLETED.value
CANCELED = WorklistStatus.CANCELED.value
OPEN_STATUSES = (SCHEDULED, IN_PROGRESS)
FINDINGS = tuple(f.value for f in Finding)

#: Actor recorded for claims that the scheduler let expire.
SYSTEM_ACTOR = "system"


@dataclass(frozen=True)
class Actor:
    name: str  # user name (for a DICOM UPS performer: the user its calling AE title is bound to)
    role: str  # "admin" | "radiologist" | "monitor"

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value


class LifecycleError(Exception):
    """A transition was refused; the message names the item and its current state."""

    def __init__(self, message: str, item_id: int | None = None, current: str | None = None) -> None:
        super().__init__(message)
        self.item_id = item_id
        self.current = current


class ItemNotFound(LifecycleError):
    pass


class IllegalTransition(LifecycleError):
    """E.g. "item 12 is completed; cannot claim it"."""


class ClaimConflict(LifecycleError):
    """Someone else holds the claim (``holder``)."""

    def __init__(self, message: str, item_id: int | None = None, current: str | None = None,
                 holder: str = "") -> None:
        super().__init__(message, item_id, current)
        self.holder = holder


class NotClaimant(LifecycleError):
    """Release/complete/cancel by someone who neither holds the claim nor is an admin."""

    def __init__(self, message: str, item_id: int | None = None, current: str | None = None,
                 holder: str | None = None) -> None:
        super().__init__(message, item_id, current)
        self.holder = holder


class WrongTransaction(LifecycleError):
    """A Transaction UID was given (UPS) and differs from the item's."""


class InvalidValue(LifecycleError):
    """A finding outside :data:`FINDINGS`, an empty cancel reason, a bad timeout."""


def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


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
    is :class:`WrongTransaction`).  Another actor gets :class:`ClaimConflict` while the claim runs;
    a claim past its expiry that the scheduler has not yet returned is taken over (and the expiry
    recorded).  Completed or canceled items: :class:`IllegalTransition`.
    """
    if not claim_timeout_s > 0:
        raise InvalidValue(f"claim timeout must be positive, got {claim_timeout_s!r}", item_id)
    now = as_utc(now)
    expires = now + timedelta(seconds=claim_timeout_s)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        if item.status == IN_PROGRESS and item.claimed_by == actor.name:
            _check_transaction(item, transaction_uid)
            if _cas(session, item, claim_expires_at=expires, updated_at=now):
                _record(session, item, actor, "worklist_claim", f"claim renewed until {expires.isoformat()}", now)
                return item
            continue
        if item.status == IN_PROGRESS:
            if as_utc(item.claim_expires_at) is not None and as_utc(item.claim_expires_at) <= now:
                holder = item.claimed_by
                if not _cas(session, item, **_unclaimed(now)):
                    continue
                _record(session, item, Actor(SYSTEM_ACTOR, SYSTEM_ACTOR), "worklist_claim_expired",
                        f"claim by {holder} expired; returned to scheduled", now)
            else:
                raise ClaimConflict(
                    f"item {item.id} is in_progress, claimed by {item.claimed_by} until "
                    f"{as_utc(item.claim_expires_at).isoformat() if item.claim_expires_at else '?'}",
                    item.id, item.status, holder=item.claimed_by or "")
        if item.status != SCHEDULED:
            raise IllegalTransition(f"item {item.id} is {item.status}; cannot claim it", item.id, item.status)
        txn = transaction_uid or generate_uid()
        if _cas(session, item, status=IN_PROGRESS, claimed_by=actor.name[:64], claimed_at=now,
                claim_expires_at=expires, transaction_uid=txn, updated_at=now):
            _record(session, item, actor, "worklist_claim",
                    f"scheduled -> in_progress, claim until {expires.isoformat()}", now)
            return item
    raise ClaimConflict(f"item {item_id} changed while claiming it; try again", item_id)


def release(session: Session, item_id: int, actor: Actor, *, now: datetime,
            transaction_uid: str | None = None) -> WorklistItem:
    """in_progress -> scheduled (by the holder or an admin)."""
    now = as_utc(now)
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


def complete(session: Session, item_id: int, actor: Actor, *, finding: str, comment: str | None = None,
             now: datetime, transaction_uid: str | None = None) -> WorklistItem:
    """in_progress -> completed with ``finding`` (by the holder or an admin); scheduled items must be claimed first."""
    if finding not in FINDINGS:
        raise InvalidValue(f"finding must be one of {', '.join(FINDINGS)}, got {finding!r}", item_id)
    now = as_utc(now)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        _require(item, (IN_PROGRESS,), "complete")
        _check_transaction(item, transaction_uid)
        _check_holder(item, actor, "complete")
        if _cas(session, item, status=COMPLETED, finding=finding, comment=comment, completed_at=now,
                completed_by=actor.name[:64], claim_expires_at=None, open_study_id=None, updated_at=now):
            _record(session, item, actor, "worklist_complete", f"in_progress -> completed, finding {finding}", now)
            return item
    raise LifecycleError(f"item {item_id} changed while completing it; try again", item_id)


def cancel(session: Session, item_id: int, actor: Actor, *, reason: str, now: datetime,
           transaction_uid: str | None = None) -> WorklistItem:
    """scheduled|in_progress -> canceled: an admin, or the holder of the claim with its Transaction UID (UPS)."""
    if not reason or not reason.strip():
        raise InvalidValue("a reason is required to cancel an item", item_id)
    now = as_utc(now)
    for _ in range(3):
        item = get_item(session, item_id, lock=True)
        _require(item, OPEN_STATUSES, "cancel")
        _check_transaction(item, transaction_uid)
        performer = (item.status == IN_PROGRESS and item.claimed_by == actor.name
                     and transaction_uid is not None)
        if not (actor.is_admin or performer):
            raise NotClaimant(
                f"item {item.id} is {item.status}; only an admin (or the UPS performer holding the claim) "
                "may cancel it", item.id, item.status, holder=item.claimed_by)
        before = item.status
        if _cas(session, item, status=CANCELED, cancel_reason=reason.strip(), completed_at=now,
                completed_by=actor.name[:64], claim_expires_at=None, open_study_id=None, updated_at=now):
            _record(session, item, actor, "worklist_cancel", f"{before} -> canceled", now)
            return item
    raise LifecycleError(f"item {item_id} changed while canceling it; try again", item_id)


def expire_claims(session: Session, now: datetime) -> int:
    """Return every in_progress item whose claim expired to scheduled (one event each); returns how many."""
    now = as_utc(now)
    expired = session.scalars(
        select(WorklistItem).where(WorklistItem.status == IN_PROGRESS, WorklistItem.claim_expires_at <= now)
        .order_by(WorklistItem.id).with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    n = 0
    for item in expired:
        holder = item.claimed_by
        if _cas(session, item, **_unclaimed(now)):
            _record(session, item, Actor(SYSTEM_ACTOR, SYSTEM_ACTOR), "worklist_claim_expired",
                    f"claim by {holder} expired; returned to scheduled", now)
            n += 1
    return n


# -- helpers ---------------------------------------------------------------------------------------
def _unclaimed(now: datetime) -> dict:
    return dict(status=SCHEDULED, claimed_by=None, claimed_at=None, claim_expires_at=None,
                transaction_uid=None, updated_at=now)


def _require(item: WorklistItem, allowed: tuple[str, ...], action: str) -> None:
    if item.status not in allowed:
        hint = " (claim it first)" if item.status == SCHEDULED and action == "complete" else ""
        raise IllegalTransition(f"item {item.id} is {item.status}; cannot {action} it{hint}", item.id, item.status)


def _check_transaction(item: WorklistItem, transaction_uid: str | None) -> None:
    if transaction_uid is not None and transaction_uid != item.transaction_uid:
        raise WrongTransaction(f"item {item.id} is {item.status}; the Transaction UID does not match its claim",
                               item.id, item.status)


def _check_holder(item: WorklistItem, actor: Actor, action: str) -> None:
    if item.claimed_by != actor.name and not actor.is_admin:
        raise NotClaimant(f"item {item.id} is in_progress, claimed by {item.claimed_by}; only the claimant or an "
                          f"admin may {action} it", item.id, item.status, holder=item.claimed_by)


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
