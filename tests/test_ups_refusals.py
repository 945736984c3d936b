"""Every typed refusal of the worklist life cycle, raised for real on SQLite and PostgreSQL, and the
answer each face gives it: the DICOM UPS status (pacsbridge.dicom.ups_status) and the HTTP status
(pacsbridge.api.app).  A refusal changes nothing; a new refusal class without an answer fails here."""

from __future__ import annotations

import inspect
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_support import database_url_for
from pacsbridge.api.errors import status_of as _status_of
from pacsbridge.dicom.ups_status import UPS_STATUS_OF_REFUSAL, ups_status_of
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, Study, WorklistItem
from pacsbridge.worklist import lifecycle as lc
from pacsbridge.worklist import refusals

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
ANNA = lc.Actor("anna", "radiologist")
BORIS = lc.Actor("boris", "radiologist")
ROOT = lc.Actor("root", "admin")
TXN = "1.2.826.0.1.3680043.99.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path):
    for url in database_url_for(request.param, tmp_path / "refusals.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()


def make_item(sessions, state: str = "scheduled") -> int:
    """One item in ``state``: scheduled, in_progress (anna, Transaction UID TXN, 60 s), completed, canceled."""
    with sessions.begin() as s:
        study = Study(study_instance_uid=f"1.2.3.{state}.{T0.timestamp()}", created_at=T0)
        s.add(study)
        s.flush()
        item = WorklistItem(study_id=study.id, open_study_id=study.id, ups_uid=f"2.25.{study.id}", priority=1.0,
                            probability=0.9, status="scheduled", first_positive_at=T0, created_at=T0, updated_at=T0)
        s.add(item)
        s.flush()
        iid = item.id
    if state == "scheduled":
        return iid
    with sessions.begin() as s:
        lc.claim(s, iid, ANNA, now=T0, claim_timeout_s=60, transaction_uid=TXN)
        if state == "completed":
            lc.complete(s, iid, ANNA, finding="pneumonia", now=T0)
        elif state == "canceled":
            lc.cancel(s, iid, ROOT, reason="duplicate", now=T0)
    return iid


LATER = T0 + timedelta(seconds=10)
EXPIRED = T0 + timedelta(seconds=61)

#: (refusal, item state, the call that is refused, UPS status, HTTP status)
CASES = [
    (lc.ItemNotFound, "scheduled", lambda s, i: lc.claim(s, i + 1000, ANNA, now=T0, claim_timeout_s=60),
     0xC307, 404),
    (lc.NotInProgress, "scheduled", lambda s, i: lc.complete(s, i, ANNA, finding="pneumonia", now=T0), 0xC310, 409),
    (lc.NotInProgress, "scheduled", lambda s, i: lc.ups_change_state(
        s, i, ANNA, "CANCELED", transaction_uid=TXN, now=T0, claim_timeout_s=60), 0xC310, 409),
    (lc.AlreadyCompleted, "completed", lambda s, i: lc.ups_change_state(
        s, i, ANNA, "COMPLETED", transaction_uid=TXN, now=LATER, claim_timeout_s=60), 0xB306, 409),
    (lc.AlreadyCanceled, "canceled", lambda s, i: lc.cancel(s, i, ROOT, reason="again", now=LATER), 0xB304, 409),
    (lc.ItemClosed, "completed", lambda s, i: lc.claim(s, i, ANNA, now=LATER, claim_timeout_s=60), 0xC300, 409),
    (lc.ItemClosed, "canceled", lambda s, i: lc.save_draft(
        s, i, ANNA, transaction_uid=TXN, now=LATER, claim_timeout_s=60, finding="other"), 0xC300, 409),
    (lc.CannotReschedule, "in_progress", lambda s, i: lc.ups_change_state(
        s, i, ANNA, "SCHEDULED", transaction_uid=TXN, now=LATER, claim_timeout_s=60), 0xC303, 409),
    (lc.ClaimConflict, "in_progress", lambda s, i: lc.claim(s, i, BORIS, now=LATER, claim_timeout_s=60),
     0xC302, 409),
    (lc.ClaimConflict, "in_progress", lambda s, i: lc.ups_change_state(  # UPS: also for the holder
        s, i, ANNA, "IN PROGRESS", transaction_uid=TXN, now=LATER, claim_timeout_s=60), 0xC302, 409),
    (lc.NotClaimant, "in_progress", lambda s, i: lc.complete(s, i, BORIS, finding="pneumonia", now=LATER),
     0x0124, 409),
    (lc.NotClaimant, "in_progress", lambda s, i: lc.save_draft(  # the lock's UID from another user
        s, i, BORIS, transaction_uid=TXN, now=LATER, claim_timeout_s=60, finding="other"), 0x0124, 409),
    (lc.NotPermitted, "scheduled", lambda s, i: lc.cancel(s, i, ANNA, reason="wrong patient", now=T0),
     0x0124, 403),
    (lc.WrongTransaction, "in_progress", lambda s, i: lc.complete(
        s, i, ANNA, finding="pneumonia", now=LATER, transaction_uid="1.2.3.999"), 0xC301, 409),
    (lc.WrongTransaction, "in_progress", lambda s, i: lc.save_draft(  # none given
        s, i, ANNA, transaction_uid=None, now=LATER, claim_timeout_s=60, finding="other"), 0xC301, 409),
    (lc.ClaimExpired, "in_progress", lambda s, i: lc.complete(s, i, ANNA, finding="pneumonia", now=EXPIRED),
     0xC310, 409),
    (lc.ClaimExpired, "in_progress", lambda s, i: lc.save_draft(
        s, i, ANNA, transaction_uid=TXN, now=EXPIRED, claim_timeout_s=60, finding="other"), 0xC310, 409),
    (lc.FindingMissing, "in_progress", lambda s, i: lc.ups_change_state(
        s, i, ANNA, "COMPLETED", transaction_uid=TXN, now=LATER, claim_timeout_s=60), 0xC304, 409),
    (lc.InvalidValue, "in_progress", lambda s, i: lc.complete(s, i, ANNA, finding="maybe", now=LATER), 0x0106, 422),
]


def _row(sessions, iid: int) -> tuple:
    with sessions() as s:
        item = s.get(WorklistItem, iid)
        n_events = len(s.scalars(select(Event.id).where(Event.worklist_item_id == iid)).all())
        return (item.status, item.claimed_by, item.transaction_uid, item.finding, item.draft_finding,
                item.claim_expires_at, n_events)


@pytest.mark.parametrize("refusal, state, call, ups_status, http_status", CASES,
                         ids=[f"{c[0].__name__}-{n}" for n, c in enumerate(CASES)])
def test_each_refusal_has_its_ups_and_http_status(db, refusal, state, call, ups_status, http_status) -> None:
    iid = make_item(db, state)
    before = _row(db, iid)
    with db.begin() as s, pytest.raises(lc.LifecycleError) as err:
        call(s, iid)
    assert type(err.value) is refusal, repr(err.value)
    assert (ups_status_of(err.value), _status_of(err.value)) == (ups_status, http_status)
    assert _row(db, iid) == before  # a refusal changes nothing
    if refusal not in (lc.ItemNotFound, lc.InvalidValue):  # those two are refused before the item is read
        assert err.value.item_id == iid and err.value.current == state


def test_a_refusal_of_no_known_kind_is_a_processing_failure() -> None:
    exc = lc.LifecycleError("item 3 changed while completing it; try again", 3)
    assert (ups_status_of(exc), _status_of(exc)) == (0x0110, 409)


def test_every_refusal_class_is_answered_and_raised_here() -> None:
    classes = {c for _, c in inspect.getmembers(refusals, inspect.isclass)
               if issubclass(c, refusals.LifecycleError) and c is not refusals.LifecycleError}
    assert classes <= {cls for cls, _ in UPS_STATUS_OF_REFUSAL}, "a refusal without a UPS status"
    assert classes <= {c[0] for c in CASES} | {refusals.IllegalTransition}, "a refusal without a case above"
    # Most specific first: no entry is shadowed by an earlier base class.
    for n, (cls, _) in enumerate(UPS_STATUS_OF_REFUSAL):
        assert not any(issubclass(cls, earlier) for earlier, _ in UPS_STATUS_OF_REFUSAL[:n]), cls


def test_an_expired_claim_is_taken_over_also_by_its_holder_with_a_new_transaction(db) -> None:
    iid = make_item(db, "in_progress")
    with db.begin() as s:
        lc.save_draft(s, iid, ANNA, transaction_uid=TXN, now=LATER, claim_timeout_s=60, finding="pneumonia")
    with db.begin() as s:
        item = lc.ups_change_state(s, iid, ANNA, "IN PROGRESS", transaction_uid="1.2.3.4", now=LATER + timedelta(
            seconds=61), claim_timeout_s=60)
        assert (item.status, item.claimed_by, item.transaction_uid) == ("in_progress", "anna", "1.2.3.4")
        assert item.draft_finding is None  # the draft went with the claim that lapsed
    with db() as s:
        kinds = s.scalars(select(Event.kind).where(Event.worklist_item_id == iid).order_by(Event.id)).all()
    assert kinds == ["worklist_claim", "ups_performed_data", "worklist_claim_expired", "worklist_claim"]
