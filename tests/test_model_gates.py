"""Intended-use gates (age from the header, out-of-distribution from the pixels) and the heatmap.

The OOD tests use the shipped model and real images nobody here made: pydicom-data's adult chest
(RG1), extremity (RG3), CT, MR, ultrasound, nuclear medicine.  Tests that need the pediatric
training images read them from ../shared and skip with the reason where that folder is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from sqlalchemy import select

from pacsbridge.imaging import NotAnalysable, load_for_model
from pacsbridge.imaging.decode import decode_display
from pacsbridge.inference.files import score_files
from pacsbridge.inference.gates import AgeRange, age_refusal, load_gated, ood_refusal, patient_age
from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.model.artifact import load_model
from pacsbridge.model.heatmap import grad_cam, overlay_rgb
from pacsbridge.model.ood import OodStats
from pacsbridge.model.preprocess import preprocess
from pacsbridge.store.models import Event, Instance, Prediction
from pipeline_support import SHIPPED_MODEL, add_instance, export_model, sample_file, sqlite_sessions

REPO = Path(__file__).resolve().parents[1]
TRAIN_DIR = REPO.parent / "shared" / "data" / "chest_xray" / "train"
needs_shipped = pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason=f"shipped model {SHIPPED_MODEL} missing")
needs_data = pytest.mark.skipif(not TRAIN_DIR.is_dir(), reason=f"training images not found at {TRAIN_DIR} "
                                "(../shared is absent: the pediatric in-distribution checks cannot run)")
KIDS = AgeRange(1, 6, "1-5 y")


# ------------------------------------------------------------------------------------ age gate
@pytest.mark.parametrize("value, years", [
    ("005Y", 5.0), ("004Y", 4.0), ("064Y", 64.0), ("018M", 1.5), ("030W", 30 * 7 / 365.2425),
    ("004D", 4 / 365.2425), ("012M", 1.0), (" 5Y", 5.0), ("005y", 5.0),
    ("", None), ("64", None), ("abc", None), ("Y", None), ("-05Y", None), ("999Y", None), ("05 years", None),
])
def test_patient_age_forms(value: str, years: float | None) -> None:
    ds = Dataset()
    ds.PatientAge = value
    age = patient_age(ds)
    if years is None:
        assert age is None
    else:
        assert age is not None and age.years == pytest.approx(years)


@pytest.mark.parametrize("value, refused", [
    ("004Y", False), ("001Y", False), ("005Y", False), ("018M", False), ("071M", False),
    ("006Y", True), ("072M", True), ("011M", True), ("030W", True), ("004D", True), ("018Y", True),
    ("064Y", True), ("000Y", True),
])
def test_age_gate_boundaries(value: str, refused: bool) -> None:
    ds = Dataset()
    ds.PatientAge = value
    reason = age_refusal(ds, KIDS)
    assert (reason is not None) == refused
    if refused:
        assert "outside this model's intended use (1-5 y)" in reason and value in reason


@pytest.mark.parametrize("birth, when, years", [
    ("19600101", "20240615", 64.45),   # adult: refused
    ("20200101", "20240615", 4.45),
    ("20180615", "20240614", 5.997),   # the day before the 6th birthday: still 5
    ("20180615", "20240615", 6.0),     # 6th birthday: refused
    ("20160229", "20220301", 6.0),     # leap-day birthday
])
def test_age_from_birth_date_and_study_date(birth: str, when: str, years: float) -> None:
    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate = birth, when
    age = patient_age(ds)
    assert age is not None and age.years == pytest.approx(years, abs=0.005)
    assert (age_refusal(ds, KIDS) is None) == (1 <= years < 6)


def test_age_sources_and_missing_or_malformed_values() -> None:
    ds = Dataset()
    assert patient_age(ds) is None and age_refusal(ds, KIDS) is None  # missing: not refused
    ds.PatientBirthDate = "19700101"
    assert patient_age(ds) is None  # no date to compare with
    ds.AcquisitionDate = "20240101"
    assert "[Birth Date 19700101 and Acquisition Date 20240101]" in age_refusal(ds, KIDS)
    ds.StudyDate = "19600101"  # study before birth: inconsistent -> unknown, not a wrong age
    assert patient_age(ds) is None
    ds.PatientAge = "003Y"  # Patient's Age wins over dates
    assert patient_age(ds).years == 3.0 and age_refusal(ds, KIDS) is None
    bad = Dataset()
    bad.PatientBirthDate, bad.StudyDate = "2020-13-45", "20240101"
    assert patient_age(bad) is None
    assert "64 y" in age_refusal(_with_age("064Y"), KIDS)


def _with_age(value: str) -> Dataset:
    ds = Dataset()
    ds.PatientAge = value
    return ds


def test_age_range_from_card() -> None:
    assert AgeRange.from_card({}) is None
    assert AgeRange.from_card({"intended_use": "free text only"}) is None
    r = AgeRange.from_card({"intended_use": {"age_years": {"min": 1, "max_exclusive": 6, "label": "1-5 y"}}})
    assert r == KIDS
    with pytest.raises(ValueError):
        AgeRange.from_card({"intended_use": {"age_years": {"min": 6, "max_exclusive": 1}}})


def test_load_gated_refuses_before_decoding() -> None:
    ds = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    ds.PatientAge = "064Y"
    with pytest.raises(NotAnalysable, match=r"patient age 64 y is outside this model's intended use \(1-5 y\)"):
        load_gated(ds, KIDS)
    assert load_gated(ds, None).image.ndim == 2  # gate off
    ds.PatientAge = "004Y"
    assert load_gated(ds, KIDS).image.ndim == 2


# ------------------------------------------------------------------------------------ OOD gate
@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED_MODEL.is_file():
        pytest.skip(f"shipped model {SHIPPED_MODEL} missing")
    return load_model(SHIPPED_MODEL, "cpu")


def _stripped(name: str, dest: Path) -> Path:
    """A copy without what the header gates read: body part, descriptions, view, laterality, age."""
    ds = pydicom.dcmread(sample_file(name))
    for kw in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "ViewPosition",
               "ImageLaterality", "Laterality", "PatientAge", "PatientBirthDate", "ViewCodeSequence"):
        if kw in ds:
            delattr(ds, kw)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_shipped_artifact_carries_intended_use_and_ood(shipped) -> None:
    assert shipped.ood is not None and shipped.ood.threshold > 0
    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    assert card["intended_use"]["body_part"] == "CHEST" and AgeRange.from_card(card) == KIDS
    assert card["ood"]["threshold"] == pytest.approx(shipped.ood.threshold)
    assert card["ood"]["validation_refusal_rate"] <= 0.02


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"])
def test_ood_gate_refuses_adult_chest_and_extremity_without_tags(shipped, tmp_path: Path, name: str) -> None:
    path = _stripped(name, tmp_path / name)
    assert load_for_model(path).image.ndim == 2  # the header gate lets it through now
    [r] = score_files([path], shipped)
    assert r.get("skipped"), r
    assert "out-of-distribution score" in r["reason"] and r["ood_score"] > shipped.ood.threshold


def test_ood_score_of_other_modalities_and_synthetic_images(shipped) -> None:
    """CT, MR, US, NM images (header gates bypassed), noise and a photograph-like gradient: all beyond."""
    images = []
    for name in ("CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "JPEG2000.dcm",
                 "OBXXXX1A.dcm", "emri_small.dcm"):
        images.append(decode_display(pydicom.dcmread(sample_file(name))).image)
    rng = np.random.default_rng(0)
    images.append(rng.random((256, 256), dtype=np.float32))                     # white noise
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    images.append(((np.sin(xx * 9) * np.cos(yy * 5) + 1) / 2).astype(np.float32))  # smooth "photo"
    _, scores = shipped.score_inputs(torch.stack([preprocess(im) for im in images]))
    assert all(s > shipped.ood.threshold for s in scores), scores


@needs_data
def test_pediatric_validation_images_are_scored(shipped) -> None:
    """The in-distribution side: validation images of the card's split (never used to fit) pass."""
    from model_training.data import list_samples, load_images, split_by_patient

    _, val = split_by_patient(list_samples(TRAIN_DIR), float(shipped.card["val_fraction"]), int(shipped.card["seed"]))
    val = val[::6]  # ~125 images, both classes
    x = load_images(val).float() / 255.0
    _, scores = shipped.score_inputs(torch.stack([preprocess(im) for im in x]))
    refused = sum(s > shipped.ood.threshold for s in scores)
    assert refused <= max(2, 0.03 * len(val)), (refused, len(val))


@needs_data
@pytest.mark.skipif(shutil.which("img2dcm") is None, reason="DCMTK img2dcm not installed")
def test_pediatric_images_as_dicom_pass_every_gate(shipped, tmp_path: Path) -> None:
    """Training JPEGs turned into DICOM by DCMTK (no age, no body part) go through predict unrefused."""
    files = sorted((TRAIN_DIR / "NORMAL").glob("*.jpeg"))[:6] + sorted((TRAIN_DIR / "PNEUMONIA").glob("*.jpeg"))[:6]
    out = []
    for f in files:
        dest = tmp_path / (f.stem + ".dcm")
        subprocess.run(["img2dcm", str(f), str(dest)], check=True, capture_output=True)
        out.append(dest)
    results = list(score_files(out, shipped))
    refused = [r for r in results if r.get("skipped")]
    assert len(refused) <= 1, refused
    assert all(r["ood_score"] is not None for r in results if not r.get("skipped"))


def test_gates_switched_off(tmp_path: Path) -> None:
    if not SHIPPED_MODEL.is_file():
        pytest.skip("shipped model missing")
    model = load_model(SHIPPED_MODEL, "cpu", age_gate=False, ood_gate=False)
    path = _stripped("RG3_UNCR.dcm", tmp_path / "rg3.dcm")
    ds = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    ds.PatientAge = "064Y"
    ds.save_as(tmp_path / "rg1.dcm")
    results = list(score_files([path, tmp_path / "rg1.dcm"], model))
    assert [r.get("skipped", False) for r in results] == [False, False], results
    assert all(r["ood_score"] > model.ood.threshold for r in results)  # still measured and reported


def test_ood_stats_round_trip_through_the_artifact(tmp_path: Path) -> None:
    """Fit stats on a test model's features, store them in the .pt, load: same scores and threshold."""
    from model_training.ood import extract, fit_stats
    from pacsbridge.model.artifact import sha256_file

    pt = export_model(tmp_path, name="ood-rt")
    model = load_model(pt, "cpu")
    assert model.ood is None and model.score_inputs(torch.zeros(1, 1, 192, 192))[1] == [None]
    rng = np.random.default_rng(1)
    imgs = torch.from_numpy(rng.random((60, 64, 64), dtype=np.float32))
    _, feats = extract(model.module, imgs, model.device)
    stats, report = fit_stats(feats, torch.arange(60) % 2, feats, use=[2, 3], keep=0.95)
    blob = torch.load(pt, weights_only=True)
    blob["ood"] = stats.to_blob()
    torch.save(blob, pt)
    card = json.loads(pt.with_suffix(".json").read_text())
    card["weights_sha256"] = sha256_file(pt)
    pt.with_suffix(".json").write_text(json.dumps(card))
    again = load_model(pt, "cpu")
    assert again.ood is not None and again.ood.threshold == pytest.approx(stats.threshold)
    x = torch.stack([preprocess(im) for im in imgs[:5]])
    _, s1 = again.score_inputs(x)
    assert s1 == pytest.approx(stats.score([f[:5] for f in feats]).tolist(), rel=1e-4, abs=1e-4)
    assert again.score_inputs(x)[0] == pytest.approx(again.probabilities_from_inputs(x), abs=1e-6)
    blob["ood"]["use"] = [99]  # inconsistent statistics: the artifact is refused, not half-used
    torch.save(blob, pt)
    card["weights_sha256"] = sha256_file(pt)
    pt.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(Exception, match="block selection"):
        load_model(pt, "cpu")


def test_ood_refusal_text() -> None:
    assert ood_refusal(1.0, 2.0) is None
    assert "out-of-distribution score 3.50 > threshold 2.00" in ood_refusal(3.5, 2.0)
    assert "not finite" in ood_refusal(float("nan"), 2.0)
    assert OodStats.from_blob  # the class method exists for loaders


# ------------------------------------------------------------------------------------ worker
def test_worker_records_ood_score_and_refusal_reasons(tmp_path: Path, shipped) -> None:
    db = sqlite_sessions(tmp_path)
    spool = tmp_path / "spool"
    aged = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    aged.PatientAge = "064Y"
    aged.save_as(tmp_path / "aged.dcm")
    add_instance(db, spool, tmp_path / "aged.dcm", sop_uid="9.1", study_uid="8.1")
    add_instance(db, spool, _stripped("RG3_UNCR.dcm", tmp_path / "rg3.dcm"), sop_uid="9.2", study_uid="8.2")
    add_instance(db, spool, _stripped("RG1_UNCR.dcm", tmp_path / "rg1.dcm"), sop_uid="9.3", study_uid="8.3")
    out = InferenceWorker(db, shipped, spool, batch_size=4, max_wait_ms=0).drain()
    assert (out.predicted, out.not_analysed) == (0, 3)
    with db() as s:
        states = {i.sop_instance_uid: (i.state, i.state_reason) for i in s.scalars(select(Instance))}
        assert "patient age 64 y is outside this model's intended use (1-5 y)" in states["9.1"][1]
        for uid in ("9.2", "9.3"):
            assert states[uid][0] == "not_analysed" and "out-of-distribution score" in states[uid][1]
        details = {e.sop_instance_uid: e.detail for e in s.scalars(select(Event).where(Event.kind == "not_analysed"))}
        assert details["9.2"] == states["9.2"][1]

    # Gates off (demo mode): the same images are scored and the OOD score is recorded with each.
    db2 = sqlite_sessions(tmp_path / "second")
    off = load_model(SHIPPED_MODEL, "cpu", age_gate=False, ood_gate=False)
    add_instance(db2, spool, tmp_path / "aged.dcm", sop_uid="9.4", study_uid="8.4")
    add_instance(db2, spool, tmp_path / "rg3.dcm", sop_uid="9.5", study_uid="8.5")
    out = InferenceWorker(db2, off, spool, batch_size=4, max_wait_ms=0).drain()
    assert (out.predicted, out.not_analysed) == (2, 0)
    with db2() as s:
        preds = s.scalars(select(Prediction)).all()
        assert len(preds) == 2 and all(p.ood_score is not None and p.ood_score > off.ood.threshold for p in preds)


def test_worker_with_a_model_without_gates_records_null_ood(tmp_path: Path) -> None:
    db = sqlite_sessions(tmp_path)
    spool = tmp_path / "spool"
    aged = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    aged.PatientAge = "064Y"  # the test model's card has no intended use: no age gate
    aged.save_as(tmp_path / "aged.dcm")
    add_instance(db, spool, tmp_path / "aged.dcm", sop_uid="7.1")
    model = load_model(export_model(tmp_path / "m"), "cpu")
    assert InferenceWorker(db, model, spool, max_wait_ms=0).drain().predicted == 1
    with db() as s:
        assert s.scalar(select(Prediction)).ood_score is None


# ------------------------------------------------------------------------------------ heatmap
def _with_opacity(image: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with a soft bright opacity (consolidation-like) in the lower left or right lung zone."""
    h, w = image.shape
    cy, cx = int(h * 0.55), int(w * (0.3 if side == "right-of-image-left" else 0.7))
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.08 * h) ** 2)).astype(np.float32)
    return np.clip(image + 0.5 * blob, 0, 1), blob


def test_grad_cam_shape_range_and_it_points_at_the_opacity(shipped) -> None:
    rg1 = load_for_model(sample_file("RG1_UNCR.dcm")).image
    for side in ("right-of-image-left", "image-right"):
        image, blob = _with_opacity(rg1, side)
        heat = grad_cam(shipped, image)
        assert heat.shape == image.shape and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() == pytest.approx(1.0)
        inside, outside = heat[blob > 0.5].mean(), heat[blob < 0.05].mean()
        assert inside > 2 * outside, (side, inside, outside)
    # A non-square image keeps its own shape (the model squashes; the map is stretched back).
    assert grad_cam(shipped, np.random.default_rng(0).random((300, 200), dtype=np.float32)).shape == (300, 200)


@needs_data
def test_grad_cam_peak_lies_on_an_opacity_in_pediatric_images(shipped) -> None:
    """In-distribution (normal training images with a synthetic opacity): the hottest pixel lies on it."""
    files = sorted((TRAIN_DIR / "NORMAL").glob("*.jpeg"))[:12]
    hits = 0
    for i, f in enumerate(files):
        image = np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0
        image, blob = _with_opacity(image, "image-right" if i % 2 else "right-of-image-left")
        heat = grad_cam(shipped, image)
        assert heat[blob > 0.5].mean() > 2 * heat[blob < 0.05].mean(), f.name
        hits += blob[np.unravel_index(int(heat.argmax()), heat.shape)] > 0.2
    assert hits >= len(files) - 1, (hits, len(files))


def test_overlay_has_the_label_and_colours_the_heat() -> None:
    image = np.full((256, 320), 0.5, np.float32)
    heat = np.zeros_like(image)
    heat[150:200, 200:260] = 1.0
    rgb = overlay_rgb(image, heat)
    assert rgb.shape == (256, 320, 3) and rgb.dtype == np.uint8
    hot = rgb[175, 230].astype(int)
    assert hot[0] > hot[2] + 60  # red where hot
    cold = rgb[230, 40]
    assert abs(int(cold[0]) - 128) <= 2 and cold[0] == cold[1] == cold[2]  # grey where cold
    banner = rgb[:12, :120]
    assert (banner == 0).all(axis=-1).any() and ((banner[..., 0] > 200) & (banner[..., 2] < 60)).any()  # yellow text
    assert (overlay_rgb(image, heat, label="")[:12, :120] == 128).all()  # no banner without a label
    with pytest.raises(ValueError):
        overlay_rgb(image, heat[:10])


def test_predict_heatmaps_and_json(tmp_path: Path) -> None:
    if not SHIPPED_MODEL.is_file():
        pytest.skip("shipped model missing")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(PACSBRIDGE_DATA_DIR=str(tmp_path / "var"), PACSBRIDGE_AGE_GATE="false", PACSBRIDGE_OOD_GATE="false",
               PYTHONPATH=str(REPO))
    inputs = [str(sample_file("RG1_UNCR.dcm")), str(sample_file("RG3_UNCR.dcm"))]
    r = subprocess.run([sys.executable, "-m", "pacsbridge", "predict", "--json", "--heatmaps", str(tmp_path / "hm"),
                        "--model", str(SHIPPED_MODEL), *inputs], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["ood_score"] > 0 and Path(rows[0]["heatmap"]).parent == tmp_path / "hm"
    png = np.asarray(Image.open(rows[0]["heatmap"]))
    assert png.ndim == 3 and png.shape[2] == 3 and png.shape[:2] == load_for_model(inputs[0]).image.shape
    assert rows[1]["skipped"] and "chest" in rows[1]["reason"]  # header gate: no heatmap for a refusal
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == ["00000-RG1_UNCR.png"]
    # Gates on (default): the adult chest is refused by the OOD check, with the score.
    env.pop("PACSBRIDGE_OOD_GATE")
    r = subprocess.run([sys.executable, "-m", "pacsbridge", "predict", "--json", "--model", str(SHIPPED_MODEL),
                        inputs[0]], env=env, capture_output=True, text=True, timeout=300)
    row = json.loads(r.stdout)
    assert row["skipped"] and "out-of-distribution" in row["reason"] and row["ood_score"] > 0
