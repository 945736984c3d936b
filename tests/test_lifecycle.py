"""The worklist item life cycle (pacsbridge.worklist.lifecycle) on SQLite and on the real PostgreSQL:
claims, renewals, conflicts, expiry, illegal transitions, Transaction UIDs, events with the actor,
and what the worklist refresh does around them (ageing stops, new item after completion)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_support import database_url_for
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, Instance, InstanceState, Prediction, Series, Study, WorklistItem
from pacsbridge.worklist import lifecycle as lc
from pacsbridge.store.models import as_utc
from pacsbridge.worklist.items import WorklistUpdater, list_worklist

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
ANNA = lc.Actor("anna", "radiologist")
BORIS = lc.Actor("boris", "radiologist")
ROOT = lc.Actor("root", "admin")
READER = lc.Actor("ae:READER1", "dicom")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path):
    for url in database_url_for(request.param, tmp_path / "lifecycle.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()


_seq = iter(range(1, 10**6))


def add_positive(sessions, study_uid: str, p: float = 0.9, at: datetime = T0, arrived: datetime | None = None) -> int:
    """A study (created if new) with one instance and a positive prediction recorded at ``at``; returns the study id."""
    n = next(_seq)
    with sessions.begin() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_uid, created_at=arrived or at)
            s.add(study)
            s.flush()
        series = Series(study_id=study.id, series_instance_uid=f"{study_uid}.{n}", modality="CR")
        s.add(series)
        s.flush()
        inst = Instance(series_id=series.id, sop_instance_uid=f"{study_uid}.{n}.1", sop_class_uid="1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"x/{n}.dcm", file_size=1,
                        state=InstanceState.PREDICTED.value, received_at=arrived or at)
        s.add(inst)
        s.flush()
        s.add(Prediction(instance_id=inst.id, probability=p, positive=True, threshold=0.5, model_id="m",
                         weights_sha256="0" * 64, created_at=at))
        return study.id


def new_item(sessions, study_uid: str = "1.2.3", p: float = 0.9) -> int:
    add_positive(sessions, study_uid, p)
    WorklistUpdater(sessions, 240).refresh(now=T0)
    with sessions() as s:
        return s.scalars(select(WorklistItem.id).join(Study).where(
            Study.study_instance_uid == study_uid, WorklistItem.status == "scheduled")).one()


def do(sessions, fn, *args, **kwargs):
    """Run one life-cycle call in its own transaction (as the API does)."""
    with sessions.begin() as s:
        item = fn(s, *args, **kwargs)
        return {c: getattr(item, c) for c in ("id", "status", "claimed_by", "claim_expires_at", "transaction_uid",
                                               "finding", "comment", "completed_by", "open_study_id", "cancel_reason")}


def events(sessions, item_id: int) -> list[tuple[str, str]]:
    with sessions() as s:
        return [(e.kind, e.actor) for e in s.scalars(
            select(Event).where(Event.worklist_item_id == item_id).order_by(Event.id))]


def test_claim_renew_conflict_and_release(db) -> None:
    iid = new_item(db)
    got = do(db, lc.claim, iid, ANNA, now=T0, claim_timeout_s=600)
    assert got["status"] == "in_progress" and got["claimed_by"] == "anna"
    assert as_utc(got["claim_expires_at"]) == T0 + timedelta(seconds=600)
    txn = got["transaction_uid"]
    assert txn  # an HTTP claim gets a generated Transaction UID (UPS sees the same claim)

    renewed = do(db, lc.claim, iid, ANNA, now=T0 + timedelta(minutes=5), claim_timeout_s=600)
    assert as_utc(renewed["claim_expires_at"]) == T0 + timedelta(minutes=15)
    assert renewed["transaction_uid"] == txn

    with pytest.raises(lc.ClaimConflict) as err:
        do(db, lc.claim, iid, BORIS, now=T0 + timedelta(minutes=6), claim_timeout_s=600)
    assert err.value.holder == "anna" and err.value.current == "in_progress"
    assert "in_progress" in str(err.value) and "anna" in str(err.value)

    with pytest.raises(lc.NotClaimant):
        do(db, lc.release, iid, BORIS, now=T0)
    released = do(db, lc.release, iid, ANNA, now=T0 + timedelta(minutes=7))
    assert released["status"] == "scheduled" and released["claimed_by"] is None
    assert released["transaction_uid"] is None
    with pytest.raises(lc.IllegalTransition, match="item .* is scheduled; cannot release"):
        do(db, lc.release, iid, ANNA, now=T0)
    assert events(db, iid) == [("worklist_claim", "anna"), ("worklist_claim", "anna"), ("worklist_release", "anna")]


def test_complete_rules(db) -> None:
    iid = new_item(db)
    with pytest.raises(lc.IllegalTransition, match="is scheduled; cannot complete"):
        do(db, lc.complete, iid, ANNA, finding="pneumonia", now=T0)
    do(db, lc.claim, iid, ANNA, now=T0, claim_timeout_s=600)
    with pytest.raises(lc.NotClaimant) as err:
        do(db, lc.complete, iid, BORIS, finding="pneumonia", now=T0)
    assert err.value.holder == "anna"
    with pytest.raises(lc.InvalidValue, match="finding must be one of"):
        do(db, lc.complete, iid, ANNA, finding="maybe", now=T0)
    done = do(db, lc.complete, iid, ANNA, finding="no_pneumonia", comment="atelectasis only",
              now=T0 + timedelta(minutes=3))
    assert (done["status"], done["finding"], done["comment"], done["completed_by"]) == (
        "completed", "no_pneumonia", "atelectasis only", "anna")
    assert done["open_study_id"] is None
    for fn, kw in ((lc.claim, {"claim_timeout_s": 60}), (lc.release, {}), (lc.complete, {"finding": "other"})):
        with pytest.raises(lc.IllegalTransition, match=f"item {iid} is completed; cannot"):
            do(db, fn, iid, ROOT, now=T0, **kw)
    with pytest.raises(lc.IllegalTransition, match="is completed; cannot cancel"):
        do(db, lc.cancel, iid, ROOT, reason="dup", now=T0)
    assert [k for k, _ in events(db, iid)] == ["worklist_claim", "worklist_complete"]
    assert events(db, iid)[-1] == ("worklist_complete", "anna")


def test_admin_may_complete_release_and_cancel(db) -> None:
    a, b = new_item(db, "1.1"), new_item(db, "1.2")
    do(db, lc.claim, a, ANNA, now=T0, claim_timeout_s=600)
    assert do(db, lc.release, a, ROOT, now=T0)["status"] == "scheduled"
    do(db, lc.claim, a, ANNA, now=T0, claim_timeout_s=600)
    assert do(db, lc.complete, a, ROOT, finding="pneumonia", now=T0)["completed_by"] == "root"
    with pytest.raises(lc.NotClaimant, match="only an admin"):
        do(db, lc.cancel, b, ANNA, reason="wrong patient", now=T0)
    with pytest.raises(lc.InvalidValue, match="reason"):
        do(db, lc.cancel, b, ROOT, reason="  ", now=T0)
    got = do(db, lc.cancel, b, ROOT, reason="wrong patient", now=T0)
    assert (got["status"], got["cancel_reason"], got["open_study_id"]) == ("canceled", "wrong patient", None)
    assert events(db, b) == [("worklist_cancel", "root")]


def test_transaction_uid_and_ups_performer_cancel(db) -> None:
    iid = new_item(db)
    got = do(db, lc.claim, iid, READER, now=T0, claim_timeout_s=600, transaction_uid="1.2.826.0.1.99")
    assert got["transaction_uid"] == "1.2.826.0.1.99"
    with pytest.raises(lc.WrongTransaction, match="in_progress"):
        do(db, lc.complete, iid, READER, finding="pneumonia", now=T0, transaction_uid="1.2.3.999")
    with pytest.raises(lc.WrongTransaction):
        do(db, lc.claim, iid, READER, now=T0, claim_timeout_s=600, transaction_uid="1.2.3.999")
    with pytest.raises(lc.NotClaimant):  # the holder without its Transaction UID is not the UPS performer
        do(db, lc.cancel, iid, READER, reason="patient left", now=T0)
    got = do(db, lc.cancel, iid, READER, reason="patient left", now=T0, transaction_uid="1.2.826.0.1.99")
    assert got["status"] == "canceled"
    assert events(db, iid) == [("worklist_claim", "ae:READER1"), ("worklist_cancel", "ae:READER1")]
    with db() as s:
        assert lc.get_item(s, ups_uid=s.get(WorklistItem, iid).ups_uid).id == iid
        with pytest.raises(lc.ItemNotFound):
            lc.get_item(s, 999999)
        with pytest.raises(lc.ItemNotFound):
            lc.get_item(s, ups_uid="1.2.3.4.5")


def test_claims_expire(db) -> None:
    a, b = new_item(db, "2.1"), new_item(db, "2.2")
    do(db, lc.claim, a, ANNA, now=T0, claim_timeout_s=60)
    do(db, lc.claim, b, ANNA, now=T0, claim_timeout_s=600)
    with db.begin() as s:
        assert lc.expire_claims(s, T0 + timedelta(seconds=30)) == 0
    with db.begin() as s:
        assert lc.expire_claims(s, T0 + timedelta(seconds=61)) == 1
    with db() as s:
        assert s.get(WorklistItem, a).status == "scheduled" and s.get(WorklistItem, a).claimed_by is None
        assert s.get(WorklistItem, b).status == "in_progress"
    assert events(db, a)[-1] == ("worklist_claim_expired", "system")
    # An expired claim the scheduler has not returned yet is taken over by the next claimant.
    got = do(db, lc.claim, b, BORIS, now=T0 + timedelta(seconds=601), claim_timeout_s=600)
    assert got["claimed_by"] == "boris"
    assert [k for k, _ in events(db, b)] == ["worklist_claim", "worklist_claim_expired", "worklist_claim"]


def test_two_claimants_at_once_only_one_wins(db) -> None:
    iid = new_item(db)
    people = [lc.Actor(f"r{i}", "radiologist") for i in range(6)]
    barrier = threading.Barrier(len(people))
    outcome: dict[str, str] = {}

    def go(actor: lc.Actor) -> None:
        barrier.wait()
        try:
            do(db, lc.claim, iid, actor, now=T0, claim_timeout_s=600)
            outcome[actor.name] = "won"
        except lc.ClaimConflict:
            outcome[actor.name] = "conflict"
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome[actor.name] = repr(exc)

    threads = [threading.Thread(target=go, args=(a,)) for a in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome.values()) == ["conflict"] * 5 + ["won"], outcome
    winner = next(n for n, o in outcome.items() if o == "won")
    with db() as s:
        assert s.get(WorklistItem, iid).claimed_by == winner
    assert events(db, iid) == [("worklist_claim", winner)]


def test_first_positive_at_is_the_first_positive_prediction(db) -> None:
    add_positive(db, "3.1", 0.7, at=T0 + timedelta(minutes=40), arrived=T0)
    WorklistUpdater(db, 240).refresh(now=T0 + timedelta(minutes=41))
    with db() as s:
        [row] = list_worklist(s, now=T0 + timedelta(minutes=41))
    assert datetime.fromisoformat(row["first_positive_at"]) == T0 + timedelta(minutes=40)
    assert datetime.fromisoformat(row["received_at"]) == T0
    assert row["waiting_s"] == 41 * 60


def test_ageing_stops_while_claimed_and_new_positive_after_completion_opens_a_new_item(db) -> None:
    up = WorklistUpdater(db, 240)
    sid = add_positive(db, "4.1", 0.8)
    up.refresh(now=T0)
    with db() as s:
        item = s.scalars(select(WorklistItem)).one()
    iid, p0 = item.id, item.priority
    do(db, lc.claim, iid, ANNA, now=T0, claim_timeout_s=7200)
    up.refresh(now=T0 + timedelta(minutes=60))
    with db() as s:
        assert s.get(WorklistItem, iid).priority == p0  # no ageing while in progress
    do(db, lc.release, iid, ANNA, now=T0 + timedelta(minutes=60))
    up.refresh(now=T0 + timedelta(minutes=60))
    with db() as s:
        assert s.get(WorklistItem, iid).priority > p0  # ageing resumes once it is scheduled again
    do(db, lc.claim, iid, ANNA, now=T0 + timedelta(minutes=61), claim_timeout_s=600)
    do(db, lc.complete, iid, ANNA, finding="pneumonia", now=T0 + timedelta(minutes=62))
    up.refresh(now=T0 + timedelta(minutes=63))
    with db() as s:
        assert s.scalars(select(WorklistItem)).all()[0].status == "completed"
        assert len(s.scalars(select(WorklistItem)).all()) == 1  # the read positive does not come back
    add_positive(db, "4.1", 0.95, at=T0 + timedelta(minutes=70))  # a new positive image afterwards
    res = up.refresh(now=T0 + timedelta(minutes=71))
    assert res.created == 1
    with db() as s:
        items = s.scalars(select(WorklistItem).order_by(WorklistItem.id)).all()
        assert [(i.status, i.finding) for i in items] == [("completed", "pneumonia"), ("scheduled", None)]
        assert items[1].study_id == sid and items[1].open_study_id == sid
        assert as_utc(items[1].first_positive_at) == T0 + timedelta(minutes=70)
        assert items[1].probability == pytest.approx(0.95)
        assert items[0].ups_uid != items[1].ups_uid


def test_incremental_refresh_only_touches_new_studies_and_scheduled_items(db) -> None:
    up = WorklistUpdater(db, 240)
    for i in range(5):
        add_positive(db, f"5.{i}", 0.6 + i / 100)
    assert up.refresh(now=T0).created == 5
    with db() as s:
        first = s.scalars(select(WorklistItem).order_by(WorklistItem.id)).first()
    do(db, lc.claim, first.id, ANNA, now=T0, claim_timeout_s=600)
    # A later run finds a new study's positive, and the watermark keeps old studies out of the scan.
    add_positive(db, "5.new", 0.9, at=T0 + timedelta(minutes=1))
    res = up.refresh(now=T0 + timedelta(minutes=1))
    assert res.created == 1
    assert res.updated == 4  # ageing: the 4 still-scheduled old items, not the claimed one
    assert up.refresh(now=T0 + timedelta(minutes=1)) == type(res)(0, 0)
