"""The instance queue (pacsbridge.store.queue): `failed` for faults of the system, retried with backoff;
`not_analysed` for what the image is, never retried.  Real worker, real model, real files: the faults
are caused for real (the spool file moved away and back, the model's weights broken and restored,
the address space limited), on SQLite and on the real PostgreSQL for the queue functions."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from sqlalchemy import func, select

from dicom_support import database_url_for
from pacsbridge.inference.faults import system_fault
from pacsbridge.inference.metrics import PipelineMetrics
from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.model.artifact import load_model
from pacsbridge.store import queue
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Base, Event, Instance, InstanceState, Prediction, as_utc, utcnow
from pacsbridge.store.queue import RetryPolicy
from pipeline_support import add_instance, export_model, sample_file, sqlite_sessions

CHEST = "RG1_UNCR.dcm"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_model(tmp_path_factory.mktemp("model"), threshold=0.5)


@pytest.fixture
def model(model_path):
    # A fresh copy per test: some tests break its weights on purpose.
    return load_model(model_path, "cpu")


@pytest.fixture
def db(tmp_path: Path):
    return sqlite_sessions(tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path) -> Iterator:
    for url in database_url_for(request.param, tmp_path / "queue.db"):
        engine = make_engine(url, pool_size=8) if url.startswith("postgresql") else make_engine(url)
        Base.metadata.create_all(engine)
        try:
            yield make_sessionmaker(engine)
        finally:
            engine.dispose()


def _row(db, iid: int) -> Instance:
    with db() as s:
        inst = s.get(Instance, iid)
        s.expunge(inst)
        return inst


def _events(db, iid: int, kind: str) -> list[str]:
    with db() as s:
        return list(s.scalars(select(Event.detail).where(Event.instance_id == iid, Event.kind == kind)
                              .order_by(Event.id)))


def _hide(spool: Path, db, iid: int, away: Path) -> tuple[Path, Path]:
    """Move the instance's spool file out of the spool (a file system hiccup); returns (where, from)."""
    src = spool / _row(db, iid).file_path
    away.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, away)
    return away, src


# ----------------------------------------------------------------------------- faults of the system

def test_missing_spool_file_fails_waits_its_backoff_and_ends_predicted_once_restored(db, tmp_path, model) -> None:
    spool = tmp_path / "spool"
    iid = add_instance(db, spool, sample_file(CHEST), sop_uid="1.1")
    away, back = _hide(spool, db, iid, tmp_path / "away.dcm")
    worker = InferenceWorker(db, model, spool, max_wait_ms=0, retry_policy=RetryPolicy(3, base_s=0.6))
    t0 = utcnow()
    out = worker.drain()
    assert (out.predicted, out.not_analysed, out.failed) == (0, 0, 1)
    row = _row(db, iid)
    assert (row.state, row.state_reason, row.attempts) == ("failed", "the stored file is missing from the spool", 1)
    assert row.last_error == row.state_reason
    wait = as_utc(row.next_attempt_at) - t0
    assert timedelta(seconds=0.5) < wait < timedelta(seconds=5)
    assert worker.drain().processed == 0  # not due yet: the backoff holds
    shutil.move(away, back)  # the fault goes away
    time.sleep(0.7)
    out = worker.drain()
    assert (out.predicted, out.failed) == (1, 0)
    row = _row(db, iid)
    assert (row.state, row.state_reason, row.attempts, row.next_attempt_at) == ("predicted", None, 1, None)
    assert row.last_error == "the stored file is missing from the spool"  # history kept
    [detail] = _events(db, iid, "analysis_failed")
    assert detail.startswith("attempt 1 of 3: the stored file is missing from the spool; retry at ")
    with db() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 1


def test_retries_stop_at_max_attempts_with_the_reason_and_an_operator_retry_starts_again(db, tmp_path, model) -> None:
    spool = tmp_path / "spool"
    iid = add_instance(db, spool, sample_file(CHEST), sop_uid="2.1")
    away, back = _hide(spool, db, iid, tmp_path / "away.dcm")
    worker = InferenceWorker(db, model, spool, max_wait_ms=0, retry_policy=RetryPolicy(3, base_s=0.0))
    out = worker.drain()
    assert out.failed == 3  # three attempts, each due at once with a zero base delay
    row = _row(db, iid)
    assert (row.state, row.attempts, row.next_attempt_at) == ("failed", 3, None)
    assert row.state_reason == "the stored file is missing from the spool"
    details = _events(db, iid, "analysis_failed")
    assert [d.split(":")[0] for d in details] == ["attempt 1 of 3", "attempt 2 of 3", "attempt 3 of 3"]
    assert "no retry left" in details[-1] and "retry at" in details[0]
    assert worker.drain().processed == 0  # left failed
    with db() as s:
        assert queue.state_counts(s)["failed"] == 1 and queue.state_counts(s)["retry_waiting"] == 0
    shutil.move(away, back)
    assert queue.retry(db, [iid], actor="alice") == [iid]
    row = _row(db, iid)
    assert (row.state, row.attempts, row.next_attempt_at) == ("received", 0, None)
    assert worker.drain().predicted == 1
    with db() as s:
        ev = s.scalars(select(Event).where(Event.kind == "instance_retry")).one()
        assert (ev.instance_id, ev.actor) == (iid, "alice")


def test_model_crash_and_non_finite_score_fail_and_are_retried_once_the_model_is_whole(db, tmp_path, model) -> None:
    spool = tmp_path / "spool"
    ids = [add_instance(db, spool, sample_file(CHEST), sop_uid=f"3.{i}", study_uid=f"4.{i}") for i in range(2)]
    last = model.module.head[-1]
    weight, bias = last.weight.data.clone(), last.bias.data.clone()
    worker = InferenceWorker(db, model, spool, max_wait_ms=0, retry_policy=RetryPolicy(5, base_s=1.0))

    last.weight.data = torch.zeros(1, 3)  # a broken model: every forward pass raises
    out = worker.run_once(wait=False)
    assert (out.predicted, out.failed) == (0, 2)
    for iid in ids:
        row = _row(db, iid)
        assert row.state == "failed" and row.state_reason.startswith("the model failed on this image (RuntimeError")

    last.weight.data = weight
    last.bias.data = torch.full_like(bias, float("nan"))  # a model that answers NaN
    time.sleep(1.1)  # both due again (1 s after the first failure); retries are scored one at a time
    outs = [worker.run_once(wait=False) for _ in ids]
    assert [(o.predicted, o.failed) for o in outs] == [(0, 1), (0, 1)]
    assert {(_row(db, i).state, _row(db, i).state_reason, _row(db, i).attempts) for i in ids} == {
        ("failed", "the model produced a non-finite score", 2)}

    last.bias.data = bias  # restored
    time.sleep(2.1)  # the third attempt is due 2 s after the second
    out = worker.drain()
    assert (out.predicted, out.failed, out.not_analysed) == (2, 0, 0)
    assert {_row(db, i).state for i in ids} == {"predicted"}


def test_memory_error_and_os_errors_are_faults_corrupt_data_is_the_images(tmp_path) -> None:
    """The classification the worker and `predict` share, on exceptions the imaging layer really raises."""
    from pacsbridge.imaging import NotAnalysable, load_for_model, read_dataset

    data = sample_file(CHEST).read_bytes()
    ct = sample_file("CT_small.dcm").read_bytes()
    in_header = ct.find(bytes([0xE0, 0x7F, 0x10, 0x00])) + 8  # inside the Pixel Data element's header
    for n, cut_data in enumerate((data[:600], data[:4000], data[:100000], ct[:in_header])):
        cut = tmp_path / f"cut{n}.dcm"
        cut.write_bytes(cut_data)  # no pixel data, short pixel data, an unreadable element header
        with pytest.raises(NotAnalysable) as corrupt:
            load_for_model(cut)
        assert system_fault(corrupt.value) is None, corrupt.value.reason
    with pytest.raises(NotAnalysable) as not_dir:
        read_dataset(tmp_path / "cut0.dcm" / "x")  # ENOTDIR from the system call
    assert isinstance(system_fault(not_dir.value), NotADirectoryError)
    # A real MemoryError inside the decoder, under a limited address space in a child process.
    script = textwrap.dedent(f"""
        import resource, numpy as np, pydicom
        from pydicom.uid import ExplicitVRLittleEndian
        from pacsbridge.imaging import NotAnalysable, load_for_model
        from pacsbridge.inference.faults import system_fault
        ds = pydicom.dcmread({str(sample_file(CHEST))!r})
        ds.Rows = ds.Columns = 8192
        ds.PixelData = np.random.default_rng(0).integers(0, 4095, (8192, 8192), dtype=np.uint16).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 160 * 2**20, hard))
        try:
            load_for_model(ds, full_resolution=True, max_decoded_bytes=2**30)
            print('decoded')
        except NotAnalysable as exc:
            print(type(system_fault(exc)).__name__, exc.reason)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("MemoryError "), (res.stdout, res.stderr[-2000:])


# ----------------------------------------------------------------------------- properties of the image

def test_image_refusals_stay_not_analysed_and_are_never_retried(db, tmp_path, model) -> None:
    spool = tmp_path / "spool"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(sample_file(CHEST).read_bytes()[:4000])
    ids = {
        "not chest": add_instance(db, spool, sample_file("RG3_UNCR.dcm"), sop_uid="5.1", study_uid="6.1"),
        "ct": add_instance(db, spool, sample_file("CT_small.dcm"), sop_uid="5.2", study_uid="6.2"),
        "truncated": add_instance(db, spool, cut, sop_uid="5.3", study_uid="6.3"),
    }
    worker = InferenceWorker(db, model, spool, max_wait_ms=0, retry_policy=RetryPolicy(3, base_s=0.0))
    out = worker.drain()
    assert (out.not_analysed, out.failed, out.predicted) == (3, 0, 0)
    assert worker.drain().processed == 0
    for iid in ids.values():
        row = _row(db, iid)
        assert (row.state, row.attempts, row.next_attempt_at, row.last_error) == ("not_analysed", 0, None, None)
        assert len(_events(db, iid, "not_analysed")) == 1 and _events(db, iid, "analysis_failed") == []
        with pytest.raises(queue.NotRetryable, match="not_analysed, not failed"):
            queue.retry(db, [iid])
    with pytest.raises(queue.InstanceNotFound):
        queue.retry(db, [999])


# ----------------------------------------------------------------------------- the queue on both databases

def test_claims_take_received_and_due_failed_rows_never_future_ones(any_db, tmp_path) -> None:
    now = utcnow()
    ids = [add_instance(any_db, tmp_path, None, sop_uid=f"7.{i}", received_at=now - timedelta(minutes=10 - i))
           for i in range(4)]
    policy = RetryPolicy(3, base_s=60)
    # 7.0 and 7.1 fail once; 7.0 is made due, 7.1 waits a minute.
    got = queue.claim(any_db, "h:1", 2, now)
    assert [c.id for c in got] == ids[:2]
    with any_db.begin() as s:
        for c in got:
            assert queue.mark_failed(s, c, "h:1", "disk hiccup", policy, now) == now + timedelta(seconds=60)
        assert queue.mark_failed(s, got[0], "h:1", "again", policy, now) is False  # no longer claimed
    later = now + timedelta(seconds=61)
    with any_db.begin() as s:
        s.get(Instance, ids[1]).next_attempt_at = now + timedelta(hours=1)
    got = queue.claim(any_db, "h:2", 10, later)
    assert [c.id for c in got] == [ids[0]]  # a retry is scored alone
    got += queue.claim(any_db, "h:2", 10, later)
    assert [c.id for c in got] == [ids[0], ids[2], ids[3]]
    assert got[0].attempts == 1 and got[1].attempts == 0
    with any_db() as s:
        assert s.get(Instance, ids[1]).state == "failed"
        counts = queue.state_counts(s)
    assert counts["pending"] == 3  # the three just claimed
    assert (counts["failed"], counts["retry_waiting"], counts["received"]) == (1, 1, 4)
    with any_db.begin() as s:
        assert queue.mark_predicted(s, got[0], "h:2", later)
        assert queue.mark_not_analysed(s, got[1], "h:2", "not a chest", "info", later)
        assert queue.mark_failed(s, got[2], "h:2", "gone", policy, later, retry=False) is None
    assert queue.retry(any_db, all_failed=True) == [ids[1], ids[3]]
    with any_db() as s:
        assert {i.id: i.state for i in s.scalars(select(Instance))} == {
            ids[0]: "predicted", ids[1]: "received", ids[2]: "not_analysed", ids[3]: "received"}


def test_concurrent_claims_of_due_failed_rows_are_disjoint(any_db, tmp_path) -> None:
    now = utcnow()
    n = 40
    for i in range(n):
        add_instance(any_db, tmp_path, None, sop_uid=f"8.{i}",
                     state=InstanceState.FAILED.value if i % 2 else InstanceState.RECEIVED.value)
    with any_db.begin() as s:
        for inst in s.scalars(select(Instance).where(Instance.state == "failed")):
            inst.attempts, inst.next_attempt_at = 1, now - timedelta(seconds=1)
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def run(wid: str) -> None:
        barrier.wait()
        mine: list[int] = []
        while batch := queue.claim(any_db, wid, 3):
            mine += [c.id for c in batch]
        got[wid] = mine

    threads = [threading.Thread(target=run, args=(f"h:{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [i for ids in got.values() for i in ids]
    assert len(claimed) == n and len(set(claimed)) == n


def test_a_lost_claim_counts_as_an_attempt_so_an_image_that_kills_workers_cannot_stall_the_queue(any_db, tmp_path) -> None:
    """A claim lost with its worker (SIGKILL, a decoder that crashes the process) is a failed attempt:
    due again at once while attempts are left, claimed alone (its batch-mates are not charged again),
    and left ``failed`` when none are left."""
    old = utcnow() - timedelta(hours=2)
    iid = add_instance(any_db, tmp_path, None, sop_uid="9.1", state="processing", claimed_by="gone-host:1",
                       claimed_at=old, received_at=old)
    mate = add_instance(any_db, tmp_path, None, sop_uid="9.2", state="processing", claimed_by="gone-host:1",
                        claimed_at=old, received_at=old + timedelta(seconds=1))
    fresh = add_instance(any_db, tmp_path, None, sop_uid="9.3", received_at=old + timedelta(seconds=2))
    policy = RetryPolicy(3, base_s=60)
    assert queue.recover_stale_claims(any_db, "here:5", timedelta(minutes=10), policy=policy) == 2
    row = _row(any_db, iid)
    assert (row.state, row.attempts, row.claimed_by) == ("failed", 1, None)
    assert row.next_attempt_at is not None and "stopped" in row.last_error
    [c] = queue.claim(any_db, "here:6", 5)  # alone, although three are due
    assert (c.id, c.attempts) == (iid, 1)
    with any_db.begin() as s:
        inst = s.get(Instance, iid)
        inst.claimed_at = inst.lease_until = old  # its second worker dies too  (its lease ran out)
    assert queue.recover_stale_claims(any_db, "here:5", timedelta(minutes=10), policy=policy) == 1
    [c] = queue.claim(any_db, "here:7", 5)
    assert (c.id, c.attempts) == (iid, 2)
    with any_db.begin() as s:
        inst = s.get(Instance, iid)
        inst.claimed_at = inst.lease_until = old  # and a third: no attempt left  (its lease ran out)
    assert queue.recover_stale_claims(any_db, "here:5", timedelta(minutes=10), policy=policy) == 1
    row = _row(any_db, iid)
    assert (row.state, row.attempts, row.next_attempt_at) == ("failed", 3, None)
    [c] = queue.claim(any_db, "here:8", 5)  # the batch-mate, charged once, alone
    assert (c.id, c.attempts) == (mate, 1)
    assert [c.id for c in queue.claim(any_db, "here:8", 5)] == [fresh]
    with any_db() as s:
        events = [e.detail for e in s.scalars(select(Event).where(Event.instance_id == iid,
                                                                Event.kind == "claim_released"))]
    assert len(events) == 3 and "no retry left" in events[-1]


def test_metrics_show_failed_instances_and_failed_attempts(db, tmp_path, model) -> None:
    spool = tmp_path / "spool"
    iid = add_instance(db, spool, sample_file(CHEST), sop_uid="10.1")
    _hide(spool, db, iid, tmp_path / "away.dcm")
    InferenceWorker(db, model, spool, max_wait_ms=0, retry_policy=RetryPolicy(2, base_s=0.0)).drain()
    text = generate_latest(PipelineMetrics(db).registry).decode()
    assert "pacsbridge_instances_failed 1.0" in text
    assert "pacsbridge_instances_retry_waiting 0.0" in text
    assert "pacsbridge_instance_failed_attempts_total 2.0" in text


# ----------------------------------------------------------------------------- predict (no database)

def test_predict_marks_faults_failed_and_refusals_only_skipped(tmp_path, model) -> None:
    from pacsbridge.inference.files import score_files

    gone = tmp_path / "gone.dcm"
    gone.symlink_to(tmp_path / "nowhere.dcm")
    files = [sample_file(CHEST), sample_file("RG3_UNCR.dcm"), gone]
    rows = list(score_files(files, model))
    assert "probability" in rows[0] and "failed" not in rows[0]
    assert rows[1]["skipped"] and "failed" not in rows[1]
    assert rows[2]["skipped"] and rows[2]["failed"] is True and "cannot read the file" in rows[2]["reason"]
    model.module.head[-1].bias.data.fill_(float("nan"))
    [row] = score_files(files[:1], model)
    assert row == {"path": str(files[0]), "skipped": True, "reason": "the model produced a non-finite score",
                   "failed": True, "sop_instance_uid": row["sop_instance_uid"], "state": "failed",
                   "reasons": [{"code": "non_finite", "text": "the model produced a non-finite score"}]}
