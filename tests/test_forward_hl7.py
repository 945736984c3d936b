"""HL7 forwarding against a local MLLP listener written with python-hl7 (asyncio MLLP streams):
the ORU's segments and fields, AA sent, AE retried, AR dead-lettered, a silent listener timed out
and retried, a closed port retried."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_support import free_port
from forward_support import MllpListener, add_result, migrated_sessions
from pacsbridge.config import Destination
from pacsbridge.forward import outbox
from pacsbridge.forward.forwarder import Forwarder
from pacsbridge.forward.outbox import RetryPolicy
from pacsbridge.forward.senders import ForwardContext
from pacsbridge.store.models import Event, OutboxEntry, as_utc, utcnow
from pipeline_support import sample_file


def _ris(port: int, **kw) -> Destination:  # noqa: ANN003
    return Destination(name="ris", kind="hl7", host="127.0.0.1", port=port, receiving_application="RIS",
                       receiving_facility="HOSP", timeout_s=kw.pop("timeout_s", 5), **kw)


def _setup(tmp_path: Path, dest: Destination, n: int = 1, probability: float = 0.9):
    sessions = migrated_sessions(tmp_path)
    spool = tmp_path / "spool"
    src = sample_file("RG1_UNCR.dcm")
    ids = []
    for i in range(n):
        path = tmp_path / f"src{i}.dcm"
        ds = dcmread(src)
        ds.SOPInstanceUID = f"1.2.3.4.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"ACC{i + 1}"
        ds.save_as(path)
        ids.append(add_result(sessions, spool, path, [dest], probability=probability))
    fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", spool),
                    policy=RetryPolicy(initial_s=60, max_s=120, max_age=timedelta(hours=1)))
    return sessions, fwd


def _entries(sessions) -> list[OutboxEntry]:  # noqa: ANN001
    with sessions() as s:
        return s.query(OutboxEntry).order_by(OutboxEntry.id).all()


def test_oru_sent_and_acknowledged(tmp_path):
    with MllpListener(["AA", "AA"]) as ris:
        sessions, fwd = _setup(tmp_path, _ris(ris.port), n=2)
        assert fwd.run_once() == {"sent": 2}
        fwd.stop()
    rows = _entries(sessions)
    assert [(r.object, r.state, r.attempts) for r in rows] == [("oru", "sent", 1)] * 2
    assert [str(m.segment("OBR")[3]) for m in ris.received] == ["ACC1", "ACC2"]
    m = ris.received[0]
    assert [str(seg[0]) for seg in m] == ["MSH", "PID", "PV1", "OBR"] + ["OBX"] * 8
    assert str(m.segment("MSH")[5]) == "RIS" and str(m.segment("MSH")[6]) == "HOSP"
    assert str(m.segment("MSH")[10]) == rows[0].object_uid
    assert str(m.segment("PID")[3]) == "9RG1" and str(m.segment("PID")[5]) == "CompressedSamples^RG1"
    obx = {str(s[3][0][0]): str(s[5]) for s in m.segments("OBX")}
    assert obx["233604007"] == "52101004^Present^SCT" and float(obx["122157"]) == pytest.approx(0.9)
    assert obx["AIPRIORITY"] == "URGENT" and obx["111003"] == "test-model sha256:abababababababab"
    assert obx["111002"] == "calibration=model"  # the predictions row's calibration (the card's own here)
    with sessions() as s:
        assert outbox.state_counts(s) == {"pending": 0, "sent": 2, "dead": 0}


def test_ae_is_retried_with_backoff_then_sent(tmp_path):
    with MllpListener(["AE", "AA"]) as ris:
        sessions, fwd = _setup(tmp_path, _ris(ris.port))
        assert fwd.run_once() == {"transient": 1}
        row = _entries(sessions)[0]
        assert row.state == "pending" and row.attempts == 1 and "ACK AE" in row.last_error
        wait = (as_utc(row.next_attempt_at) - utcnow()).total_seconds()
        assert 25 <= wait <= 60, wait  # 60 s with 50-100 % jitter
        assert fwd.run_once() == {}  # not due yet
        assert fwd.run_once(now=utcnow() + timedelta(seconds=61)) == {"sent": 1}
        fwd.stop()
    row = _entries(sessions)[0]
    assert (row.state, row.attempts, row.last_error) == ("sent", 2, None)
    assert len(ris.received) == 2
    assert str(ris.received[0].segment("MSH")[10]) == str(ris.received[1].segment("MSH")[10])  # same id


def test_ar_is_dead_after_one_try_and_retry_requeues(tmp_path):
    with MllpListener(["AR", "AA"]) as ris:
        sessions, fwd = _setup(tmp_path, _ris(ris.port))
        assert fwd.run_once() == {"permanent": 1}
        row = _entries(sessions)[0]
        assert (row.state, row.attempts) == ("dead", 1) and "ACK AR" in row.last_error
        assert fwd.run_once(now=utcnow() + timedelta(days=1)) == {}  # dead stays dead
        with sessions() as s:
            assert [e.kind for e in s.query(Event).filter(Event.kind == "outbox_dead")] == ["outbox_dead"]
        assert outbox.retry(sessions, [row.id]) == [row.id]
        assert fwd.run_once() == {"sent": 1}
        fwd.stop()
    assert _entries(sessions)[0].state == "sent" and len(ris.received) == 2


def test_silent_listener_times_out_and_is_retried(tmp_path):
    with MllpListener(["silent", "AA"]) as ris:
        sessions, fwd = _setup(tmp_path, _ris(ris.port, timeout_s=1))
        assert fwd.run_once() == {"transient": 1}
        row = _entries(sessions)[0]
        assert row.state == "pending" and "no ACK within 1 s" in row.last_error
        assert fwd.run_once(now=utcnow() + timedelta(seconds=61)) == {"sent": 1}
        fwd.stop()


def test_closed_port_is_retried_and_max_age_makes_it_dead(tmp_path):
    dest = _ris(free_port())
    sessions, fwd = _setup(tmp_path, dest)
    assert fwd.run_once() == {"transient": 1}
    row = _entries(sessions)[0]
    assert row.state == "pending" and "cannot connect" in row.last_error
    with sessions.begin() as s:  # pretend it has been failing for longer than the max age
        s.get(OutboxEntry, row.id).queued_at = utcnow() - timedelta(hours=2)
    assert fwd.run_once(now=utcnow() + timedelta(minutes=5)) == {"transient": 1}
    row = _entries(sessions)[0]
    assert row.state == "dead" and row.last_error.startswith("gave up after 2 attempts")
    fwd.stop()


def test_negatives_only_for_send_all(tmp_path):
    sessions = migrated_sessions(tmp_path)
    positives = _ris(1)
    everything = Destination(name="ris-all", kind="hl7", host="127.0.0.1", port=1, send="all")
    add_result(sessions, tmp_path / "spool", sample_file("RG1_UNCR.dcm"), [positives, everything], probability=0.2)
    assert [(e.destination, e.object) for e in _entries(sessions)] == [("ris-all", "oru")]
