"""DICOM UPS pull (PS3.4 Annex CC) against a running receiver, with a pynetdicom SCU over loopback
(and pynetdicom's own ``findscu -U`` command line), on SQLite and on the real PostgreSQL.

Worklist items come from the real path: images are C-STOREd to the receiver (patient data recorded at
receive time), positive predictions are recorded for them and the WorklistUpdater opens the items.

The reading stations' AE titles are bound to users (READER1 -> reader1, READER2 -> reader2, both
radiologists), as an admin does with ``pacsbridge users bind``; an unbound AE title gets nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import UnifiedProcedureStepPull, UnifiedProcedureStepPush, UnifiedProcedureStepQuery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_support import database_url_for, make_image, send_datasets
from pacsbridge.auth.users import bind_ae, create_user, revoke_user, unbind_ae
from pacsbridge.dicom.storage_scp import StorageSCP
from pacsbridge.dicom.ups_dataset import ups_priority
from pacsbridge.dicom.ups_scp import UpsContext
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, Instance, InstanceState, Prediction, Series, Study, WorklistItem, as_utc
from pacsbridge.store.spool import Spool
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.items import WorklistUpdater, list_worklist


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    yield from database_url_for(request.param, tmp_path / "ups.db")


@dataclass
class Bridge:
    scp: StorageSCP
    sessions: sessionmaker[Session]
    ups: UpsContext

    @property
    def port(self) -> int:
        return self.scp.port


@contextlib.contextmanager
def running_bridge(tmp_path: Path, database_url: str, first: bool = True) -> Iterator[Bridge]:
    """A receiver with UPS on ``database_url``; ``first``: migrate it and bind the stations' AE titles."""
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool", fsync=False)
    if first:
        migrations.upgrade(engine)
        spool.prepare()
        with sessions.begin() as s:
            for user, ae in (("reader1", "READER1"), ("reader2", "READER2")):
                create_user(s, user, "radiologist")
                bind_ae(s, user, ae)
            bind_ae(s, "reader1", "CLIREADER")  # pynetdicom's findscu below
            bind_ae(s, "reader2", "WATCHER")  # a UPS Query SCU below
    ups = UpsContext(sessions=sessions, claim_timeout_s=1800)
    scp = StorageSCP(ae_title="PACSBRIDGE", bind_address="127.0.0.1", port=0, spool=spool, sessions=sessions,
                     dimse_timeout=30, network_timeout=30, stop_timeout=10, ups=ups)
    scp.start()
    try:
        yield Bridge(scp, sessions, ups)
    finally:
        scp.stop()
        engine.dispose()


@pytest.fixture
def bridge(tmp_path: Path, database_url: str) -> Iterator[Bridge]:
    with running_bridge(tmp_path, database_url) as running:
        yield running


# -- building the worklist through the receiver ---------------------------------------------------------
@dataclass
class StudyCase:
    patient: str
    patient_id: str
    order_priority: str
    probability: float
    images: int = 1
    study_uid: str = ""
    sop_uids: tuple[tuple[str, str], ...] = ()


def add_studies(bridge: Bridge, cases: list[StudyCase]) -> dict[str, WorklistItem]:
    """C-STORE each case's images, record positive predictions, open the worklist items; items by patient ID."""
    datasets = []
    for case in cases:
        case.study_uid = generate_uid()
        series_uid = generate_uid()
        refs = []
        for i in range(case.images):
            ds = make_image(rows=16, cols=16, study_uid=case.study_uid, series_uid=series_uid, seed=i)
            ds.PatientName = case.patient
            ds.PatientID = case.patient_id
            ds.PatientSex = "F"
            ds.PatientBirthDate = "19500101"
            ds.StudyDescription = "XR CHEST PA"
            ds.AccessionNumber = f"A{case.patient_id}"[:16]
            ds.RequestedProcedurePriority = case.order_priority
            datasets.append(ds)
            refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        case.sop_uids = tuple(refs)
    assert set(send_datasets(bridge.port, datasets)) == {0x0000}
    now = datetime.now(timezone.utc)
    by_study = {c.study_uid: c for c in cases}
    with bridge.sessions.begin() as s:
        rows = s.execute(select(Instance, Study.study_instance_uid).join(Series, Series.id == Instance.series_id)
                         .join(Study, Study.id == Series.study_id)
                         .where(Study.study_instance_uid.in_(list(by_study))))
        for inst, study_uid in rows:
            inst.state = InstanceState.PREDICTED.value
            s.add(Prediction(instance_id=inst.id, probability=by_study[study_uid].probability, positive=True,
                             threshold=0.5, model_id="test-model", weights_sha256="0" * 64, created_at=now))
    WorklistUpdater(bridge.sessions, 240).refresh(now=now)
    with bridge.sessions() as s:
        items = s.execute(select(WorklistItem, Study.patient_id).join(Study, Study.id == WorklistItem.study_id)
                          .where(Study.study_instance_uid.in_(list(by_study)))).all()
    assert len(items) == len(cases)
    return {pid: item for item, pid in items}


CASES = [  # order by priority score: STAT p.70 (1.70), HIGH p.80 (1.30), ROUTINE p.95, ROUTINE p.60
    StudyCase("Routine^Low", "P4", "ROUTINE", 0.60),
    StudyCase("Stat^Ärztin", "P1", "STAT", 0.70, images=2),
    StudyCase("Routine^High", "P3", "ROUTINE", 0.95),
    StudyCase("Order^High", "P2", "HIGH", 0.80),
]


# -- a UPS performer (pynetdicom SCU) ------------------------------------------------------------------
class Performer:
    """One association to the bridge as a reading-room workstation with AE title ``ae_title``."""

    def __init__(self, port: int, ae_title: str = "READER1", model: str = UnifiedProcedureStepPull) -> None:
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(model)
        self.model = model
        self.assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE")
        assert self.assoc.is_established, "UPS association refused"

    def find(self, identifier: Dataset) -> tuple[list[Dataset], int]:
        """Matches and the final status."""
        found, final = [], None
        for status, ds in self.assoc.send_c_find(identifier, self.model):
            assert status is not None and "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                found.append(ds)
            else:
                final = int(status.Status)
        return found, final

    def get(self, uid: str, tags: list | None = None) -> tuple[int, Dataset | None]:
        status, attrs = self.assoc.send_n_get(tags or [], UnifiedProcedureStepPush, uid)
        return int(status.Status), attrs

    def set(self, uid: str, mods: Dataset) -> int:
        status, _ = self.assoc.send_n_set(mods, UnifiedProcedureStepPush, uid)
        return int(status.Status)

    def change_state(self, uid: str, state: str, transaction_uid: str | None) -> int:
        info = Dataset()
        info.ProcedureStepState = state
        if transaction_uid is not None:
            info.TransactionUID = transaction_uid
        status, _ = self.assoc.send_n_action(info, 1, UnifiedProcedureStepPush, uid)
        return int(status.Status)

    def close(self) -> None:
        self.assoc.release()


@contextlib.contextmanager
def performer(port: int, ae_title: str = "READER1", model: str = UnifiedProcedureStepPull) -> Iterator[Performer]:
    p = Performer(port, ae_title, model)
    try:
        yield p
    finally:
        p.close()


def query(**keys) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def finding_mods(transaction_uid: str | None, finding: str | None, comment: str | None = None,
                 scheme: str = "99PACSBRIDGE") -> Dataset:
    mods = Dataset()
    if transaction_uid is not None:
        mods.TransactionUID = transaction_uid
    performed = Dataset()
    if finding is not None:
        content = Dataset()
        content.ValueType = "CODE"
        name = Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = finding, scheme, finding
        content.ConceptNameCodeSequence = Sequence([name])
        content.ConceptCodeSequence = Sequence([code])
        performed.PerformedProcessingParametersSequence = Sequence([content])
    if comment is not None:
        performed.CommentsOnThePerformedProcedureStep = comment
    mods.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return mods


def item_state(bridge: Bridge, item_id: int) -> WorklistItem:
    with bridge.sessions() as s:
        return s.get(WorklistItem, item_id)


def ups_events(bridge: Bridge, item_id: int) -> list[tuple[str, str]]:
    with bridge.sessions() as s:
        return [(e.kind, e.actor) for e in s.scalars(
            select(Event).where(Event.worklist_item_id == item_id).order_by(Event.id))]


# -- tests -------------------------------------------------------------------------------------------------
def test_find_returns_scheduled_items_in_priority_order_with_their_attributes(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase(c.patient, c.patient_id, c.order_priority, c.probability, c.images)
                                 for c in CASES])
    cases = {c.patient_id: c for c in CASES}
    ident = query(ProcedureStepState="SCHEDULED", ScheduledProcedureStepPriority="", ProcedureStepLabel="",
                  PatientName="", PatientID="", StudyInstanceUID="", SOPInstanceUID="", TransactionUID="",
                  InputInformationSequence=Sequence())
    with performer(bridge.port) as reader:
        found, final = reader.find(ident)
    assert final == 0x0000
    assert [str(ds.PatientID) for ds in found] == ["P1", "P2", "P3", "P4"]  # the worklist's reading order
    assert [ds.ScheduledProcedureStepPriority for ds in found] == ["HIGH", "MEDIUM", "LOW", "LOW"]
    stat = found[0]
    assert stat.ProcedureStepState == "SCHEDULED"
    assert str(stat.PatientName) == "Stat^Ärztin"  # UTF-8 survives (Specific Character Set ISO_IR 192)
    assert stat.SOPInstanceUID == items["P1"].ups_uid
    assert "pneumonia" in stat.ProcedureStepLabel.lower() and "0.70" in stat.ProcedureStepLabel
    assert "TransactionUID" not in stat or not stat.TransactionUID  # the lock is never disclosed
    # Study Instance UID and the referenced instances (SOP Class and Instance UIDs) of what was stored
    p1 = [c for c in CASES if c.patient_id == "P1"][0]
    (item,) = stat.InputInformationSequence
    assert item.StudyInstanceUID == stat.StudyInstanceUID
    refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in item.ReferencedSOPSequence}
    with bridge.sessions() as s:
        stored = set(s.execute(select(Instance.sop_class_uid, Instance.sop_instance_uid)
                               .join(Series).join(Study).where(Study.id == items["P1"].study_id)).all())
    assert refs == stored and len(refs) == 2 == p1.images
    # the UPS priority is the documented mapping of the worklist priority score
    for ds in found:
        assert ds.ScheduledProcedureStepPriority == ups_priority(items[str(ds.PatientID)].priority)
    assert cases["P1"].probability == pytest.approx(items["P1"].probability)
    with performer(bridge.port, "WATCHER", UnifiedProcedureStepQuery) as watcher:  # UPS Query: C-FIND only
        found_q, final_q = watcher.find(ident)
    assert final_q == 0x0000 and [d.SOPInstanceUID for d in found_q] == [d.SOPInstanceUID for d in found]


def test_find_matching_keys(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase(c.patient, c.patient_id, c.order_priority, c.probability) for c in CASES])
    with performer(bridge.port) as reader:
        def pids(**keys) -> list[str]:
            ident = query(**keys)
            if "PatientID" not in ident:
                ident.PatientID = ""  # a return key
            found, final = reader.find(ident)
            assert final == 0x0000
            return [str(ds.PatientID) for ds in found]

        assert pids(PatientID="P3") == ["P3"]
        assert pids(PatientID="P*") == ["P1", "P2", "P3", "P4"]
        assert pids(PatientName="routine^*") == ["P3", "P4"]  # wildcard, PN case-insensitive
        assert pids(ScheduledProcedureStepPriority="HIGH") == ["P1"]
        assert pids(ScheduledProcedureStepPriority="LOW") == ["P3", "P4"]
        study_p2 = item_study_uid(bridge, items["P2"])
        assert pids(StudyInstanceUID=study_p2) == ["P2"]
        assert pids(SOPInstanceUID=[items["P4"].ups_uid, items["P1"].ups_uid]) == ["P1", "P4"]  # UID list
        assert pids(ProcedureStepState="IN PROGRESS") == []
        assert pids(PatientID="nobody") == []
        # sequence matching on the accession number of the referenced request
        request = Dataset()
        request.AccessionNumber = "AP3"
        assert pids(ReferencedRequestSequence=Sequence([request])) == ["P3"]
        # date-time range on the scheduled start
        today = datetime.now(timezone.utc).strftime("%Y%m%d")
        assert pids(ScheduledProcedureStepStartDateTime=f"{today}-") == ["P1", "P2", "P3", "P4"]
        assert pids(ScheduledProcedureStepStartDateTime="-19991231") == []

        # universal matching also returns items that left the queue
        with bridge.sessions.begin() as s:
            lifecycle.cancel(s, items["P4"].id, lifecycle.Actor("root", "admin"), reason="duplicate",
                             now=datetime.now(timezone.utc))
        assert pids() == ["P1", "P2", "P3", "P4"]
        assert pids(ProcedureStepState="SCHEDULED") == ["P1", "P2", "P3"]
        found, _ = reader.find(query(ProcedureStepState="CANCELED", PatientID="",
                                     ProcedureStepProgressInformationSequence=Sequence()))
        assert [str(d.PatientID) for d in found] == ["P4"]
        assert found[0].ProcedureStepProgressInformationSequence[0].ReasonForCancellation == "duplicate"


def item_study_uid(bridge: Bridge, item: WorklistItem) -> str:
    with bridge.sessions() as s:
        return s.get(Study, item.study_id).study_instance_uid


def test_claim_set_complete_through_ups(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase("Flow^Test", "F1", "ROUTINE", 0.9)])
    item = items["F1"]
    uid, txn, other_txn = item.ups_uid, generate_uid(), generate_uid()
    with performer(bridge.port, "READER1") as reader, performer(bridge.port, "READER2") as rival:
        status, ds = reader.get(uid)
        assert status == 0x0000
        assert ds.SOPInstanceUID == uid and ds.ProcedureStepState == "SCHEDULED" and ds.PatientID == "F1"
        assert ds.SOPClassUID == UnifiedProcedureStepPush
        status, some = reader.get(uid, [0x00741000, 0x00100020])  # Procedure Step State, Patient ID only
        assert status == 0x0000 and some.ProcedureStepState == "SCHEDULED" and "PatientName" not in some

        assert reader.change_state(uid, "COMPLETED", txn) == 0xC310  # not yet IN PROGRESS
        assert reader.set(uid, finding_mods(txn, "pneumonia")) == 0xC310
        assert reader.change_state(uid, "IN PROGRESS", txn) == 0x0000  # the claim
        assert rival.change_state(uid, "IN PROGRESS", other_txn) == 0xC302  # a second performer is refused
        assert reader.change_state(uid, "IN PROGRESS", txn) == 0xC302  # per CC.1.1-2, also for the holder

        claimed = item_state(bridge, item.id)
        assert claimed.status == "in_progress" and claimed.claimed_by == "reader1"
        assert claimed.transaction_uid == txn
        with bridge.sessions() as s:
            (row,) = [r for r in list_worklist(s) if r["id"] == item.id]
        assert row["status"] == "in_progress" and row["claimed_by"] == "reader1"  # what HTTP shows

        assert rival.set(uid, finding_mods(other_txn, "no_pneumonia")) == 0xC301  # wrong Transaction UID
        assert rival.set(uid, finding_mods(txn, "no_pneumonia")) == 0x0124  # the lock's UID, from another AE
        assert reader.set(uid, finding_mods(None, "pneumonia")) == 0xC301  # none given
        assert reader.change_state(uid, "COMPLETED", txn) == 0xC304  # no finding yet: final state not met
        assert reader.set(uid, finding_mods(txn, "bogus")) == 0x0106  # not a finding we know
        assert reader.set(uid, finding_mods(txn, "pneumonia", comment="RLL consolidation")) == 0x0000
        status, ds = reader.get(uid)
        assert ds.ProcedureStepState == "IN PROGRESS"
        (performed,) = ds.UnifiedProcedureStepPerformedProcedureSequence
        (content,) = performed.PerformedProcessingParametersSequence
        assert content.ConceptCodeSequence[0].CodeValue == "pneumonia"
        assert performed.CommentsOnThePerformedProcedureStep == "RLL consolidation"
        # a later N-SET keeps what an earlier one said unless it says otherwise
        assert reader.set(uid, finding_mods(txn, None, comment="RLL consolidation, small effusion")) == 0x0000

        assert rival.change_state(uid, "COMPLETED", other_txn) == 0xC301
        assert rival.change_state(uid, "COMPLETED", txn) == 0x0124  # the lock's UID, from another AE
        assert reader.change_state(uid, "SCHEDULED", txn) == 0xC303
        assert reader.change_state(uid, "COMPLETED", txn) == 0x0000
        assert reader.change_state(uid, "COMPLETED", txn) == 0xB306  # already so: a warning
        assert reader.change_state(uid, "CANCELED", txn) == 0xC300
        assert reader.change_state(uid, "IN PROGRESS", generate_uid()) == 0xC300
        assert reader.set(uid, finding_mods(txn, "other")) == 0xC300

        found, _ = reader.find(query(SOPInstanceUID=uid, ProcedureStepState="",
                                     UnifiedProcedureStepPerformedProcedureSequence=Sequence()))
        assert found[0].ProcedureStepState == "COMPLETED"
        performed = found[0].UnifiedProcedureStepPerformedProcedureSequence[0]
        assert performed.PerformedProcedureStepEndDateTime

    done = item_state(bridge, item.id)
    assert (done.status, done.finding, done.completed_by) == ("completed", "pneumonia", "reader1")
    assert done.comment == "RLL consolidation, small effusion"
    kinds = ups_events(bridge, item.id)
    assert ("worklist_claim", "reader1") in kinds and ("worklist_complete", "reader1") in kinds
    assert ("ups_performed_data", "reader1") in kinds
    assert not any(actor == "reader2" for _, actor in kinds)  # refusals change nothing


def test_nset_draft_is_kept_in_columns_and_survives_a_restart(tmp_path: Path, database_url: str) -> None:
    """What N-SET sends is the item's draft (draft_* columns, not event JSON); a new process on the same
    database shows it over N-GET and completes the item with it; completing clears the draft."""
    txn = generate_uid()
    with running_bridge(tmp_path, database_url) as first:
        item = add_studies(first, [StudyCase("Draft^Restart", "D1", "ROUTINE", 0.9)])["D1"]
        with performer(first.port) as reader:
            assert reader.change_state(item.ups_uid, "IN PROGRESS", txn) == 0x0000
            assert reader.set(item.ups_uid, finding_mods(txn, "pneumonia", comment="LLL opacity")) == 0x0000
        draft = item_state(first, item.id)
        assert (draft.draft_finding, draft.draft_comment, draft.draft_by) == ("pneumonia", "LLL opacity", "reader1")
        assert draft.draft_at is not None and draft.draft_cancel_reason is None and draft.finding is None
        with first.sessions() as s:
            details = s.scalars(select(Event.detail).where(Event.worklist_item_id == item.id)).all()
        assert not any("LLL opacity" in (d or "") or "{" in (d or "") for d in details)  # the comment is no event
    with running_bridge(tmp_path, database_url, first=False) as second:
        with performer(second.port) as reader:
            status, ds = reader.get(item.ups_uid)
            assert status == 0x0000 and ds.ProcedureStepState == "IN PROGRESS"
            (performed,) = ds.UnifiedProcedureStepPerformedProcedureSequence
            assert performed.PerformedProcessingParametersSequence[0].ConceptCodeSequence[0].CodeValue == "pneumonia"
            assert performed.CommentsOnThePerformedProcedureStep == "LLL opacity"
            assert reader.change_state(item.ups_uid, "COMPLETED", txn) == 0x0000
        done = item_state(second, item.id)
    assert (done.status, done.finding, done.comment, done.completed_by) == (
        "completed", "pneumonia", "LLL opacity", "reader1")
    assert (done.draft_finding, done.draft_comment, done.draft_by, done.draft_at) == (None, None, None, None)


def test_cancel_through_ups(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase("Cancel^Test", "C1", "ROUTINE", 0.9)])
    uid, txn = items["C1"].ups_uid, generate_uid()
    with performer(bridge.port) as reader:
        assert reader.change_state(uid, "CANCELED", txn) == 0xC310  # SCHEDULED: claim first
        assert reader.change_state(uid, "IN PROGRESS", txn) == 0x0000
        mods = Dataset()
        mods.TransactionUID = txn
        progress = Dataset()
        progress.ReasonForCancellation = "wrong patient"
        mods.ProcedureStepProgressInformationSequence = Sequence([progress])
        assert reader.set(uid, mods) == 0x0000
        assert reader.change_state(uid, "CANCELED", generate_uid()) == 0xC301
        assert reader.change_state(uid, "CANCELED", txn) == 0x0000
        assert reader.change_state(uid, "CANCELED", txn) == 0xB304
        assert reader.change_state(uid, "COMPLETED", txn) == 0xC300
    done = item_state(bridge, items["C1"].id)
    assert (done.status, done.cancel_reason, done.completed_by) == ("canceled", "wrong patient", "reader1")


def test_unknown_instance_and_bad_requests(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase("Some^One", "U1", "ROUTINE", 0.9)])
    unknown, txn = generate_uid(), generate_uid()
    with performer(bridge.port) as reader:
        assert reader.get(unknown)[0] == 0xC307
        assert reader.set(unknown, finding_mods(txn, "pneumonia")) == 0xC307
        assert reader.change_state(unknown, "IN PROGRESS", txn) == 0xC307
        uid = items["U1"].ups_uid
        assert reader.change_state(uid, "IN PROGRESS", None) == 0x0120  # Transaction UID is required
        assert reader.change_state(uid, "PAUSED", txn) == 0x0115
        status, _ = reader.assoc.send_n_action(query(ProcedureStepState="IN PROGRESS", TransactionUID=txn), 3,
                                               UnifiedProcedureStepPush, uid)
        assert status.Status == 0x0123  # Subscribe (UPS Watch) is not offered
        assert item_state(bridge, items["U1"].id).status == "scheduled"


def test_http_claim_and_ups_claim_are_the_same_claim(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase("Http^First", "H1", "ROUTINE", 0.9),
                                 StudyCase("Ups^First", "H2", "ROUTINE", 0.8)])
    now = datetime.now(timezone.utc)
    anna = lifecycle.Actor("anna", "radiologist")
    with bridge.sessions.begin() as s:  # as POST /api/worklist/{id}/claim does
        lifecycle.claim(s, items["H1"].id, anna, now=now, claim_timeout_s=1800)
    txn = generate_uid()
    with performer(bridge.port) as reader:
        found, _ = reader.find(query(ProcedureStepState="IN PROGRESS", PatientID=""))
        assert [str(d.PatientID) for d in found] == ["H1"]  # the HTTP claim, seen through UPS
        assert reader.change_state(items["H1"].ups_uid, "IN PROGRESS", txn) == 0xC302
        assert reader.set(items["H1"].ups_uid, finding_mods(txn, "pneumonia")) == 0xC301
        assert reader.change_state(items["H1"].ups_uid, "COMPLETED", txn) == 0xC301

        assert reader.change_state(items["H2"].ups_uid, "IN PROGRESS", txn) == 0x0000
        with bridge.sessions() as s:
            rows = {r["id"]: r for r in list_worklist(s)}
        assert rows[items["H2"].id]["claimed_by"] == "reader1"  # the UPS claim, seen by the worklist
        with bridge.sessions.begin() as s, pytest.raises(lifecycle.ClaimConflict) as conflict:
            lifecycle.claim(s, items["H2"].id, anna, now=now, claim_timeout_s=1800)
        assert conflict.value.holder == "reader1"

        # the HTTP user releases hers; the item is SCHEDULED again for everyone
        with bridge.sessions.begin() as s:
            lifecycle.release(s, items["H1"].id, anna, now=now)
        found, _ = reader.find(query(ProcedureStepState="SCHEDULED", PatientID=""))
        assert [str(d.PatientID) for d in found] == ["H1"]
        assert reader.change_state(items["H1"].ups_uid, "IN PROGRESS", generate_uid()) == 0x0000


def test_expired_claim_is_scheduled_again_and_nset_renews(bridge: Bridge) -> None:
    items = add_studies(bridge, [StudyCase("Slow^Reader", "E1", "ROUTINE", 0.9)])
    uid, txn = items["E1"].ups_uid, generate_uid()
    clock = [datetime.now(timezone.utc)]
    bridge.ups.clock = lambda: clock[0]
    bridge.ups.claim_timeout_s = 60
    with performer(bridge.port) as reader, performer(bridge.port, "READER2") as rival:
        assert reader.change_state(uid, "IN PROGRESS", txn) == 0x0000
        first_expiry = as_utc(item_state(bridge, items["E1"].id).claim_expires_at)
        clock[0] += timedelta(seconds=50)
        assert reader.set(uid, finding_mods(txn, "no_pneumonia")) == 0x0000
        renewed = as_utc(item_state(bridge, items["E1"].id).claim_expires_at)
        assert renewed == first_expiry + timedelta(seconds=50)  # the holder's N-SET keeps the claim alive
        clock[0] += timedelta(seconds=61)
        with bridge.sessions.begin() as s:  # the scheduler's sweep
            assert lifecycle.expire_claims(s, clock[0]) == 1
        status, ds = reader.get(uid)
        assert ds.ProcedureStepState == "SCHEDULED"
        assert reader.change_state(uid, "COMPLETED", txn) == 0xC310
        rival_txn = generate_uid()
        assert rival.change_state(uid, "IN PROGRESS", rival_txn) == 0x0000
        status, ds = rival.get(uid)
        # what READER1 set under its lost claim is not carried into READER2's
        assert not ds.UnifiedProcedureStepPerformedProcedureSequence[0].PerformedProcessingParametersSequence


def test_find_limit_ends_with_out_of_resources(bridge: Bridge) -> None:
    add_studies(bridge, [StudyCase(f"Many^{i}", f"M{i}", "ROUTINE", 0.5 + i / 10) for i in range(4)])
    bridge.ups.max_find_matches = 3
    with performer(bridge.port) as reader:
        found, final = reader.find(query(ProcedureStepState="SCHEDULED", PatientID=""))
    assert len(found) == 3 and final == 0xA700


def test_pynetdicom_findscu_command_line_queries_ups(bridge: Bridge, tmp_path: Path) -> None:
    """A command-line C-FIND SCU nobody here wrote: pynetdicom's ``findscu -U``.  (DCMTK's findscu 3.6.7 has
    no UPS information model: only -W/-P/-S/-O, so it cannot query UPS.)"""
    add_studies(bridge, [StudyCase("Cli^Query", "Q1", "STAT", 0.9)])
    out = tmp_path / "rsp"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "findscu", "127.0.0.1", str(bridge.port), "-U", "-aec", "PACSBRIDGE",
         "-aet", "CLIREADER", "-w", "-k", "ProcedureStepState=SCHEDULED", "-k", "PatientID=",
         "-k", "ScheduledProcedureStepPriority=", "-k", "SOPInstanceUID="],
        cwd=out, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("rsp*.dcm"))
    assert len(files) == 1, proc.stderr
    ds = dcmread(files[0])
    assert (ds.PatientID, ds.ScheduledProcedureStepPriority) == ("Q1", "HIGH")


def test_pacsbridge_serve_offers_ups_on_its_dicom_port(tmp_path: Path) -> None:
    """The daemon as deployed: a stored study whose positive prediction the scheduler turns into an item is
    found and claimed over UPS on the same port that received it."""
    from dicom_support import daemon_env, free_port, pacsbridge_cmd, wait_for_port

    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(pacsbridge_cmd("serve"), env=daemon_env(data, port, PACSBRIDGE_SCHEDULER_INTERVAL_S="0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, 60, proc)
        image = make_image(rows=16, cols=16)
        assert send_datasets(port, [image]) == [0]
        engine = make_engine(f"sqlite:///{data / 'pacsbridge.db'}")
        sessions = make_sessionmaker(engine)
        with sessions.begin() as s:  # what the inference worker (disabled here) would record
            inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == image.SOPInstanceUID)).one()
            inst.state = InstanceState.PREDICTED.value
            s.add(Prediction(instance_id=inst.id, probability=0.9, positive=True, threshold=0.5, model_id="t",
                             weights_sha256="0" * 64))
        # An admin binds the reading station's AE title to a radiologist (before that: refused).
        with performer(port) as reader:
            assert reader.find(query(ProcedureStepState="SCHEDULED"))[1] == 0x0124
        add = subprocess.run(pacsbridge_cmd("users", "add", "reader1", "--role", "radiologist", "--ae-title",
                                            "READER1", "--json"), env=daemon_env(data, port), capture_output=True,
                             text=True, timeout=120)
        assert add.returncode == 0, add.stderr
        assert json.loads(add.stdout)["ae_titles"] == ["READER1"]
        with performer(port) as reader:
            deadline = datetime.now(timezone.utc) + timedelta(seconds=30)
            found: list[Dataset] = []
            while not found and datetime.now(timezone.utc) < deadline:
                found, final = reader.find(query(ProcedureStepState="SCHEDULED", StudyInstanceUID=""))
                assert final == 0x0000
            assert [d.StudyInstanceUID for d in found] == [image.StudyInstanceUID]
            assert reader.change_state(found[0].SOPInstanceUID, "IN PROGRESS", generate_uid()) == 0x0000
        with sessions() as s:
            assert s.scalars(select(WorklistItem.claimed_by)).one() == "reader1"
        engine.dispose()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]


def test_ups_not_offered_when_disabled(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'off.db'}")
    migrations.upgrade(engine)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.prepare()
    scp = StorageSCP(ae_title="PACSBRIDGE", bind_address="127.0.0.1", port=0, spool=spool,
                     sessions=make_sessionmaker(engine), ups=None)
    scp.start()
    try:
        ae = AE(ae_title="READER1")
        ae.add_requested_context(UnifiedProcedureStepPull)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSBRIDGE")
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
    finally:
        scp.stop()
        engine.dispose()


# -- pure parts: priority bands, wildcard matching, finding codes ---------------------------------------
def test_ups_priority_bands_follow_the_priority_score() -> None:
    from pacsbridge.worklist.priority import priority_score

    assert ups_priority(priority_score(0.7, 0, "ROUTINE", 240)) == "LOW"  # fresh routine positive
    assert ups_priority(priority_score(0.7, 120, "ROUTINE", 240)) == "MEDIUM"  # waited half the maximum
    assert ups_priority(priority_score(0.8, 0, "HIGH", 240)) == "MEDIUM"
    assert ups_priority(priority_score(0.6, 0, "STAT", 240)) == "HIGH"
    assert ups_priority(priority_score(0.3, 240, None, 240)) == "HIGH"  # every overdue item


def test_wildcard_matching_is_dicom_and_linear() -> None:
    import time

    from pacsbridge.dicom.matching import wildcard_match

    assert wildcard_match("DOE^*", "DOE^JOHN") and wildcard_match("?OE*", "DOE") and wildcard_match("*", "")
    assert not wildcard_match("DOE^?", "DOE^JO") and not wildcard_match("[DR]OE", "DOE")  # no character classes
    started = time.perf_counter()
    assert not wildcard_match("*a" * 40 + "*b", "a" * 64)  # would backtrack for ages as a regex
    assert time.perf_counter() - started < 1.0


def test_finding_codes_accepted_from_the_performer() -> None:
    from pacsbridge.dicom.ups_dataset import InvalidPerformedData, parse_performed_data

    data, ignored = parse_performed_data(finding_mods(generate_uid(), "233604007", scheme="SCT"))
    assert data.finding == "pneumonia" and ignored == []
    mods = finding_mods(generate_uid(), "no_pneumonia", comment="clear")
    mods.PatientName = "Changed^Name"  # not something a performer may change here: ignored, reported
    data, ignored = parse_performed_data(mods)
    assert (data.finding, data.comment, ignored) == ("no_pneumonia", "clear", ["PatientName"])
    with pytest.raises(InvalidPerformedData):
        parse_performed_data(finding_mods(generate_uid(), "12345", scheme="SCT"))


def test_http_api_and_ups_share_claims_and_findings(bridge: Bridge) -> None:
    """Through the real HTTP API (FastAPI app, Bearer token) on one side and UPS on the other."""
    from fastapi.testclient import TestClient

    from pacsbridge.api.app import create_app
    from pacsbridge.auth.users import create_user

    items = add_studies(bridge, [StudyCase("Api^Claim", "A1", "ROUTINE", 0.9),
                                 StudyCase("Ups^Claim", "A2", "ROUTINE", 0.8)])
    with bridge.sessions.begin() as s:
        token = create_user(s, "anna", "radiologist")[1]
    client = TestClient(create_app(bridge.sessions, claim_timeout_s=1800))
    anna = {"Authorization": f"Bearer {token}"}
    a1, a2 = items["A1"], items["A2"]
    txn = generate_uid()
    with performer(bridge.port) as reader:
        assert client.post(f"/api/worklist/{a1.id}/claim", headers=anna).status_code == 200
        found, _ = reader.find(query(ProcedureStepState="IN PROGRESS", PatientID=""))
        assert [str(d.PatientID) for d in found] == ["A1"]
        assert reader.change_state(a1.ups_uid, "IN PROGRESS", txn) == 0xC302

        assert reader.change_state(a2.ups_uid, "IN PROGRESS", txn) == 0x0000
        rows = {r["id"]: r for r in client.get("/api/worklist", headers=anna).json()}
        assert (rows[a2.id]["status"], rows[a2.id]["claimed_by"]) == ("in_progress", "reader1")
        conflict = client.post(f"/api/worklist/{a2.id}/claim", headers=anna)
        assert conflict.status_code == 409 and conflict.json()["holder"] == "reader1"
        assert client.post(f"/api/worklist/{a2.id}/complete", headers=anna,
                           json={"finding": "other"}).status_code == 409  # not the claimant

        # each completes its own; each side sees the other's finding
        assert client.post(f"/api/worklist/{a1.id}/complete", headers=anna,
                           json={"finding": "no_pneumonia", "comment": "atelectasis"}).status_code == 200
        assert reader.set(a2.ups_uid, finding_mods(txn, "pneumonia")) == 0x0000
        assert reader.change_state(a2.ups_uid, "COMPLETED", txn) == 0x0000
        found, _ = reader.find(query(ProcedureStepState="COMPLETED", PatientID="",
                                     UnifiedProcedureStepPerformedProcedureSequence=Sequence()))
        got = {str(d.PatientID): d.UnifiedProcedureStepPerformedProcedureSequence[0] for d in found}
        assert got["A1"].PerformedProcessingParametersSequence[0].ConceptCodeSequence[0].CodeValue == "no_pneumonia"
        assert got["A1"].CommentsOnThePerformedProcedureStep == "atelectasis"
    done = {r["id"]: r for r in client.get("/api/worklist?status=completed", headers=anna).json()}
    assert done[a2.id]["finding"] == "pneumonia" and done[a1.id]["finding"] == "no_pneumonia"


def test_dimse_messages_for_other_sop_classes_do_not_reach_the_worklist(bridge: Bridge) -> None:
    """pynetdicom picks the service from the message's SOP Class UID, not the presentation context: a hostile
    peer can send a UPS C-FIND on a storage context, or a non-UPS N-ACTION on the UPS context.  Both are
    refused (0x0122) and change nothing."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_FIND, N_ACTION
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    items = add_studies(bridge, [StudyCase("Hostile^Peer", "X1", "ROUTINE", 0.9)])
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(UnifiedProcedureStepPull)
    assoc = ae.associate("127.0.0.1", bridge.port, ae_title="PACSBRIDGE")
    assert assoc.is_established
    cx = {str(c.abstract_syntax): c.context_id for c in assoc.accepted_contexts}

    def exchange(request, context_id: int):  # noqa: ANN001, ANN202 - as Association.send_c_echo does it
        assoc._reactor_checkpoint.clear()  # pause the reactor so that the response comes to us
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(request, context_id)
            return assoc.dimse.get_msg(block=True)[1]
        finally:
            assoc._reactor_checkpoint.set()

    def encoded(ds: Dataset) -> BytesIO:
        return BytesIO(encode(ds, True, True))  # implicit VR little endian, the contexts' first transfer syntax

    try:
        find = C_FIND()
        find.MessageID, find.AffectedSOPClassUID, find.Priority = 7, UnifiedProcedureStepPull, 2
        find.Identifier = encoded(query(ProcedureStepState="SCHEDULED", PatientID=""))
        rsp = exchange(find, cx[ComputedRadiographyImageStorage])
        assert rsp.Status == 0x0122 and not (rsp.Identifier and rsp.Identifier.getvalue())  # no match sent

        action = N_ACTION()
        action.MessageID, action.ActionTypeID = 8, 1
        action.RequestedSOPClassUID = "1.2.840.10008.5.1.1.14"  # Print Job: not UPS
        action.RequestedSOPInstanceUID = items["X1"].ups_uid
        action.ActionInformation = encoded(query(ProcedureStepState="IN PROGRESS", TransactionUID=generate_uid()))
        rsp = exchange(action, cx[UnifiedProcedureStepPull])
        assert rsp.Status == 0x0122
    finally:
        assoc.release()
    assert item_state(bridge, items["X1"].id).status == "scheduled"


def test_database_unreachable_gives_failure_statuses_not_silence(tmp_path: Path) -> None:
    """UPS requests while the database is down: C-FIND 0xC000 (unable to process), N-GET/N-ACTION 0x0110
    (processing failure); the association and the receiver stay up."""
    from dicom_support import free_port

    engine = make_engine(f"sqlite:///{tmp_path / 'rx.db'}")
    migrations.upgrade(engine)
    down = make_engine(f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none")  # nothing listens there
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.prepare()
    scp = StorageSCP(ae_title="PACSBRIDGE", bind_address="127.0.0.1", port=0, spool=spool,
                     sessions=make_sessionmaker(engine), ups=UpsContext(sessions=make_sessionmaker(down)))
    scp.start()
    try:
        with performer(scp.port) as reader:
            found, final = reader.find(query(ProcedureStepState="SCHEDULED"))
            assert (found, final) == ([], 0xC000)
            assert reader.get(generate_uid())[0] == 0x0110
            assert reader.change_state(generate_uid(), "IN PROGRESS", generate_uid()) == 0x0110
            assert reader.find(query(ProcedureStepState="SCHEDULED"))[1] == 0xC000  # the association still works
    finally:
        scp.stop()
        engine.dispose()
        down.dispose()


# -- access: only AE titles bound to a user who may work the worklist --------------------------------------
def refusals(bridge: Bridge) -> list[Event]:
    with bridge.sessions() as s:
        return list(s.scalars(select(Event).where(Event.kind == "ups_refused").order_by(Event.id)))


def test_unbound_ae_title_is_refused_everything_and_learns_nothing(bridge: Bridge, caplog) -> None:
    """A device that merely reaches the port (the default: nobody bound) cannot list, read, claim, set or
    complete: 0x0124 for every request, the same for an existing and an unknown UPS, nothing changes."""
    items = add_studies(bridge, [StudyCase("Secret^Patient", "S1", "STAT", 0.9)])
    uid, txn = items["S1"].ups_uid, generate_uid()
    with caplog.at_level("WARNING", logger="pacsbridge.dicom.ups_scp"), performer(bridge.port, "ANYDEVICE") as peer:
        assert peer.find(query(ProcedureStepState="", PatientName="", PatientID="")) == ([], 0x0124)
        assert peer.find(query(PatientID="S1")) == ([], 0x0124)
        assert peer.get(uid) == (0x0124, None)
        assert peer.get(generate_uid()) == (0x0124, None)  # no hint which UIDs exist
        assert peer.change_state(uid, "IN PROGRESS", txn) == 0x0124
        assert peer.set(uid, finding_mods(txn, "no_pneumonia")) == 0x0124
        assert peer.change_state(uid, "COMPLETED", txn) == 0x0124
    item = item_state(bridge, items["S1"].id)
    assert (item.status, item.claimed_by, item.finding) == ("scheduled", None, None)
    assert ups_events(bridge, item.id) == []
    # one event and one WARNING for the association, naming the AE title and address, no patient data
    (ev,) = refusals(bridge)
    assert "ANYDEVICE" in ev.peer and "not bound" in ev.detail
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "ANYDEVICE@127.0.0.1" in warnings[0]
    assert not any("Secret" in r.getMessage() or "S1" in r.getMessage() for r in caplog.records)


def test_bound_station_acts_as_its_user_with_http(bridge: Bridge) -> None:
    """READSTATION1 bound to anna: its claim is anna's claim, so anna's HTTP token may complete it, and the
    completion and every event carry anna, not the AE title."""
    from fastapi.testclient import TestClient

    from pacsbridge.api.app import create_app

    items = add_studies(bridge, [StudyCase("Bound^Station", "B1", "ROUTINE", 0.9)])
    with bridge.sessions.begin() as s:
        token = create_user(s, "anna", "radiologist")[1]
        bind_ae(s, "anna", "READSTATION1")
    client = TestClient(create_app(bridge.sessions, claim_timeout_s=1800))
    item, txn = items["B1"], generate_uid()
    with performer(bridge.port, "READSTATION1") as station:
        found, final = station.find(query(ProcedureStepState="SCHEDULED", PatientID=""))
        assert final == 0x0000 and [str(d.PatientID) for d in found] == ["B1"]
        assert station.change_state(item.ups_uid, "IN PROGRESS", txn) == 0x0000
        assert item_state(bridge, item.id).claimed_by == "anna"
    done = client.post(f"/api/worklist/{item.id}/complete", headers={"Authorization": f"Bearer {token}"},
                       json={"finding": "pneumonia"})
    assert done.status_code == 200, done.text
    assert item_state(bridge, item.id).completed_by == "anna"
    assert {actor for _, actor in ups_events(bridge, item.id)} == {"anna"}


def test_monitor_user_bound_cannot_use_the_worklist(bridge: Bridge) -> None:
    """The HTTP rules: a monitor may not read or work the worklist, so neither may its AE title."""
    items = add_studies(bridge, [StudyCase("Monitor^Only", "M1", "ROUTINE", 0.9)])
    with bridge.sessions.begin() as s:
        create_user(s, "ops", "monitor")
        bind_ae(s, "ops", "DASHBOARD")
    uid, txn = items["M1"].ups_uid, generate_uid()
    with performer(bridge.port, "DASHBOARD") as peer:
        assert peer.find(query(ProcedureStepState="SCHEDULED", PatientID="")) == ([], 0x0124)
        assert peer.get(uid)[0] == 0x0124
        assert peer.change_state(uid, "IN PROGRESS", txn) == 0x0124
        assert peer.set(uid, finding_mods(txn, "no_pneumonia")) == 0x0124
    assert item_state(bridge, items["M1"].id).status == "scheduled"
    assert "role monitor" in refusals(bridge)[0].detail


def test_unbinding_and_revoking_take_effect_at_once(bridge: Bridge) -> None:
    """Checked on every request: within one open association, the station loses access as soon as the admin
    unbinds it (or revokes its user)."""
    items = add_studies(bridge, [StudyCase("Live^Check", "L1", "ROUTINE", 0.9)])
    with bridge.sessions.begin() as s:
        create_user(s, "ben", "radiologist")
        bind_ae(s, "ben", "READER3")
    with performer(bridge.port, "READER3") as station:
        assert station.find(query(ProcedureStepState="SCHEDULED", PatientID=""))[1] == 0x0000
        with bridge.sessions.begin() as s:
            unbind_ae(s, "ben", "READER3")
        assert station.find(query(ProcedureStepState="SCHEDULED", PatientID="")) == ([], 0x0124)
        with bridge.sessions.begin() as s:
            bind_ae(s, "ben", "READER3")
        assert station.get(items["L1"].ups_uid)[0] == 0x0000
        with bridge.sessions.begin() as s:
            revoke_user(s, "ben")
        assert station.get(items["L1"].ups_uid)[0] == 0x0124


def test_an_ae_title_is_bound_to_one_user_at_most(bridge: Bridge) -> None:
    from pacsbridge.auth.users import AuthError

    with bridge.sessions.begin() as s:
        create_user(s, "carl", "radiologist")
    with bridge.sessions.begin() as s, pytest.raises(AuthError, match="already bound to user 'reader1'"):
        bind_ae(s, "carl", "READER1")
    for bad in ("", "A\\B", "X" * 17, "TAB\tAE"):
        with bridge.sessions.begin() as s, pytest.raises(AuthError, match="not valid"):
            bind_ae(s, "carl", bad)
    with bridge.sessions.begin() as s, pytest.raises(AuthError, match="not bound"):
        unbind_ae(s, "carl", "READER1")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="OPENSSL COMMAND MISSING: UPS mutual-TLS test SKIPPED")
def test_binding_with_tls_subject_needs_that_client_certificate(tmp_path: Path) -> None:
    """``users bind --tls-subject``: the AE title works only over mutual TLS with that certificate subject;
    the same AE title over plain DICOM (anyone can type it) is refused."""
    from hostile_support import make_pki
    from pacsbridge.dicom.tls import make_client_context, make_server_context

    pki = make_pki(tmp_path / "pki")
    engine = make_engine(f"sqlite:///{tmp_path / 'tls.db'}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        create_user(s, "tina", "radiologist")
        bind_ae(s, "tina", "TLSREADER", tls_subject="CN=client")
        bind_ae(s, "tina", "WRONGCERT", tls_subject="CN=someone-else")
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.prepare()
    server_ctx = make_server_context(str(pki.server_cert), str(pki.server_key), ca=str(pki.ca), verify_client=True)
    scp = StorageSCP(ae_title="PACSBRIDGE", bind_address="127.0.0.1", port=0, spool=spool, sessions=sessions,
                     tls_context=server_ctx, tls_port=0, ups=UpsContext(sessions=sessions))
    scp.start()
    client_ctx = make_client_context(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))

    def find_status(ae_title: str, tls: bool) -> int:
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(UnifiedProcedureStepPull)
        assoc = ae.associate("127.0.0.1", scp.tls_port if tls else scp.port, ae_title="PACSBRIDGE",
                             tls_args=(client_ctx, "localhost") if tls else None)
        assert assoc.is_established
        try:
            statuses = [int(st.Status) for st, _ in assoc.send_c_find(query(ProcedureStepState="SCHEDULED"),
                                                                      UnifiedProcedureStepPull)]
        finally:
            assoc.release()
        return statuses[-1]

    try:
        assert find_status("TLSREADER", tls=True) == 0x0000
        assert find_status("TLSREADER", tls=False) == 0x0124
        assert find_status("WRONGCERT", tls=True) == 0x0124
    finally:
        scp.stop()
        engine.dispose()
    with sessions() as s:
        details = [e.detail for e in s.scalars(select(Event).where(Event.kind == "ups_refused"))]
    assert any("no client certificate" in d for d in details) and any("subject CN=client" in d for d in details)
