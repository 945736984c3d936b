"""The one scoring path (pacsbridge.scoring): every cause of a refusal or a fault classified, every
refusal reason kept, one crashing image isolated, and `predict --json` == the daemon on the same files.

Real images only: pydicom-data's radiographs (RG1 adult chest, RG3 adult extremity), CT, colour
secondary capture; variants made from them where a cause needs one (an age, a lateral view...).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from dicom_support import daemon_env, free_port, pacsbridge_cmd, wait_for_port
from image_variants import blank, text_file, truncated, variant
from pipeline_support import (
    SHIPPED_MODEL,
    add_instance,
    export_model,
    reuid,
    sample_file,
    sqlite_sessions,
)
from sqlalchemy import select

from pacsbridge.imaging import NotAnalysable, load_for_model
from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.model.artifact import load_model
from pacsbridge.model.preprocess import preprocess
from pacsbridge.scoring import FAILED, NOT_ANALYSED, PREDICTED, Scorer
from pacsbridge.store.models import Instance, utcnow
from pacsbridge.store.reasons import reasons_from_row

KIDS = {"age_years": {"min": 1, "max_exclusive": 6, "label": "1-5 y"}}


def _model_with_age_range(out: Path):
    """The small test model, its card saying 1-5 years (so the age gate applies); no OOD statistics."""
    pt = export_model(out)
    card = json.loads(pt.with_suffix(".json").read_text())
    card["intended_use"] = KIDS
    pt.with_suffix(".json").write_text(json.dumps(card))
    return pt


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return _model_with_age_range(tmp_path_factory.mktemp("model"))


@pytest.fixture()
def model(model_path):
    return load_model(model_path, "cpu")






def _fifo(tmp: Path) -> Path:
    path = tmp / "fifo"
    os.mkfifo(path)
    return path


def _dangling(tmp: Path) -> Path:
    path = tmp / "gone.dcm"
    path.symlink_to(tmp / "nowhere.dcm")
    return path


# One row per cause: how the input is made, the outcome's state, the codes of its reasons.
REFUSALS = [
    ("adult age", lambda t: variant(t, "adult", PatientBirthDate="19400305"), ["age"]),
    ("not a chest", lambda t: variant(t, "hand", BodyPartExamined="HAND"), ["body_part"]),
    ("lateral view", lambda t: variant(t, "lat", ViewPosition="LL"), ["view"]),
    ("not a radiograph", lambda t: variant(t, "ct", Modality="CT"), ["modality"]),
    ("small colour picture aged 24", lambda t: Path(sample_file("SC_rgb.dcm")), ["too_small", "age"]),
    ("CT slice aged 0", lambda t: Path(sample_file("CT_small.dcm")), ["modality", "age"]),
    ("no pixel data", lambda t: variant(t, "nopixels", PixelData=None), ["pixel_data"]),
    ("blank image", blank, ["blank"]),
    ("not DICOM", text_file, ["not_dicom"]),
    ("truncated (and aged 64)", truncated, ["age", "decode"]),
    ("not a regular file", _fifo, ["not_regular_file"]),
]


@pytest.mark.parametrize("name, make, codes", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_refusal_is_not_analysed_with_its_reasons(tmp_path, model, name, make, codes) -> None:
    [out] = Scorer(model).score([make(tmp_path)])
    assert (out.state, [r.code for r in out.reasons]) == (NOT_ANALYSED, codes), out.reasons
    assert out.probability is None and not out.fault
    assert out.reason == "; ".join(r.text for r in out.reasons)


def test_too_large_is_refused_before_decoding(tmp_path, model) -> None:
    [out] = Scorer(model, max_decoded_bytes=1_000_000).score([variant(tmp_path, "big")])
    assert (out.state, [r.code for r in out.reasons]) == (NOT_ANALYSED, ["too_large"])
    assert out.inference_ms is None  # never reached the model


def _reader_raising(exc: BaseException):
    def read(source):
        raise exc
    return read


def _chained_os_error() -> NotAnalysable:
    try:
        raise OSError(errno.EIO, "Input/output error")
    except OSError:
        try:
            raise NotAnalysable("DICOM file could not be parsed: OSError")
        except NotAnalysable as na:
            return na


FAULTS = [
    ("file cannot be opened", _dangling, None, "read_error", "cannot read the file"),
    ("I/O error under the reader", None, _chained_os_error(), "read_error", "could not decode the image (OSError"),
    ("out of memory in the reader", None, MemoryError(), "memory", "could not decode the image (MemoryError"),
    ("reader bug", None, RuntimeError("decoder bug"), "decoder_error", "could not decode the image (RuntimeError"),
]


@pytest.mark.parametrize("name, make, exc, code, text", FAULTS, ids=[r[0] for r in FAULTS])
def test_each_fault_of_the_system_is_failed(tmp_path, model, name, make, exc, code, text) -> None:
    source = make(tmp_path) if make else Path(sample_file("RG1_UNCR.dcm"))
    scorer = Scorer(model, read=_reader_raising(exc)) if exc is not None else Scorer(model)
    [out] = scorer.score([source])
    assert (out.state, [r.code for r in out.reasons]) == (FAILED, [code]) and out.retry
    assert out.reason.startswith(text), out.reason


class _CrashOn(torch.nn.Module):
    """The real model, except that it raises on a batch holding one given input."""

    def __init__(self, inner: torch.nn.Module, bad: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.bad = inner, bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(row, self.bad) for row in x):
            raise RuntimeError("model crash on this image")
        return self.inner(x)


def test_a_crashing_image_fails_alone_and_the_batch_is_scored(tmp_path, model) -> None:
    good = [variant(tmp_path, f"good{i}", ViewPosition=v) for i, v in enumerate(("PA", "AP"))]
    bad = variant(tmp_path, "bad", WindowWidth=600, WindowCenter=1500)
    bad_input = preprocess(load_for_model(bad).image, model.input_size)
    crashing = dataclasses.replace(model, module=_CrashOn(model.module, bad_input))
    outs = Scorer(crashing).score([good[0], bad, good[1]])
    assert [o.state for o in outs] == [PREDICTED, FAILED, PREDICTED]
    assert outs[1].reasons[0].code == "model_error" and "model crash on this image" in outs[1].reason
    alone = Scorer(model).score(good)
    assert [o.probability for o in (outs[0], outs[2])] == [o.probability for o in alone]


def test_non_finite_score_is_a_fault(tmp_path, model) -> None:
    model.module.head[-1].bias.data.fill_(float("nan"))
    [out] = Scorer(model).score([variant(tmp_path, "chest")])
    assert (out.state, out.reasons[0].code, out.reason) == (FAILED, "non_finite", "the model produced a non-finite score")


def test_spool_faults_are_failed_in_the_worker(tmp_path, model) -> None:
    db = sqlite_sessions(tmp_path)
    spool = tmp_path / "spool"
    missing = add_instance(db, spool, None, sop_uid="7.1")
    deleted = add_instance(db, spool, variant(tmp_path, "chest"), sop_uid="7.2", study_uid="7.9")
    with db.begin() as s:
        s.get(Instance, deleted).spool_deleted_at = utcnow()
    out = InferenceWorker(db, model, spool, max_wait_ms=0).drain()
    assert (out.failed, out.predicted, out.not_analysed) == (2, 0, 0)
    with db() as s:
        rows = {i.id: i for i in s.scalars(select(Instance))}
        assert rows[missing].state_reason == "the stored file is missing from the spool"
        assert rows[missing].next_attempt_at is not None  # retried
        assert rows[deleted].state_reason.startswith("the stored file was deleted by retention")
        assert rows[deleted].next_attempt_at is None  # no retry can bring the file back


def test_an_adult_extremity_reports_its_age_and_that_it_is_not_a_chest(tmp_path, model) -> None:
    [out] = Scorer(model).score([Path(sample_file("RG3_UNCR.dcm"))])
    assert [r.code for r in out.reasons] == ["body_part", "age"]
    assert "body part EXTREMITY is not chest" in out.reason and "patient age 25 y" in out.reason
    assert out.inference_ms is not None  # it decoded, so the OOD gate could run too


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="shipped model missing")
def test_with_the_shipped_model_the_out_of_distribution_reason_is_added(tmp_path) -> None:
    shipped = load_model(SHIPPED_MODEL, "cpu")
    [out] = Scorer(shipped).score([Path(sample_file("RG3_UNCR.dcm"))])
    assert [r.code for r in out.reasons] == ["body_part", "age", "ood"] and out.ood_score > shipped.ood.threshold


def test_stored_reasons_are_used_only_while_they_match_the_text() -> None:
    stored = json.dumps([{"code": "body_part", "text": "a"}, {"code": "age", "text": "b"}])
    assert [r["code"] for r in reasons_from_row("a; b", stored)] == ["body_part", "age"]
    assert reasons_from_row("the worker scoring this image stopped (gone)", stored) == [
        {"code": "other", "text": "the worker scoring this image stopped (gone)"}]
    assert reasons_from_row(None, stored) == []


# ----------------------------------------------------------------------------- predict == daemon

def _parity_files(tmp: Path) -> list[Path]:
    kid = variant(tmp, "kid")
    return [reuid(kid, tmp / "in" / "kid.dcm"),
            reuid(variant(tmp, "kid_ap", ViewPosition="AP", WindowWidth=900), tmp / "in" / "kid_ap.dcm"),
            reuid(variant(tmp, "adult", PatientBirthDate="19400305"), tmp / "in" / "adult.dcm"),
            reuid(Path(sample_file("RG3_UNCR.dcm")), tmp / "in" / "hand.dcm"),
            reuid(variant(tmp, "lateral", ViewPosition="LL"), tmp / "in" / "lateral.dcm")]


def _wait(condition, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_predict_and_the_daemon_give_the_same_rows(tmp_path, model_path) -> None:
    files = _parity_files(tmp_path)
    port = free_port()
    env = daemon_env(tmp_path / "data", port, PACSBRIDGE_FSYNC="false", PACSBRIDGE_MODEL_PATH=str(model_path),
                     PACSBRIDGE_WORKER_ENABLED="true")
    r = subprocess.run(pacsbridge_cmd("predict", "--json", str(tmp_path / "in")), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    by_uid = {row["sop_instance_uid"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert len(by_uid) == len(files)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 120, proc)
        sent = subprocess.run(["storescu", "-aec", "PACSBRIDGE", "127.0.0.1", str(port), *map(str, files)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr

        def listed() -> list[dict]:
            res = subprocess.run(pacsbridge_cmd("instances", "--json"), env=env, capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stderr
            return json.loads(res.stdout)

        rows: list[dict] = []

        def settled() -> bool:
            rows[:] = listed()
            return len(rows) == len(files) and all(x["state"] in (PREDICTED, NOT_ANALYSED, FAILED) for x in rows)

        _wait(settled, 180, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    daemon = {x["sop_instance_uid"]: x for x in rows}
    assert set(daemon) == set(by_uid)
    for uid, p in by_uid.items():
        d = daemon[uid]
        assert (d["state"], d["reasons"], d["reason"]) == (p["state"], p["reasons"], p.get("reason")), (p["path"], d, p)
        if p["state"] == PREDICTED:
            assert d["probability"] == round(p["probability"], 6) and d["ood_score"] == p["ood_score"]
            assert d["positive"] == p["positive"]
    states = sorted(p["state"] for p in by_uid.values())
    assert states == [NOT_ANALYSED] * 3 + [PREDICTED] * 2
    hand = next(p for p in by_uid.values() if p["path"].endswith("hand.dcm"))
    assert [x["code"] for x in hand["reasons"]] == ["body_part", "age"]
