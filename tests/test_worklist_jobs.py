"""Worklist refresh job (idempotent, never lowers priority) and spool retention, on SQLite."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacsbridge.store.models import Event, Instance, InstanceState, Prediction, WorklistItem
from pacsbridge.store.models import as_utc
from pacsbridge.worklist.items import WorklistUpdater, list_worklist
from pacsbridge.worklist.priority import priority_score
from pacsbridge.worklist.retention import purge_spool
from pacsbridge.worklist.scheduler import make_scheduler
from pipeline_support import add_instance, sqlite_sessions, sample_file

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
MAX_WAIT = 240.0


def _predict(sessions, iid: int, p: float, threshold: float = 0.5, at: datetime | None = None) -> None:
    """Record a prediction made at ``at`` (default: when the instance was received)."""
    with sessions.begin() as s:
        inst = s.get(Instance, iid)
        inst.state = InstanceState.PREDICTED.value
        s.add(Prediction(instance_id=iid, probability=p, positive=p >= threshold, threshold=threshold,
                         model_id="m", weights_sha256="0" * 64, created_at=at or as_utc(inst.received_at)))


def _snapshot(sessions) -> list[tuple]:
    with sessions() as s:
        return [(i.study_id, i.priority, i.probability, i.status, i.updated_at)
                for i in s.scalars(select(WorklistItem).order_by(WorklistItem.study_id))]


@pytest.fixture
def db(tmp_path: Path):
    return sqlite_sessions(tmp_path)


def test_positives_become_one_item_per_study_with_max_probability(db, tmp_path: Path) -> None:
    a1 = add_instance(db, tmp_path, None, sop_uid="1.1.1", study_uid="9.1", received_at=T0)
    a2 = add_instance(db, tmp_path, None, sop_uid="1.1.2", study_uid="9.1", received_at=T0)
    b1 = add_instance(db, tmp_path, None, sop_uid="1.2.1", study_uid="9.2", received_at=T0)
    c1 = add_instance(db, tmp_path, None, sop_uid="1.3.1", study_uid="9.3", received_at=T0)
    _predict(db, a1, 0.7)
    _predict(db, a2, 0.9)
    _predict(db, b1, 0.6)
    _predict(db, c1, 0.2)  # negative: no item
    up = WorklistUpdater(db, MAX_WAIT)
    res = up.refresh(now=T0 + timedelta(minutes=1))
    assert (res.created, res.updated) == (2, 0)
    with db() as s:
        rows = list_worklist(s)
    assert [r["study_instance_uid"] for r in rows] == ["9.1", "9.2"]
    assert rows[0]["probability"] == pytest.approx(0.9)
    assert rows[0]["priority"] == pytest.approx(priority_score(0.9, 1.0, None, MAX_WAIT), abs=1e-6)
    assert rows[0]["status"] == "scheduled"
    assert datetime.fromisoformat(rows[0]["received_at"]) == T0


def test_refresh_is_idempotent(db, tmp_path: Path) -> None:
    for i, p in enumerate((0.8, 0.6, 0.95)):
        iid = add_instance(db, tmp_path, None, sop_uid=f"2.{i}", study_uid=f"8.{i}", received_at=T0)
        _predict(db, iid, p)
    up = WorklistUpdater(db, MAX_WAIT)
    now = T0 + timedelta(minutes=30)
    first = up.refresh(now=now)
    before = _snapshot(db)
    second = up.refresh(now=now)
    assert first.created == 3 and (second.created, second.updated) == (0, 0)
    assert _snapshot(db) == before
    with db() as s:
        assert s.scalar(select(func.count(WorklistItem.id))) == 3


def test_more_images_update_the_study_item(db, tmp_path: Path) -> None:
    a = add_instance(db, tmp_path, None, sop_uid="3.1", study_uid="7.1", received_at=T0)
    _predict(db, a, 0.6)
    up = WorklistUpdater(db, MAX_WAIT)
    up.refresh(now=T0)
    b = add_instance(db, tmp_path, None, sop_uid="3.2", study_uid="7.1", received_at=T0 + timedelta(minutes=2))
    _predict(db, b, 0.85)
    c = add_instance(db, tmp_path, None, sop_uid="3.3", study_uid="7.1", received_at=T0 + timedelta(minutes=3))
    _predict(db, c, 0.65)  # lower: the item keeps the max
    res = up.refresh(study_ids=None, now=T0 + timedelta(minutes=3))
    assert (res.created, res.updated) == (0, 1)
    with db() as s:
        [row] = list_worklist(s)
    assert row["probability"] == pytest.approx(0.85)
    assert datetime.fromisoformat(row["received_at"]) == T0  # first arrival of the study, not of the image


def test_priority_never_decreases_and_ages(db, tmp_path: Path) -> None:
    a = add_instance(db, tmp_path, None, sop_uid="4.1", study_uid="6.1", received_at=T0)
    _predict(db, a, 0.7)
    up = WorklistUpdater(db, MAX_WAIT)
    up.refresh(now=T0 + timedelta(minutes=60))
    p60 = _snapshot(db)[0][1]
    up.refresh(now=T0 + timedelta(minutes=10))  # clock went backwards: must not lower it
    assert _snapshot(db)[0][1] == p60
    up.refresh(now=T0 + timedelta(minutes=120))
    p120 = _snapshot(db)[0][1]
    assert p120 > p60
    # A manual lower value in the table (e.g. a policy change) is never written over with less.
    with db.begin() as s:
        s.scalars(select(WorklistItem)).one().priority = 50.0
    up.refresh(now=T0 + timedelta(minutes=500))
    assert _snapshot(db)[0][1] == 50.0


def test_overdue_item_rises_above_fresh_stat_item(db, tmp_path: Path) -> None:
    old = add_instance(db, tmp_path, None, sop_uid="5.1", study_uid="5.old", received_at=T0)
    _predict(db, old, 0.55)
    now = T0 + timedelta(minutes=MAX_WAIT + 1)
    fresh = add_instance(db, tmp_path, None, sop_uid="5.2", study_uid="5.fresh", received_at=now,
                         requested_priority="STAT")
    _predict(db, fresh, 0.99)
    WorklistUpdater(db, MAX_WAIT).refresh(now=now)
    with db() as s:
        assert [r["study_instance_uid"] for r in list_worklist(s)] == ["5.old", "5.fresh"]


def test_stat_study_outranks_routine(db, tmp_path: Path) -> None:
    r = add_instance(db, tmp_path, None, sop_uid="6.1", study_uid="4.routine", received_at=T0)
    s_ = add_instance(db, tmp_path, None, sop_uid="6.2", study_uid="4.stat", received_at=T0, requested_priority="STAT")
    _predict(db, r, 0.95)
    _predict(db, s_, 0.6)
    WorklistUpdater(db, MAX_WAIT).refresh(now=T0)
    with db() as s:
        assert [x["study_instance_uid"] for x in list_worklist(s)] == ["4.stat", "4.routine"]


def test_scheduler_runs_the_job(db, tmp_path: Path) -> None:
    a = add_instance(db, tmp_path, None, sop_uid="7.1", study_uid="3.1")
    _predict(db, a, 0.8)
    up = WorklistUpdater(db, MAX_WAIT)
    sched = make_scheduler(up, db, tmp_path, interval_s=0.1, retention_days=0)
    sched.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with db() as s:
                if list_worklist(s):
                    break
            time.sleep(0.05)
    finally:
        sched.shutdown(wait=True)
    with db() as s:
        assert len(list_worklist(s)) == 1


def test_retention_deletes_only_old_scored_files(db, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    src = sample_file("RG1_UNCR.dcm")
    now = T0 + timedelta(days=40)
    old_pred = add_instance(db, spool, src, sop_uid="8.1", state="predicted", received_at=T0)
    old_refused = add_instance(db, spool, src, sop_uid="8.2", state="not_analysed", received_at=T0)
    old_waiting = add_instance(db, spool, src, sop_uid="8.3", state="received", received_at=T0)
    old_busy = add_instance(db, spool, src, sop_uid="8.4", state="processing", received_at=T0)
    new_pred = add_instance(db, spool, src, sop_uid="8.5", state="predicted", received_at=now - timedelta(days=1))
    with db() as s:
        paths = {i.id: spool / i.file_path for i in s.scalars(select(Instance))}
    assert purge_spool(db, spool, 30, now=now) == 2
    assert not paths[old_pred].exists() and not paths[old_refused].exists()
    for kept in (old_waiting, old_busy, new_pred):
        assert paths[kept].exists()
    with db() as s:
        for gone in (old_pred, old_refused):
            inst = s.get(Instance, gone)
            assert inst.spool_deleted_at is not None and as_utc(inst.spool_deleted_at) == now
            assert spool / inst.file_path == paths[gone]  # the path stays on record
        assert s.get(Instance, old_pred).state == "predicted"
        for kept in (old_waiting, old_busy, new_pred):
            assert s.get(Instance, kept).spool_deleted_at is None
        events = s.scalars(select(Event).where(Event.kind == "spool_file_deleted")).all()
        assert sorted(e.instance_id for e in events) == sorted([old_pred, old_refused])
    assert purge_spool(db, spool, 30, now=now) == 0  # nothing left to do
    assert purge_spool(db, spool, 0, now=now + timedelta(days=999)) == 0  # 0 = keep forever
