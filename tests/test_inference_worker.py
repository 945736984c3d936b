"""The inference worker on SQLite: scoring, refusals, error isolation, claims and restart recovery."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacsbridge.imaging import load_for_model, read_dataset
from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.model.artifact import load_model
from pacsbridge.scoring import Scorer
from pacsbridge.store.models import Event, Instance, Prediction, utcnow
from pipeline_support import add_instance, export_model, sample_file, sqlite_sessions

CHEST = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm", "RG1_J2KI.dcm"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(export_model(tmp_path_factory.mktemp("model"), threshold=0.5), "auto")


@pytest.fixture
def db(tmp_path: Path):
    return sqlite_sessions(tmp_path)


def _states(db) -> dict[str, tuple[str, str | None]]:
    with db() as s:
        return {i.sop_instance_uid: (i.state, i.state_reason) for i in s.scalars(select(Instance))}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no such process now (pid reuse within the test is vanishingly unlikely)


def test_scores_chest_images_and_refuses_others(db, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    for i, name in enumerate(CHEST + ["RG3_UNCR.dcm", "CT_small.dcm"]):
        add_instance(db, spool, sample_file(name), sop_uid=f"1.{i}", study_uid=f"2.{i}")
    worker = InferenceWorker(db, model, spool, batch_size=3, max_wait_ms=0)
    out = worker.drain()
    assert (out.predicted, out.not_analysed, out.lost_claims) == (4, 2, 0)
    states = _states(db)
    assert [states[f"1.{i}"][0] for i in range(4)] == ["predicted"] * 4
    assert states["1.4"][0] == "not_analysed" and "chest" in states["1.4"][1]
    assert states["1.5"][0] == "not_analysed" and "CT" in states["1.5"][1]
    with db() as s:
        preds = s.scalars(select(Prediction)).all()
        assert len(preds) == 4
        for p in preds:
            assert 0.0 <= p.probability <= 1.0 and p.positive == (p.probability >= 0.5)
            assert p.model_id == model.model_id and p.weights_sha256 == model.weights_sha256
            assert p.threshold == 0.5 and p.decode_ms > 0 and p.inference_ms > 0
        events = s.scalars(select(Event).where(Event.kind == "not_analysed")).all()
        assert sorted(e.sop_instance_uid for e in events) == ["1.4", "1.5"]
        # The same image through the imaging path directly gives the same probability.
        direct = model.predict_images([load_for_model(sample_file("RG1_UNCR.dcm")).image])[0]
        uncr = s.scalar(select(Prediction).join(Instance).where(Instance.sop_instance_uid == "1.0"))
        assert uncr.probability == pytest.approx(direct, abs=1e-4)
    assert worker.drain().processed == 0  # nothing is scored twice


def test_one_info_line_per_prediction_and_refusal_without_patient_data(db, tmp_path: Path, model, caplog) -> None:
    import logging

    from pacsbridge.store.spool import spool_relpath

    spool = tmp_path / "spool"
    add_instance(db, spool, sample_file("RG1_UNCR.dcm"), sop_uid="1.1", study_uid="2.1")
    add_instance(db, spool, sample_file("RG3_UNCR.dcm"), sop_uid="1.2", study_uid="2.2")
    with caplog.at_level(logging.INFO, logger="pacsbridge.inference.worker"):
        InferenceWorker(db, model, spool, batch_size=4, max_wait_ms=0).drain()
    lines = [r.getMessage() for r in caplog.records if r.name == "pacsbridge.inference.worker"]
    h1, h2 = (Path(spool_relpath(u)).stem[:12] for u in ("1.1", "1.2"))
    scored = [m for m in lines if m.startswith(f"predicted {h1}: probability ")]
    refused = [m for m in lines if m.startswith(f"not_analysed {h2}: ") and "chest" in m]
    assert len(scored) == 1 and len(refused) == 1, lines
    for m in lines:  # no UIDs or patient data from the DICOM files
        assert "1.3.6.1.4.1" not in m and "1.1" not in m.split(":")[0]
        for ds_name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
            import pydicom

            pid = str(pydicom.dcmread(sample_file(ds_name), stop_before_pixels=True).get("PatientName", "")) or "@@"
            assert pid not in m


def test_arrival_order_and_batch_size(db, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    t0 = utcnow()
    # Inserted out of order; received_at decides.
    for i, minute in enumerate([5, 1, 3, 2, 4]):
        add_instance(db, spool, None, sop_uid=f"3.{i}", received_at=t0 + timedelta(minutes=minute))
    worker = InferenceWorker(db, model, spool, batch_size=2, max_wait_ms=0)
    first = worker.claim(2)
    second = worker.claim(10)
    assert [c.sop_instance_uid for c in first] == ["3.1", "3.3"]
    assert [c.sop_instance_uid for c in second] == ["3.2", "3.4", "3.0"]
    assert worker.claim(5) == []
    with db() as s:
        rows = s.scalars(select(Instance)).all()
        assert {r.state for r in rows} == {"processing"} and {r.claimed_by for r in rows} == {worker.worker_id}
        assert all(r.claimed_at is not None for r in rows)


def test_error_on_one_instance_does_not_stop_the_batch(db, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    add_instance(db, spool, sample_file("RG1_UNCR.dcm"), sop_uid="4.1")
    bad = add_instance(db, spool, sample_file("RG1_UNCR.dcm"), sop_uid="4.2")
    add_instance(db, spool, None, sop_uid="4.3")  # recorded but its file is gone
    with db() as s:
        bad_path = (spool / s.get(Instance, bad).file_path).resolve()

    def read(path: Path):
        # A reader bug on one file (the imaging layer itself never raises anything but NotAnalysable).
        if path == bad_path:
            raise RuntimeError("decoder bug")
        return read_dataset(path)

    worker = InferenceWorker(db, model, spool, scorer=Scorer(model, read=read))
    out = worker.drain()
    # Both are faults of the system, not of the image: failed, with a retry scheduled.
    assert (out.predicted, out.not_analysed, out.failed) == (1, 0, 2)
    states = _states(db)
    assert states["4.1"][0] == "predicted"
    assert states["4.2"] == ("failed", "could not decode the image (RuntimeError: decoder bug)")
    assert states["4.3"] == ("failed", "the stored file is missing from the spool")
    with db() as s:
        events = {e.sop_instance_uid: (e.kind, e.level) for e in s.scalars(select(Event))}
    assert events == {"4.2": ("analysis_failed", "error"), "4.3": ("analysis_failed", "error")}


def test_lost_claim_is_not_recorded(db, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    add_instance(db, spool, sample_file("RG1_UNCR.dcm"), sop_uid="5.1")
    worker = InferenceWorker(db, model, spool)
    claimed = worker.claim(1)
    with db.begin() as s:  # another worker's recovery took it back meanwhile
        s.scalars(select(Instance)).one().claimed_by = "otherhost:1"
    out = worker._record(worker._score(claimed))
    assert (out.predicted, out.lost_claims) == (0, 1)
    with db() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 0


def test_restart_recovers_stuck_claims_and_scores_each_once(db, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    host = socket.gethostname()
    now = utcnow()
    src = sample_file("RG1_UNCR.dcm")
    add_instance(db, spool, src, sop_uid="6.1", state="processing", claimed_by=f"{host}:{_dead_pid()}", claimed_at=now)
    add_instance(db, spool, src, sop_uid="6.2", state="processing", claimed_by="elsewhere:42",
                 claimed_at=now - timedelta(hours=1))
    add_instance(db, spool, src, sop_uid="6.3", state="processing", claimed_by=f"{host}:{os.getppid()}",
                 claimed_at=now)  # a live worker on this host, fresh claim: not ours to take
    add_instance(db, spool, src, sop_uid="6.4")
    worker = InferenceWorker(db, model, spool, idle_poll_s=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(st == "predicted" for st, _ in _states(db).values()) >= 3:
                break
            time.sleep(0.05)
    finally:
        worker.stop()
    states = _states(db)
    assert {k: v[0] for k, v in states.items()} == {
        "6.1": "predicted", "6.2": "predicted", "6.3": "processing", "6.4": "predicted"}
    with db() as s:
        counts = dict(s.execute(select(Instance.sop_instance_uid, func.count(Prediction.id))
                                .join(Prediction).group_by(Instance.sop_instance_uid)).all())
        released = s.scalars(select(Event.sop_instance_uid).where(Event.kind == "claim_released")).all()
    assert counts == {"6.1": 1, "6.2": 1, "6.4": 1}
    assert sorted(released) == ["6.1", "6.2"]


def test_worker_thread_reports_positive_studies(db, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    for i, name in enumerate(CHEST):
        add_instance(db, spool, sample_file(name), sop_uid=f"7.{i}", study_uid=f"8.{i}")
    seen: list[set[int]] = []
    worker = InferenceWorker(db, model, spool, batch_size=8, max_wait_ms=0, on_recorded=seen.append)
    # Pick a threshold from this model's own scores so that some studies are positive and some not.
    probs = sorted(model.predict_images([load_for_model(sample_file(n)).image for n in CHEST]))
    model_thr = model.threshold
    model.threshold = (probs[1] + probs[2]) / 2
    try:
        out = worker.drain()
    finally:
        model.threshold = model_thr
    with db() as s:
        positives = s.scalars(select(Instance.sop_instance_uid).join(Prediction).where(Prediction.positive)).all()
    assert out.predicted == 4
    if probs[1] == probs[2]:
        pytest.skip("random model gave tied scores; cannot split positives from negatives")
    assert len(positives) == 2 and len(out.positive_studies) == 2 and seen == [out.positive_studies]


def test_batch_that_fails_to_record_is_given_back_and_scored_once(db, tmp_path: Path, model) -> None:
    from sqlalchemy.exc import OperationalError

    spool = tmp_path / "spool"
    for i in range(2):
        add_instance(db, spool, sample_file("RG1_UNCR.dcm"), sop_uid=f"9.{i}")
    worker = InferenceWorker(db, model, spool, idle_poll_s=0.05)
    real_record = worker._record_in
    calls = {"n": 0}

    def flaky_record(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the database goes away just when the first batch is recorded
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return real_record(*args, **kwargs)

    worker._record_in = flaky_record
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(st == "predicted" for st, _ in _states(db).values()):
                break
            time.sleep(0.05)
    finally:
        worker.stop()
    assert {st for st, _ in _states(db).values()} == {"predicted"}
    with db() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 2
        assert s.scalar(select(func.count()).where(Event.kind == "claim_released")) == 2
    assert worker.last_error is None


# -- waking: the receiver tells an idle worker that an instance arrived --------------------------------
def test_store_notifier_wakes_waiters_without_losing_notifications() -> None:
    import threading

    from pacsbridge.store.notifier import StoreNotifier

    n = StoreNotifier()
    seen = n.count
    t0 = time.monotonic()
    assert n.wait(seen, 0.05) == seen and time.monotonic() - t0 >= 0.04  # nothing new: times out
    n.notify()  # arrives before the wait starts: not lost
    assert n.wait(seen, 30) == seen + 1
    woken: list[int] = []
    waiters = [threading.Thread(target=lambda: woken.append(n.wait(seen + 1, 30))) for _ in range(3)]
    for w in waiters:
        w.start()
    time.sleep(0.05)
    n.notify()
    for w in waiters:
        w.join(30)
    assert woken == [seen + 2] * 3  # every waiter, not just one


def test_stored_instance_wakes_the_idle_worker(tmp_path: Path, model) -> None:
    """With a one-hour poll interval only the receiver's notification can get instances scored quickly."""
    from dicom_support import running_receiver, send_datasets
    from pacsbridge.store.notifier import StoreNotifier

    notifier = StoreNotifier()
    with running_receiver(tmp_path, fsync=False, notifier=notifier) as r:
        worker = InferenceWorker(r.sessions, model, r.spool.root, max_wait_ms=0, idle_poll_s=3600,
                                 notifier=notifier)
        worker.start()
        try:
            for i in range(3):
                assert send_datasets(r.port, [sample_file("RG1_UNCR.dcm")] if i == 0 else
                                     [_reuided(tmp_path, i)]) == [0]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and _count_predicted(r.sessions) < i + 1:
                    time.sleep(0.02)
                assert _count_predicted(r.sessions) == i + 1, f"instance {i} not scored: the worker slept on"
        finally:
            worker.stop()
    assert notifier.count >= 3
    assert worker.wakeups >= 1  # at least the later instances arrived while the worker was idle


def _reuided(tmp_path: Path, i: int) -> Path:
    from pipeline_support import reuid

    return reuid(sample_file("RG1_UNCR.dcm"), tmp_path / f"copy{i}.dcm")


def _count_predicted(sessions) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).where(Instance.state == "predicted")))


def test_daemon_gives_receiver_and_worker_one_notifier(tmp_path: Path, model) -> None:
    from pacsbridge.config import load_settings
    from pacsbridge.daemon import Daemon
    from pipeline_support import export_model

    settings = load_settings(None, data_dir=tmp_path, http_port=0, dicom_port=1,
                             model_path=export_model(tmp_path / "m"), worker_enabled=True)
    daemon = Daemon(settings)
    try:
        components = {c.name: c for c in daemon.build_components()}
    finally:
        daemon.engine.dispose()
    assert components["storage-scp"].notifier is daemon.notifier
    assert components["inference worker"]._notifier is daemon.notifier


def test_requeued_instance_whose_file_retention_deleted_fails_at_once_with_the_reason(db, tmp_path: Path, model) -> None:
    """A row put back to ``received`` after retention deleted its file is failed (no verdict on the image),
    saying why, and not retried: no retry can bring the file back."""
    from sqlalchemy import update

    from pacsbridge.worklist.retention import purge_spool

    spool = tmp_path / "spool"
    iid = add_instance(db, spool, sample_file("RG1_UNCR.dcm"), sop_uid="10.1", state="predicted",
                       received_at=utcnow() - timedelta(days=40))
    assert purge_spool(db, spool, 30) == 1
    with db.begin() as s:  # an admin re-queues it by hand
        s.execute(update(Instance).where(Instance.id == iid).values(state="received"))
    out = InferenceWorker(db, model, spool, max_wait_ms=0).drain()
    assert (out.predicted, out.not_analysed, out.failed) == (0, 0, 1)
    state, reason = _states(db)["10.1"]
    assert state == "failed" and "deleted by retention" in reason
    with db() as s:
        assert s.get(Instance, iid).next_attempt_at is None  # left failed at once
        event = s.scalars(select(Event).where(Event.kind == "analysis_failed")).one()
        assert (event.instance_id, event.level) == (iid, "error")
        assert "no retry left" in event.detail
