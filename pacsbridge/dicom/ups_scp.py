"""DICOM UPS pull: reading-room workstations query and work the worklist over DICOM (PS3.4 Annex CC).

Served on the Storage SCP's AE title and port (``StorageSCP(ups=UpsContext(...))``): the Unified
Procedure Step - Pull SOP Class (C-FIND, N-GET, N-SET, N-ACTION Change UPS State) and the UPS - Query
SOP Class (C-FIND).  Each worklist item is one UPS instance (SOP Instance UID = ``item.ups_uid``; see
:mod:`pacsbridge.dicom.ups_dataset` for its attributes).

Access: a calling AE title may use UPS only when an admin has bound it to a user (``pacsbridge users
bind NAME --ae-title AE``, optionally ``--tls-subject``: then only over mutual TLS with that client
certificate).  Every request is checked against the bindings as it arrives (unbinding or revoking works
at once); an unbound AE title, a revoked user, a wrong certificate or a role that may not work the
worklist over HTTP (monitor) gets 0x0124 (Refused: Not authorized, PS3.7 C.5) for every C-FIND, N-GET,
N-SET and N-ACTION, before anything is read: no match, no attribute, no hint whether a UPS exists.

A UPS claim and an HTTP claim are the same claim: every transition goes through
:mod:`pacsbridge.worklist.lifecycle` with the bound user as the actor (its name and role, the same as
over HTTP) and the performer's Transaction UID.  Status codes follow PS3.4 Table CC.1.1-2 and CC.2.1-2 / CC.2.6-1:

=======================  ==========  ===========  ==========  ==========
N-ACTION to              SCHEDULED   IN PROGRESS  COMPLETED   CANCELED
=======================  ==========  ===========  ==========  ==========
IN PROGRESS (claim)      claim       C302         C300        C300
COMPLETED                C310        C301 / C304  B306        C300
CANCELED                 C310        C301         C300        B304
SCHEDULED                C303        C303         C303        C303
=======================  ==========  ===========  ==========  ==========

(C301: the Transaction UID is not the one of the claim; C304: no finding was given with N-SET before
COMPLETED.)  N-SET: C310 unless IN PROGRESS, C300 once COMPLETED/CANCELED, C301 for a wrong Transaction
UID, 0x0106 for a finding pacsbridge does not know.  Unknown SOP Instance UID: C307 everywhere.

What a performer sends with N-SET (the finding, comment, cancellation reason) is kept, until the item
is completed, as ``ups_performed_data`` events (with the actor and a hash of the Transaction UID), so it
survives a restart without a schema change.  Handlers take their dependencies as a bound
:class:`UpsContext` (no globals).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.events import Event as DicomEvent
from pynetdicom.sop_class import UnifiedProcedureStepPull, UnifiedProcedureStepPush, UnifiedProcedureStepQuery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.auth.users import WORKLIST_ROLES, principal_for_ae
from pacsbridge.dicom import compat
from pacsbridge.dicom.listener import peer_certificate_subject
from pacsbridge.dicom.matching import matches, response_identifier
from pacsbridge.dicom.ups_dataset import (
    UPS_HIGH_AT, UPS_MEDIUM_AT, UPS_TAGS, InvalidPerformedData, PerformedData, ReferencedSeries, UpsRecord,
    build_ups_dataset, parse_performed_data,
)
from pacsbridge.store.models import Event, Instance, Series, Study, WorklistItem, WorklistStatus, utcnow
from pacsbridge.store.records import record_event
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.lifecycle import (
    Actor, ClaimConflict, IllegalTransition, ItemNotFound, LifecycleError, NotClaimant, WrongTransaction,
)

log = logging.getLogger(__name__)

#: Presentation contexts we accept (SCP role) for UPS.
UPS_SOP_CLASSES: tuple[UID, ...] = (UnifiedProcedureStepPull, UnifiedProcedureStepQuery)
#: Requested SOP Class UIDs accepted in N-GET/N-SET/N-ACTION: UPS Push (what PS3.4 CC.2 asks for, every UPS
#: is a UPS Push instance) and UPS Pull (what some SCUs send).
UPS_INSTANCE_CLASSES = {UnifiedProcedureStepPush, UnifiedProcedureStepPull}

# Status codes (PS3.4 CC.2, PS3.7 C)
SUCCESS = 0x0000
OPTIONAL_NOT_SUPPORTED = 0x0001  # warning: requested optional attributes are not supported
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
MISSING_ATTRIBUTE = 0x0120
SOP_CLASS_NOT_SUPPORTED = 0x0122
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124
INVALID_ARGUMENT_VALUE = 0x0115
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
ALREADY_CANCELED = 0xB304
ALREADY_COMPLETED = 0xB306
MAY_NO_LONGER_BE_UPDATED = 0xC300
WRONG_TRANSACTION_UID = 0xC301
ALREADY_IN_PROGRESS = 0xC302
ONLY_NCREATE_SCHEDULES = 0xC303
FINAL_STATE_NOT_MET = 0xC304
NO_SUCH_UPS = 0xC307
NOT_IN_PROGRESS = 0xC310
PENDING = 0xFF00
CANCEL = 0xFE00

INPUT_INFORMATION = 0x00404021  # Input Information Sequence
CHANGE_UPS_STATE = 1  # N-ACTION Action Type ID (PS3.4 Table CC.2.1-1)
PERFORMED_EVENT = "ups_performed_data"

_STATUS_OF_UPS_STATE = {
    "SCHEDULED": (WorklistStatus.SCHEDULED.value,),
    "IN PROGRESS": (WorklistStatus.IN_PROGRESS.value,),
    "COMPLETED": (WorklistStatus.COMPLETED.value,),
    "CANCELED": (WorklistStatus.CANCELED.value,),
}


@dataclass
class UpsContext:
    """What the UPS handlers need (bound into them, no globals)."""

    sessions: sessionmaker[Session]
    claim_timeout_s: float = 1800.0
    clock: Callable[[], datetime] = utcnow
    #: Most C-FIND matches returned; past it the query ends with 0xA700 (Out of resources) so the
    #: performer knows the list is cut (narrow the query, e.g. by Procedure Step State).
    max_find_matches: int = 1000


def log_access(ctx: UpsContext) -> None:
    """One start-up line saying who may use UPS (nobody until an admin binds a reading station)."""
    from sqlalchemy import func

    from pacsbridge.store.models import UserAeBinding

    try:
        with ctx.sessions() as session:
            n = int(session.scalar(select(func.count()).select_from(UserAeBinding)) or 0)
    except Exception as exc:  # noqa: BLE001 - only a log line; every request checks again
        log.warning("DICOM UPS: cannot count the bound AE titles: %s", type(exc).__name__)
        return
    if n:
        log.info("DICOM UPS offered to %d bound AE title(s); every other calling AE is refused", n)
    else:
        log.warning("DICOM UPS is on but no AE title is bound to a user: every UPS request is refused "
                    "(pacsbridge users bind NAME --ae-title AE)")


def add_ups_contexts(ae: AE, transfer_syntaxes: list[str] | None = None) -> None:
    """Accept the UPS Pull and UPS Query presentation contexts (SCP role) on ``ae``."""
    for sop_class in UPS_SOP_CLASSES:
        ae.add_supported_context(sop_class, transfer_syntaxes)


def ups_handlers(ctx: UpsContext) -> list[tuple]:
    """The event handlers to add to the AE's server."""
    return [
        (evt.EVT_C_FIND, handle_find, [ctx]),
        (evt.EVT_N_GET, handle_get, [ctx]),
        (evt.EVT_N_SET, handle_set, [ctx]),
        (evt.EVT_N_ACTION, handle_action, [ctx]),
    ]


def performer_of(event: DicomEvent, ctx: UpsContext, what: str, failure: int = PROCESSING_FAILURE) -> Actor | int:
    """The user the calling AE title is bound to, when it may work the worklist; else the status to answer:
    0x0124 (logged and recorded), or ``failure`` when the bindings cannot be read (a fault of ours, not a
    verdict on the peer)."""
    calling = (event.assoc.requestor.ae_title or "").strip()
    try:
        with ctx.sessions() as session:
            who, why = principal_for_ae(session, calling, peer_certificate_subject(event.assoc))
    except Exception as exc:  # noqa: BLE001 - e.g. the database is unreachable: refuse, never let through
        log.error("UPS %s from %s: cannot check the AE title binding: %s: %s", what, _peer(event),
                  type(exc).__name__, exc)
        return failure
    if who is not None and who.role not in WORKLIST_ROLES:
        who, why = None, f"calling AE title {calling!r} acts as {who.name}, whose role {who.role} may not " \
                         "use the worklist"
    if who is None:
        _record_refusal(event, ctx, what, why)
        return NOT_AUTHORISED
    return Actor(name=who.name, role=who.role)


def _record_refusal(event: DicomEvent, ctx: UpsContext, what: str, why: str) -> None:
    """One WARNING and one event per association (a polling station must not flood the log or the table)."""
    if not compat.first_ups_refusal(event.assoc):
        log.debug("UPS %s from %s refused (0x0124): %s", what, _peer(event), why)
        return
    log.warning("UPS %s from %s refused (0x0124 not authorised): %s; bind it with `pacsbridge users bind "
                "NAME --ae-title AE`", what, _peer(event), why)
    record_event(ctx.sessions, "ups_refused", f"UPS {what} refused: {why}"[:2000], level="warning",
                 peer=_peer(event))  # never raises: the refusal stands either way


def _peer(event: DicomEvent) -> str:
    rq = event.assoc.requestor
    return f"{(rq.ae_title or '').strip()}@{rq.address}:{rq.port}"


def _context_is_ups(event: DicomEvent, allowed: tuple[UID, ...] = UPS_SOP_CLASSES) -> bool:
    """A peer may send any DIMSE message on any accepted context; only UPS contexts reach UPS logic."""
    return event.context.abstract_syntax in allowed


def _txn_tag(transaction_uid: str | None) -> str:
    """What the events table keeps of a Transaction UID (it is the performer's lock: not stored in clear)."""
    return hashlib.sha256((transaction_uid or "").encode()).hexdigest()[:16]


# -- reading worklist items as UPS records ------------------------------------------------------------
def load_records(session: Session, items: list[WorklistItem], *, instances: bool = True) -> list[UpsRecord]:
    """UPS records for ``items`` (their studies, referenced instances and performed data), same order.

    ``instances=False`` leaves the referenced instances out (a C-FIND that does not ask for them)."""
    if not items:
        return []
    study_ids = sorted({i.study_id for i in items})
    studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(study_ids)))}
    series: dict[int, dict[str, list[tuple[str, str]]]] = {}
    rows = [] if not instances else session.execute(
        select(Series.study_id, Series.series_instance_uid, Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(study_ids))
        .order_by(Series.id, Instance.id)
    )
    for study_id, series_uid, sop_class, sop_instance in rows:
        series.setdefault(study_id, {}).setdefault(series_uid, []).append((sop_class, sop_instance))
    drafts = _drafts(session, [i for i in items if i.status == WorklistStatus.IN_PROGRESS.value])
    records = []
    for item in items:
        study = studies[item.study_id]
        if item.status == WorklistStatus.IN_PROGRESS.value:
            performed = drafts.get(item.id, PerformedData())
        else:
            performed = PerformedData(finding=item.finding, comment=item.comment, cancel_reason=item.cancel_reason)
        records.append(UpsRecord(
            ups_uid=item.ups_uid, status=item.status, priority=float(item.priority),
            probability=float(item.probability), scheduled_at=item.created_at,
            modified_at=item.updated_at or item.created_at, study_instance_uid=study.study_instance_uid,
            patient_name=getattr(study, "patient_name", None), patient_id=study.patient_id,
            patient_birth_date=getattr(study, "patient_birth_date", None),
            patient_sex=getattr(study, "patient_sex", None), accession_number=study.accession_number,
            study_description=getattr(study, "study_description", None),
            requested_priority=study.requested_priority,
            series=tuple(ReferencedSeries(uid, tuple(refs)) for uid, refs in series.get(item.study_id, {}).items()),
            claimed_at=item.claimed_at, completed_at=item.completed_at, performed=performed,
            kind=getattr(item, "kind", "flag"),
        ))
    return records


def _drafts(session: Session, items: list[WorklistItem]) -> dict[int, PerformedData]:
    """The performed data recorded by N-SET under each in-progress item's current claim."""
    if not items:
        return {}
    want = {i.id: _txn_tag(i.transaction_uid) for i in items}
    out: dict[int, PerformedData] = {}
    events = session.scalars(
        select(Event).where(Event.kind == PERFORMED_EVENT, Event.worklist_item_id.in_(list(want)))
        .order_by(Event.id)
    )
    for ev in events:
        try:
            data = json.loads(ev.detail or "{}")
        except ValueError:
            continue
        if data.get("txn") != want.get(ev.worklist_item_id):
            continue  # recorded under an earlier claim
        out[ev.worklist_item_id] = PerformedData(
            finding=data.get("finding"), comment=data.get("comment"), cancel_reason=data.get("cancel_reason"))
    return out


# -- C-FIND --------------------------------------------------------------------------------------------
def handle_find(event: DicomEvent, ctx: UpsContext) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND over the worklist's UPS instances, in reading order (priority first)."""
    if not _context_is_ups(event) or event.request.AffectedSOPClassUID not in UPS_SOP_CLASSES:
        yield SOP_CLASS_NOT_SUPPORTED, None
        return
    who = performer_of(event, ctx, "C-FIND", UNABLE_TO_PROCESS)
    if not isinstance(who, Actor):
        yield who, None
        return
    try:
        identifier = event.identifier
        for _ in identifier.iterall():  # pydicom decodes lazily: surface a malformed Identifier here
            pass
    except Exception as exc:  # noqa: BLE001 - any decoding problem is the peer's
        log.warning("UPS C-FIND from %s: undecodable Identifier (%s)", _peer(event), type(exc).__name__)
        yield IDENTIFIER_DOES_NOT_MATCH, None
        return

    # Build only what the query names (plus the SOP Instance UID every response carries).
    wanted = {int(e.tag) for e in identifier} | {0x00080018, 0x00080005}
    responses: list[Dataset] = []
    truncated = False
    try:
        with ctx.sessions() as session:
            for batch in _candidates(session, identifier):
                for record in load_records(session, batch, instances=INPUT_INFORMATION in wanted):
                    full = build_ups_dataset(record, only=wanted)
                    if matches(identifier, full):
                        if len(responses) >= ctx.max_find_matches:
                            truncated = True
                            break
                        responses.append(response_identifier(identifier, full, always=("SOPInstanceUID",)))
                if truncated:
                    break
    except Exception as exc:  # noqa: BLE001 - e.g. the database is unreachable: say so, do not crash
        log.error("UPS C-FIND from %s failed: %s: %s", _peer(event), type(exc).__name__, exc)
        yield UNABLE_TO_PROCESS, None
        return
    # DEBUG: workstations poll the worklist every few seconds.
    log.debug("UPS C-FIND from %s: %d match(es)%s", _peer(event), len(responses), " (cut)" if truncated else "")
    for ds in responses:
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield PENDING, ds
    if truncated:
        yield OUT_OF_RESOURCES, None


def _candidates(session: Session, identifier: Dataset, batch: int = 200) -> Iterator[list[WorklistItem]]:
    """Items that may match, in reading order, pre-filtered in SQL on the simple keys."""
    q = select(WorklistItem).join(Study, Study.id == WorklistItem.study_id)
    state = _single(identifier, "ProcedureStepState")
    if state is not None:
        statuses = _STATUS_OF_UPS_STATE.get(state.upper())
        if statuses is None:
            return  # no state matches an unknown value
        q = q.where(WorklistItem.status.in_(statuses))
    priority = _single(identifier, "ScheduledProcedureStepPriority")
    if priority is not None:
        band = {"HIGH": (UPS_HIGH_AT, None), "MEDIUM": (UPS_MEDIUM_AT, UPS_HIGH_AT), "LOW": (None, UPS_MEDIUM_AT)}
        if priority.upper() not in band:
            return
        low, high = band[priority.upper()]
        if low is not None:
            q = q.where(WorklistItem.priority >= low)
        if high is not None:
            q = q.where(WorklistItem.priority < high)
    for keyword, column in (("SOPInstanceUID", WorklistItem.ups_uid), ("StudyInstanceUID", Study.study_instance_uid),
                            ("PatientID", Study.patient_id)):
        values = _exact_values(identifier, keyword)
        if values:
            q = q.where(column.in_(values))
    q = q.order_by(WorklistItem.priority.desc(), WorklistItem.first_positive_at, WorklistItem.id)
    offset = 0
    seen: set[int] = set()  # priorities change while we page: never return an item twice
    while True:
        page = list(session.scalars(q.limit(batch).offset(offset)))
        if not page:
            return
        offset += len(page)
        items = [i for i in page if i.id not in seen]
        seen.update(i.id for i in items)
        yield items


def _exact_values(identifier: Dataset, keyword: str) -> list[str]:
    """The key's values when it is single-value or list matching without wildcards; [] otherwise."""
    elem = identifier[keyword] if keyword in identifier else None
    if elem is None or elem.value in (None, ""):
        return []
    raw = elem.value
    values = [str(v) for v in raw] if not isinstance(raw, str) and hasattr(raw, "__iter__") else str(raw).split("\\")
    values = [v.strip() for v in values if v.strip()]
    if any("*" in v or "?" in v for v in values):
        return []
    return values


def _single(identifier: Dataset, keyword: str) -> str | None:
    values = _exact_values(identifier, keyword)
    return values[0] if len(values) == 1 else None


# -- N-GET ---------------------------------------------------------------------------------------------
def handle_get(event: DicomEvent, ctx: UpsContext) -> tuple[int, Dataset | None]:
    """Read one UPS instance (all attributes, or those in the Attribute Identifier List)."""
    req = event.request
    if not _context_is_ups(event, (UnifiedProcedureStepPull,)) or req.RequestedSOPClassUID not in UPS_INSTANCE_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, None
    who = performer_of(event, ctx, "N-GET")
    if not isinstance(who, Actor):
        return who, None
    uid = str(req.RequestedSOPInstanceUID or "")
    with ctx.sessions() as session:
        try:
            item = lifecycle.get_item(session, ups_uid=uid)
        except ItemNotFound:
            log.info("UPS N-GET from %s: no such UPS", _peer(event))
            return NO_SUCH_UPS, None
        record = load_records(session, [item])[0]
    wanted = {int(t) for t in event.attribute_identifiers}
    if not wanted:
        return SUCCESS, build_ups_dataset(record)
    # Tags we do not hold (the Transaction UID among them: never returned, PS3.4 CC.2.2.3) get a warning.
    missing = wanted - UPS_TAGS
    return (OPTIONAL_NOT_SUPPORTED if missing else SUCCESS), build_ups_dataset(record, only=wanted | {0x00080005})


# -- N-SET ---------------------------------------------------------------------------------------------
def handle_set(event: DicomEvent, ctx: UpsContext) -> tuple[int, Dataset | None]:
    """Record performed data (finding, comment, cancellation reason) for an IN PROGRESS UPS we hold."""
    req = event.request
    if not _context_is_ups(event, (UnifiedProcedureStepPull,)) or req.RequestedSOPClassUID not in UPS_INSTANCE_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, None
    actor = performer_of(event, ctx, "N-SET")
    if not isinstance(actor, Actor):
        return actor, None
    uid = str(req.RequestedSOPInstanceUID or "")
    try:
        mods = event.modification_list
        transaction_uid = str(mods.get("TransactionUID", "") or "").strip() or None
        data, ignored = parse_performed_data(mods)
    except InvalidPerformedData as exc:
        log.warning("UPS N-SET from %s refused: %s", _peer(event), exc)
        return INVALID_ATTRIBUTE_VALUE, None
    except Exception as exc:  # noqa: BLE001 - undecodable Modification List
        log.warning("UPS N-SET from %s: undecodable Modification List (%s)", _peer(event), type(exc).__name__)
        return INVALID_ATTRIBUTE_VALUE, None

    now = ctx.clock()
    with ctx.sessions() as session:
        try:
            item = lifecycle.get_item(session, ups_uid=uid, lock=True)
        except ItemNotFound:
            return NO_SUCH_UPS, None
        status = item.status
        if status in (WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value):
            return _refused(event, "N-SET", item, MAY_NO_LONGER_BE_UPDATED)
        if status != WorklistStatus.IN_PROGRESS.value:
            return _refused(event, "N-SET", item, NOT_IN_PROGRESS)
        if transaction_uid is None or transaction_uid != item.transaction_uid:
            return _refused(event, "N-SET", item, WRONG_TRANSACTION_UID)
        if item.claimed_by != actor.name:  # the lock's UID from another user: as lifecycle.complete refuses
            return _refused(event, "N-SET", item, NOT_AUTHORISED, f"claim held by {item.claimed_by}")
        merged = _drafts(session, [item]).get(item.id, PerformedData()).merged(data)
        session.add(Event(
            at=now, kind=PERFORMED_EVENT, level="info", actor=actor.name[:64], worklist_item_id=item.id,
            peer=_peer(event)[:64], sop_instance_uid=uid[:64],
            detail=json.dumps({"txn": _txn_tag(transaction_uid), "finding": merged.finding,
                               "comment": merged.comment, "cancel_reason": merged.cancel_reason}),
        ))
        # Activity from the holder keeps its claim alive (the same as claiming it again over HTTP).
        lifecycle.claim(session, item.id, actor, now=now, claim_timeout_s=ctx.claim_timeout_s,
                        transaction_uid=transaction_uid)
        session.commit()
        item_id = item.id
    log.info("UPS N-SET on worklist item %d by %s: finding %s%s", item_id, actor.name, merged.finding or "-",
             f", ignored {', '.join(ignored)}" if ignored else "")
    return (OPTIONAL_NOT_SUPPORTED if ignored else SUCCESS), None


# -- N-ACTION ------------------------------------------------------------------------------------------
def handle_action(event: DicomEvent, ctx: UpsContext) -> tuple[int, Dataset | None]:
    """Change UPS State: IN PROGRESS claims the item; COMPLETED / CANCELED end the claim."""
    req = event.request
    if not _context_is_ups(event, (UnifiedProcedureStepPull,)) or req.RequestedSOPClassUID not in UPS_INSTANCE_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, None
    actor = performer_of(event, ctx, "N-ACTION")
    if not isinstance(actor, Actor):
        return actor, None
    if event.action_type != CHANGE_UPS_STATE:
        return NO_SUCH_ACTION, None  # Request Cancel / Subscribe belong to UPS Push / Watch: not offered
    uid = str(req.RequestedSOPInstanceUID or "")
    try:
        info = event.action_information
        requested = str(info.get("ProcedureStepState", "") or "").strip().upper()
        transaction_uid = str(info.get("TransactionUID", "") or "").strip() or None
    except Exception as exc:  # noqa: BLE001 - undecodable Action Information
        log.warning("UPS N-ACTION from %s: undecodable Action Information (%s)", _peer(event), type(exc).__name__)
        return INVALID_ARGUMENT_VALUE, None
    if requested not in ("SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"):
        return INVALID_ARGUMENT_VALUE, None
    if transaction_uid is None:
        return MISSING_ATTRIBUTE, None  # Transaction UID is 1/1 in Table CC.2.1-1

    now = ctx.clock()
    with ctx.sessions() as session:  # closing without commit rolls back whatever a refusal left
        try:
            item = lifecycle.get_item(session, ups_uid=uid, lock=True)
        except ItemNotFound:
            log.info("UPS N-ACTION from %s: no such UPS", _peer(event))
            return NO_SUCH_UPS, None
        expires = lifecycle.as_utc(item.claim_expires_at)
        expired = item.status == WorklistStatus.IN_PROGRESS.value and expires is not None and expires <= \
            lifecycle.as_utc(now)
        status = _state_change_status(item.status, requested, transaction_uid == item.transaction_uid, expired)
        if status is not None:
            return _refused(event, f"N-ACTION {requested}", item, status)
        try:
            if requested == "IN PROGRESS":
                lifecycle.claim(session, item.id, actor, now=now, claim_timeout_s=ctx.claim_timeout_s,
                                transaction_uid=transaction_uid)
            elif requested == "COMPLETED":
                draft = _drafts(session, [item]).get(item.id, PerformedData())
                if draft.finding is None:
                    return _refused(event, "N-ACTION COMPLETED", item, FINAL_STATE_NOT_MET,
                                    "no finding was given with N-SET")
                lifecycle.complete(session, item.id, actor, finding=draft.finding, comment=draft.comment, now=now,
                                   transaction_uid=transaction_uid)
            else:  # CANCELED
                draft = _drafts(session, [item]).get(item.id, PerformedData())
                lifecycle.cancel(session, item.id, actor, now=now, transaction_uid=transaction_uid,
                                 reason=draft.cancel_reason or f"canceled by the UPS performer {actor.name}")
            session.commit()
        except (ClaimConflict, WrongTransaction) as exc:
            code = ALREADY_IN_PROGRESS if requested == "IN PROGRESS" else WRONG_TRANSACTION_UID
            return _refused(event, f"N-ACTION {requested}", item, code, str(exc))
        except NotClaimant as exc:
            return _refused(event, f"N-ACTION {requested}", item, NOT_AUTHORISED, str(exc))
        except IllegalTransition as exc:
            return _refused(event, f"N-ACTION {requested}", item, MAY_NO_LONGER_BE_UPDATED, str(exc))
        except LifecycleError as exc:
            return _refused(event, f"N-ACTION {requested}", item, PROCESSING_FAILURE, str(exc))
    return SUCCESS, None


def _state_change_status(current: str, requested: str, transaction_matches: bool, expired: bool = False) -> int | None:
    """The refusal (or warning) PS3.4 Table CC.1.1-2 gives for this state change, None to go ahead.

    ``expired``: the item is IN PROGRESS but its claim ran out (the scheduler has not yet returned it);
    a new claim may take it over, as over HTTP."""
    if requested == "SCHEDULED":
        return ONLY_NCREATE_SCHEDULES
    final = current in (WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value)
    if requested == "IN PROGRESS":
        if current == WorklistStatus.IN_PROGRESS.value:
            return None if expired else ALREADY_IN_PROGRESS
        return MAY_NO_LONGER_BE_UPDATED if final else None
    # COMPLETED or CANCELED
    if current == WorklistStatus.COMPLETED.value:
        return ALREADY_COMPLETED if requested == "COMPLETED" else MAY_NO_LONGER_BE_UPDATED
    if current == WorklistStatus.CANCELED.value:
        return ALREADY_CANCELED if requested == "CANCELED" else MAY_NO_LONGER_BE_UPDATED
    if current != WorklistStatus.IN_PROGRESS.value:
        return NOT_IN_PROGRESS
    return None if transaction_matches else WRONG_TRANSACTION_UID


def _refused(event: DicomEvent, what: str, item: WorklistItem, status: int, why: str = "") -> tuple[int, None]:
    # Races between workstations and retries are everyday events; a lock's UID from a foreign AE is not.
    level = logging.WARNING if status in (NOT_AUTHORISED, PROCESSING_FAILURE) else logging.INFO
    log.log(level, "UPS %s on worklist item %d (%s) from %s: status 0x%04X%s", what, item.id, item.status,
            _peer(event), status, f" ({why})" if why else "")
    return status, None
