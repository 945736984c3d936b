"""DICOM forwarding against a real Orthanc (Debian's ``orthanc``, started here on free loopback ports
with a throw-away configuration and storage): SR, heatmap SC and the original images arrive in the
right study; an association rejected for our AE title is dead after one try and `outbox retry`
sends it once the configuration is fixed; and end to end through ``pacsbridge serve`` with
Orthanc stopped and restarted mid-way, every result arrives once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_support import free_port, wait_for_port
from forward_support import (ORTHANC, ORTHANC_MISSING, MllpListener, add_result, migrated_sessions,
                             running_orthanc, sr_items)
from pacsbridge.config import Destination
from pacsbridge.forward.forwarder import Forwarder
from pacsbridge.forward.senders import ForwardContext
from pacsbridge.store.models import OutboxEntry
from pipeline_support import export_model, reuid, sample_file, synthetic_chest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(ORTHANC is None, reason=ORTHANC_MISSING)


def _pacs(port: int, ae_title: str = "ORTHANC", objects=("sr",)) -> Destination:  # noqa: ANN001
    return Destination(name="pacs", kind="dicom", host="127.0.0.1", port=port, ae_title=ae_title,
                       objects=list(objects), timeout_s=20)


def test_sr_heatmap_and_images_arrive_in_the_source_study(tmp_path):
    from pacsbridge.model.artifact import load_model

    model = load_model(export_model(tmp_path / "model", threshold=0.5, name="heat-test-model"), "cpu")
    sources = [reuid(sample_file("RG1_J2KR.dcm"), tmp_path / "in" / "a.dcm"),  # JPEG 2000 lossless original
               reuid(sample_file("RG1_UNCR.dcm"), tmp_path / "in" / "b.dcm")]
    with running_orthanc(tmp_path) as orthanc:
        dest = _pacs(orthanc.dicom_port, objects=("sr", "heatmap", "images"))
        sessions = migrated_sessions(tmp_path)
        spool = tmp_path / "spool"
        for src in sources:
            add_result(sessions, spool, src, [dest], probability=0.8, model_id=model.model_id,
                       weights_sha256=model.weights_sha256)
        ctx = ForwardContext("PACSBRIDGE", spool, load_model=lambda: model)  # Grad-CAM of this model
        fwd = Forwarder(sessions, [dest], ctx)
        assert fwd.run_once() == {"sent": 6}, [(e.object, e.last_error) for e in sessions().query(OutboxEntry)]
        fwd.stop()

        stored = orthanc.instances()
        assert len(stored) == 6
        with sessions() as s:
            uids = {(e.prediction_id, e.object): e.object_uid for e in s.query(OutboxEntry)}
        for n, src in enumerate(sources, start=1):
            ds = dcmread(src)
            in_study = {i["sop"]: i for i in stored if i["study"] == ds.StudyInstanceUID}
            assert set(in_study) == {ds.SOPInstanceUID, uids[(n, "sr")], uids[(n, "heatmap")]}
            # the original, byte for byte (the spooled file's dataset, never re-encoded)
            original = in_study[ds.SOPInstanceUID]
            got = dcmread(__import__("io").BytesIO(orthanc.file(original["id"])))
            assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            assert hashlib.sha256(got.PixelData).digest() == hashlib.sha256(ds.PixelData).digest()
            # the SR: own series, finding, probability, model version, reference to the source
            sr_info = in_study[uids[(n, "sr")]]
            assert sr_info["modality"] == "SR" and sr_info["series"] not in (ds.SeriesInstanceUID, None)
            items = sr_items(orthanc.dataset(sr_info["id"]))
            assert ("CODE", "Pneumonia", ("52101004", "SCT")) in items
            assert ("NUM", "Probability", pytest.approx(0.8)) in items
            assert ("TEXT", "Algorithm Version", f"heat-test-model sha256:{model.weights_sha256[:16]}") in items
            assert ("IMAGE", "Source of Measurement", (ds.SOPClassUID, ds.SOPInstanceUID)) in items
            # the heatmap: RGB secondary capture in a third series, warning burned in
            sc = orthanc.dataset(in_study[uids[(n, "heatmap")]]["id"])
            assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
            px = sc.pixel_array.astype(int)
            body = px[px.shape[0] // 8:-px.shape[0] // 8]  # below the overlay's label, above the warning
            assert px.shape[0] >= 512 and np.abs(body[..., 0] - body[..., 2]).max() > 50, "no colour heatmap"
            assert sc.SeriesInstanceUID not in (ds.SeriesInstanceUID, sr_info["series"])

        # Sending the same results again (e.g. after a crash before the acks were recorded) de-duplicates.
        with sessions.begin() as s:
            for e in s.query(OutboxEntry):
                e.state = "pending"
        fwd = Forwarder(sessions, [dest], ctx)
        assert fwd.run_once() == {"sent": 6}
        fwd.stop()
        assert len(orthanc.instances()) == 6


def test_rejected_ae_title_is_dead_after_one_try_and_retry_sends_it(tmp_path):
    src = reuid(sample_file("RG1_UNCR.dcm"), tmp_path / "in" / "a.dcm")
    # Orthanc accepts only the AE titles it knows (DicomModalities) when nothing is "always allowed".
    with running_orthanc(tmp_path, DicomAlwaysAllowStore=False, DicomAlwaysAllowEcho=False,
                         DicomAlwaysAllowFind=False, DicomAlwaysAllowMove=False, DicomAlwaysAllowGet=False,
                         DicomCheckModalityHost=False,
                         DicomModalities={"pacsbridge": ["PACSBRIDGE", "127.0.0.1", 1]}) as orthanc:
        sessions = migrated_sessions(tmp_path)
        dest = _pacs(orthanc.dicom_port)
        add_result(sessions, tmp_path / "spool", src, [dest])
        wrong = Forwarder(sessions, [dest], ForwardContext("NOT_KNOWN", tmp_path / "spool"))
        assert wrong.run_once() == {"permanent": 1}
        wrong.stop()
        with sessions() as s:
            entry = s.query(OutboxEntry).one()
        assert (entry.state, entry.attempts) == ("dead", 1)
        assert "association rejected" in entry.last_error.lower(), entry.last_error
        assert orthanc.instances() == []

        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        env.update(PACSBRIDGE_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
        cli = [sys.executable, "-m", "pacsbridge"]
        listed = subprocess.run(cli + ["outbox", "list", "--json", "--state", "dead"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["id"], r["state"], r["sop_instance_uid"]) for r in rows] == [(entry.id, "dead", dcmread(src).SOPInstanceUID)]
        assert "association rejected" in rows[0]["last_error"].lower()
        # "fix the configuration" (our AE title is now the one Orthanc knows), then retry
        res = subprocess.run(cli + ["outbox", "retry", str(entry.id)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and "1 entry queued again" in res.stdout, res.stderr
        fixed = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", tmp_path / "spool"))
        assert fixed.run_once() == {"sent": 1}
        fixed.stop()
        assert [i["modality"] for i in orthanc.instances()] == ["SR"]
        status = subprocess.run(cli + ["status", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(status.stdout)["outbox"] == {"pending": 0, "sent": 1, "dead": 0}


class Serve:
    """``pacsbridge serve`` as a subprocess with a test model (threshold 0: every image is positive)."""

    def __init__(self, data_dir: Path, model: Path, destinations: list[dict]) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        self.env.update(
            PACSBRIDGE_DATA_DIR=str(data_dir), PACSBRIDGE_DICOM_PORT=str(self.port), PACSBRIDGE_HTTP_PORT="0",
            PACSBRIDGE_BIND_ADDRESS="127.0.0.1", PACSBRIDGE_MODEL_PATH=str(model), PACSBRIDGE_DEVICE="cpu",
            PACSBRIDGE_FSYNC="false", PACSBRIDGE_DESTINATIONS=json.dumps(destinations),
            PACSBRIDGE_OUTBOX_INTERVAL_S="0.5", PACSBRIDGE_OUTBOX_RETRY_INITIAL_S="0.5",
            PACSBRIDGE_OUTBOX_RETRY_MAX_S="2", PYTHONPATH=str(REPO),
        )
        self.log_path = data_dir / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pacsbridge", "serve"], env=self.env, cwd=REPO,
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 120, self.proc)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pacsbridge", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    def outbox(self) -> list[dict]:
        res = self.cli("outbox", "list", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _send(port: int, studies: list) -> None:
    from dicom_support import send_datasets

    assert send_datasets(port, studies) == [0] * len(studies)


def _wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def test_end_to_end_through_an_orthanc_outage(tmp_path):
    model = export_model(tmp_path / "model", threshold=0.0, name="fwd-test-model")
    first = [synthetic_chest(seed) for seed in range(3)]
    second = [synthetic_chest(seed) for seed in range(3, 7)]
    with running_orthanc(tmp_path / "orthanc") as orthanc, MllpListener([]) as ris:
        serve = Serve(tmp_path / "pb", model, [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": "ORTHANC",
             "objects": ["sr"], "timeout_s": 5},
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port, "receiving_application": "RIS"},
        ])
        try:
            _send(serve.port, first)
            _wait(lambda: len(orthanc.instances()) == 3, 90, "the first 3 SRs in Orthanc")

            orthanc.stop()
            _send(serve.port, second)
            # the outage is seen: the new results fail (transient) and wait, pending, while the RIS,
            # another destination, gets them at once
            _wait(lambda: sum(1 for r in serve.outbox() if r["state"] == "pending" and r["attempts"] >= 1) == 4,
                  90, "4 pending entries with a failed attempt")
            _wait(lambda: len(ris.received) == 7, 30, "7 ORU messages at the RIS")
            waiting = [r for r in serve.outbox() if r["state"] == "pending"]
            assert waiting and all("cannot connect" in r["last_error"] for r in waiting), waiting
            assert not [r for r in serve.outbox() if r["state"] == "dead"]
            orthanc.start()
            _wait(lambda: len(orthanc.instances()) == 7, 90, "all 7 SRs in Orthanc after the restart")
            rows = _wait(lambda: (lambda rs: rs if all(r["state"] == "sent" for r in rs) else None)(serve.outbox()),
                         30, "every entry sent")
            status = json.loads(serve.cli("status", "--json").stdout)
        finally:
            serve.stop()
        assert status["outbox"] == {"pending": 0, "sent": 14, "dead": 0}
        oru = [r for r in rows if r["destination"] == "ris"]
        rows = [r for r in rows if r["destination"] == "pacs"]
        assert sorted(r["object_uid"] for r in oru) == sorted(str(m.segment("MSH")[10]) for m in ris.received)
        assert all(r["attempts"] == 1 for r in oru)  # the PACS outage did not hold the RIS back
        assert sorted(str(m.segment("PID")[3]) for m in ris.received) == sorted(ds.PatientID for ds in first + second)
        assert len(rows) == 7 and len({r["sop_instance_uid"] for r in rows}) == 7  # one entry per result
        assert {r["object_uid"] for r in rows} == {i["sop"] for i in orthanc.instances()}  # each SR once
        by_sop = {i["sop"]: i for i in orthanc.instances()}
        model_sha = json.loads(model.with_suffix(".json").read_text())["weights_sha256"]
        for ds in first + second:
            row = next(r for r in rows if r["sop_instance_uid"] == ds.SOPInstanceUID)
            sr = by_sop[row["object_uid"]]
            assert sr["study"] == ds.StudyInstanceUID and sr["modality"] == "SR"
            items = sr_items(orthanc.dataset(sr["id"]))
            assert ("CODE", "Pneumonia", ("52101004", "SCT")) in items
            assert ("NUM", "Probability", pytest.approx(row["probability"], abs=1e-6)) in items
            assert ("TEXT", "Algorithm Version", f"fwd-test-model sha256:{model_sha[:16]}") in items
            assert ("IMAGE", "Source of Measurement", (ds.SOPClassUID, ds.SOPInstanceUID)) in items
        assert sum(r["attempts"] > 1 for r in rows) == 4  # the outage's results needed retries, the others not


def test_kill_9_while_forwarding_loses_nothing_and_resends_nothing_acknowledged(tmp_path):
    model = export_model(tmp_path / "model", threshold=0.0, name="fwd-test-model")
    studies = [synthetic_chest(seed) for seed in range(10, 22)]
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                 "ae_title": "ORTHANC", "max_per_association": 1}]
        serve = Serve(tmp_path / "pb", model, dest)
        try:
            _send(serve.port, studies)
            _wait(lambda: len(orthanc.instances()) >= 2, 90, "the first SRs in Orthanc")
            serve.proc.send_signal(signal.SIGKILL)
            serve.proc.wait(30)
        finally:
            serve.stop()
        before = {r["id"]: r for r in serve.outbox()}
        sent_before = {i for i, r in before.items() if r["state"] == "sent"}
        assert sent_before and len(sent_before) < len(studies), "killed too late to test anything"
        stored_before = len(orthanc.instances())

        again = Serve(tmp_path / "pb", model, dest)  # same data dir: the outbox carries on
        try:
            rows = _wait(lambda: (lambda rs: rs if len(rs) == len(studies) and all(r["state"] == "sent" for r in rs)
                                  else None)(again.outbox()), 120, "every result sent after the restart")
        finally:
            again.stop()
        assert {r["sop_instance_uid"] for r in rows} == {ds.SOPInstanceUID for ds in studies}  # nothing lost
        for i in sent_before:  # nothing acknowledged before the crash was sent again
            after = next(r for r in rows if r["id"] == i)
            assert (after["sent_at"], after["attempts"]) == (before[i]["sent_at"], before[i]["attempts"])
        assert stored_before <= len(sent_before) + 1  # at most the one in flight was stored unacknowledged
        assert len(orthanc.instances()) == len(studies)  # each SR once (a repeat keeps its UID)
