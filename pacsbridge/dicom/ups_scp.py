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
over HTTP) and the performer's Transaction UID; :mod:`pacsbridge.dicom.ups_status` lists the status
each refusal gets (PS3.4 Table CC.1.1-2 and CC.2.1-2 / CC.2.6-1).

What a performer sends with N-SET (the finding, comment, cancellation reason) is the holder's draft,
kept in the item's ``draft_*`` columns for as long as the claim (:func:`lifecycle.save_draft`), so it
survives a restart.  This module keeps no state rules and writes no rows: it decodes the request, calls
the life cycle, and answers each typed refusal with its status (:func:`ups_status_of`).  Handlers take
their dependencies as a bound :class:`UpsContext` (no globals).
"""

from __future__ import annotations

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
from pacsbridge.dicom.matching import exact_values, matches, response_identifier, single_value
from pacsbridge.dicom.ups_dataset import (
    UPS_HIGH_AT, UPS_MEDIUM_AT, UPS_TAGS, InvalidPerformedData, PerformedData, ReferencedSeries, UpsRecord,
    build_ups_dataset, parse_performed_data,
)
from pacsbridge.dicom.ups_status import (
    CANCEL, IDENTIFIER_DOES_NOT_MATCH, INVALID_ARGUMENT_VALUE, INVALID_ATTRIBUTE_VALUE, MISSING_ATTRIBUTE,
    NO_SUCH_ACTION, NO_SUCH_UPS, NOT_AUTHORISED, OPTIONAL_NOT_SUPPORTED, OUT_OF_RESOURCES, PENDING,
    PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, SUCCESS, UNABLE_TO_PROCESS, ups_status_of,
)
from pacsbridge.store.models import WorklistItem, WorklistStatus, utcnow
from pacsbridge.store.records import record_event
from pacsbridge.worklist import lifecycle, ups_queries
from pacsbridge.worklist.lifecycle import Actor, ItemNotFound, LifecycleError

log = logging.getLogger(__name__)

#: Presentation contexts we accept (SCP role) for UPS.
UPS_SOP_CLASSES: tuple[UID, ...] = (UnifiedProcedureStepPull, UnifiedProcedureStepQuery)
#: Requested SOP Class UIDs accepted in N-GET/N-SET/N-ACTION: UPS Push (what PS3.4 CC.2 asks for, every UPS
#: is a UPS Push instance) and UPS Pull (what some SCUs send).
UPS_INSTANCE_CLASSES = {UnifiedProcedureStepPush, UnifiedProcedureStepPull}

INPUT_INFORMATION = 0x00404021  # Input Information Sequence
CHANGE_UPS_STATE = 1  # N-ACTION Action Type ID (PS3.4 Table CC.2.1-1)

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


# -- reading worklist items as UPS records ------------------------------------------------------------
def load_records(session: Session, items: list[WorklistItem], *, instances: bool = True) -> list[UpsRecord]:
    """UPS records for ``items`` (their studies, referenced instances and performed data), same order.

    ``instances=False`` leaves the referenced instances out (a C-FIND that does not ask for them)."""
    studies, series = ups_queries.study_context(session, items, instances=instances)
    records = []
    for item in items:
        study = studies[item.study_id]
        if item.status == WorklistStatus.IN_PROGRESS.value:  # the holder's draft so far
            performed = PerformedData(finding=item.draft_finding, comment=item.draft_comment,
                                      cancel_reason=item.draft_cancel_reason)
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


def _candidates(session: Session, identifier: Dataset) -> Iterator[list[WorklistItem]]:
    """Items that may match, in reading order, pre-filtered in SQL on the simple keys."""
    statuses = None
    state = single_value(identifier, "ProcedureStepState")
    if state is not None:
        statuses = _STATUS_OF_UPS_STATE.get(state.upper())
        if statuses is None:
            return  # no state matches an unknown value
    low = high = None
    priority = single_value(identifier, "ScheduledProcedureStepPriority")
    if priority is not None:
        band = {"HIGH": (UPS_HIGH_AT, None), "MEDIUM": (UPS_MEDIUM_AT, UPS_HIGH_AT), "LOW": (None, UPS_MEDIUM_AT)}
        if priority.upper() not in band:
            return
        low, high = band[priority.upper()]
    where = ups_queries.UpsFilter(
        statuses=statuses, min_priority=low, below_priority=high, ups_uids=exact_values(identifier, "SOPInstanceUID"),
        study_uids=exact_values(identifier, "StudyInstanceUID"), patient_ids=exact_values(identifier, "PatientID"))
    yield from ups_queries.candidates(session, where)


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
    """Save performed data (finding, comment, cancellation reason) as the draft of an IN PROGRESS UPS we hold."""
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
    with ctx.sessions() as session:  # closing without commit rolls back whatever a refusal left
        try:
            item = lifecycle.get_item(session, ups_uid=uid, lock=True)
            item = lifecycle.save_draft(
                session, item.id, actor, transaction_uid=transaction_uid, now=now,
                claim_timeout_s=ctx.claim_timeout_s, finding=data.finding, comment=data.comment,
                cancel_reason=data.cancel_reason)
            item_id, finding = item.id, item.draft_finding
            session.commit()
        except LifecycleError as exc:
            return _refused(event, "N-SET", exc)
    log.info("UPS N-SET on worklist item %d by %s: finding %s%s", item_id, actor.name, finding or "-",
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
    asked = _state_change(event)
    if isinstance(asked, int):
        return asked, None
    requested, transaction_uid = asked
    now = ctx.clock()
    with ctx.sessions() as session:  # closing without commit rolls back whatever a refusal left
        try:
            item = lifecycle.get_item(session, ups_uid=uid, lock=True)
            lifecycle.ups_change_state(session, item.id, actor, requested, transaction_uid=transaction_uid,
                                       now=now, claim_timeout_s=ctx.claim_timeout_s)
            session.commit()
        except LifecycleError as exc:
            return _refused(event, f"N-ACTION {requested}", exc)
    return SUCCESS, None


def _state_change(event: DicomEvent) -> tuple[str, str] | int:
    """(Procedure Step State, Transaction UID) from the Action Information, or the status refusing it."""
    try:
        info = event.action_information
        requested = str(info.get("ProcedureStepState", "") or "").strip().upper()
        transaction_uid = str(info.get("TransactionUID", "") or "").strip() or None
    except Exception as exc:  # noqa: BLE001 - undecodable Action Information
        log.warning("UPS N-ACTION from %s: undecodable Action Information (%s)", _peer(event), type(exc).__name__)
        return INVALID_ARGUMENT_VALUE
    if requested not in lifecycle.UPS_STATES:
        return INVALID_ARGUMENT_VALUE
    if transaction_uid is None:
        return MISSING_ATTRIBUTE  # Transaction UID is 1/1 in Table CC.2.1-1
    return requested, transaction_uid


def _refused(event: DicomEvent, what: str, exc: LifecycleError) -> tuple[int, None]:
    status = ups_status_of(exc)
    # Races between workstations and retries are everyday events; a lock's UID from a foreign AE is not.
    level = logging.WARNING if status in (NOT_AUTHORISED, PROCESSING_FAILURE) else logging.INFO
    log.log(level, "UPS %s from %s: status 0x%04X (%s)", what, _peer(event), status, exc)
    return status, None
