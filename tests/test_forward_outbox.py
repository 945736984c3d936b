"""The outbox as the worker writes it (same transaction as the prediction) and its state machine,
on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_support import database_url_for
from forward_support import add_result
from pacsbridge.config import Destination
from pacsbridge.forward import outbox
from pacsbridge.forward.outbox import Outbox, RetryPolicy
from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.model.artifact import load_model
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, Instance, OutboxEntry, Prediction, as_utc, utcnow
from pipeline_support import add_instance, export_model, sample_file

PACS = Destination(name="pacs", kind="dicom", host="127.0.0.1", port=1, ae_title="PACS", objects=["sr", "images"])
RIS_ALL = Destination(name="ris", kind="hl7", host="127.0.0.1", port=2, send="all")


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    for url in database_url_for(request.param, tmp_path / "outbox.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()


@pytest.mark.parametrize("threshold, expected", [
    (0.0, {("pacs", "sr"), ("pacs", "images"), ("ris", "oru")}),  # every image positive
    (1.0, {("ris", "oru")}),  # every image negative: only the destination that wants all results
])
def test_worker_writes_entries_with_each_prediction(sessions, tmp_path: Path, threshold, expected):
    model = load_model(export_model(tmp_path / "m", threshold=threshold), "cpu")
    spool = tmp_path / "spool"
    for i, name in enumerate(["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm"]):  # RG3 is not a chest: no result
        add_instance(sessions, spool, sample_file(name), sop_uid=f"1.{i}", study_uid=f"2.{i}")
    worker = InferenceWorker(sessions, model, spool, batch_size=4, max_wait_ms=0, outbox=Outbox([PACS, RIS_ALL]))
    assert worker.drain().predicted == 2
    with sessions() as s:
        rows = s.execute(select(OutboxEntry, Instance.sop_instance_uid)
                         .join(Prediction, Prediction.id == OutboxEntry.prediction_id)
                         .join(Instance, Instance.id == Prediction.instance_id)).all()
    for sop in ("1.0", "1.1"):
        assert {(e.destination, e.object) for e, s_ in rows if s_ == sop} == expected
    assert all(e.state == "pending" and e.attempts == 0 for e, _ in rows)


def test_outbox_failure_rolls_back_the_prediction(sessions, tmp_path: Path, monkeypatch):
    model = load_model(export_model(tmp_path / "m", threshold=0.0), "cpu")
    spool = tmp_path / "spool"
    add_instance(sessions, spool, sample_file("RG1_UNCR.dcm"), sop_uid="1.0", study_uid="2.0")
    box = Outbox([PACS])

    def broken(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("outbox write failed")

    monkeypatch.setattr(box, "enqueue", broken)
    worker = InferenceWorker(sessions, model, spool, batch_size=1, max_wait_ms=0, outbox=box)
    with pytest.raises(RuntimeError):
        worker.run_once(wait=False)
    with sessions() as s:
        assert s.scalars(select(Prediction)).all() == []  # no result without its outbox entries
        assert s.scalar(select(Instance.state)) == "processing"  # released by the claim recovery, then rescored
    monkeypatch.undo()
    worker = InferenceWorker(sessions, model, spool, batch_size=1, max_wait_ms=0, outbox=box,
                             worker_id=worker.worker_id)
    worker.recover_stale_claims()
    assert worker.drain().predicted == 1
    with sessions() as s:
        assert sorted(e.object for e in s.scalars(select(OutboxEntry))) == ["images", "sr"]


def test_state_machine(sessions, tmp_path: Path):
    pid = add_result(sessions, tmp_path / "spool", sample_file("RG1_UNCR.dcm"), [PACS])
    policy = RetryPolicy(initial_s=10, max_s=40, max_age=timedelta(hours=1))
    with sessions() as s:
        sr, img = outbox.due_entries(s)
    assert (sr.object, img.object) == ("sr", "images") and sr.result.prediction_id == pid

    # transient: pending again, later, with growing (jittered) delays capped at max_s
    delays = []
    for _ in range(4):
        t0 = utcnow()
        assert outbox.mark_failed(sessions, sr.id, "peer down", permanent=False, policy=policy, now=t0) == "pending"
        with sessions() as s:
            e = s.get(OutboxEntry, sr.id)
            delays.append((as_utc(e.next_attempt_at) - t0).total_seconds())
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20 and 20 <= delays[2] <= 40 and 20 <= delays[3] <= 40
    with sessions() as s:
        assert [e.id for e in outbox.due_entries(s)] == [img.id]
        assert [e.id for e in outbox.due_entries(s, now=utcnow() + timedelta(seconds=41))] == [img.id, sr.id]

    assert outbox.mark_sent(sessions, img.id, "1.2.3") is True
    assert outbox.mark_sent(sessions, img.id, "1.2.3") is False  # only once
    assert outbox.mark_failed(sessions, img.id, "late", permanent=True, policy=policy) is None  # sent stays sent
    assert outbox.retry(sessions, [img.id]) == []  # a sent entry is never queued again

    assert outbox.mark_failed(sessions, sr.id, "0xA900", permanent=True, policy=policy) == "dead"
    with sessions() as s:
        assert outbox.state_counts(s) == {"pending": 0, "sent": 1, "dead": 1}
        listed = outbox.list_entries(s, state="dead")
        assert [(r["id"], r["attempts"], r["last_error"]) for r in listed] == [(sr.id, 5, "0xA900")]
        assert s.scalars(select(Event.kind).where(Event.kind == "outbox_dead")).all() == ["outbox_dead"]
    assert outbox.retry(sessions, all_dead=True) == [sr.id]
    with sessions() as s:
        assert outbox.state_counts(s) == {"pending": 1, "sent": 1, "dead": 0}
        assert [e.id for e in outbox.due_entries(s)] == [sr.id]
