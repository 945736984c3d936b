"""`pacsbridge validate`, and the site calibration applied by `predict`, `validate` and a real `serve`.

Synthetic chest DICOM files scored by a small exported test model (no OOD statistics, scores spread
over (0, 1)); labels are given so that the ranking is informative but not perfect.  One test runs
the shipped model on real training radiographs and skips when ../shared data is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from pacsbridge.cli import main
from pacsbridge.imaging import load_for_model
from pacsbridge.model.artifact import load_model
from pacsbridge.store.models import Event, Prediction
from pacsbridge.validation.report import FIGURES
from pipeline_support import SHIPPED_MODEL, export_model, synthetic_chest
from validation_support import TRAIN, jpeg_to_dicom, write_labels

REPO = Path(__file__).resolve().parents[1]
N = 16


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """N synthetic chest files, a test model that spreads their scores, labels: the top-scoring half is
    'pneumonia' except one swap each way (AUC < 1)."""
    root = tmp_path_factory.mktemp("site")
    files = []
    for seed in range(N):
        p = root / "dicom" / f"img{seed:02d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        synthetic_chest(seed, rows=256, cols=256).save_as(p, enforce_file_format=True)
        files.append(p)
    model_path = export_model(root / "model", spread_on=[load_for_model(p).image for p in files], name="site-model",
                              threshold=0.5)
    model = load_model(model_path, "cpu")
    probs = model.predict_images([load_for_model(p).image for p in files])
    order = sorted(range(N), key=lambda i: probs[i])
    labels = {i: ("pneumonia" if rank >= N // 2 else "normal") for rank, i in enumerate(order)}
    lo, hi = order[N // 2 - 1], order[N // 2]
    labels[lo], labels[hi] = labels[hi], labels[lo]
    csv = write_labels(root / "labels.csv", "path", [(files[i].name, labels[i]) for i in range(N)])
    return {"root": root, "files": files, "model": model_path, "labels": csv, "probs": probs}


@pytest.fixture
def env(monkeypatch, site, tmp_path):
    for key in list(os.environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PACSBRIDGE_MODEL_PATH", str(site["model"]))
    monkeypatch.setenv("PACSBRIDGE_DEVICE", "cpu")
    monkeypatch.setenv("PACSBRIDGE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("PACSBRIDGE_VALIDATION_MIN_PER_CLASS", "5")
    return monkeypatch


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _validate(capsys, site, *extra: str) -> tuple[int, dict, str]:
    code, out, err = _run(capsys, "validate", str(site["root"] / "dicom"), "--labels", str(site["labels"]),
                          "--target-sensitivity", "0.6", "--confidence", "0.6", "--json", "--quiet", *extra)
    return code, (json.loads(out) if out.strip() else {}), err


def test_validate_json_calibration_and_report(env, capsys, site, tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    report = tmp_path / "report"
    code, r, err = _validate(capsys, site, "--write-calibration", str(cal), "--report", str(report))
    assert code == 0, err
    assert r["n"] == N and r["scored"] == N and r["refused"] == {} and r["n_pneumonia"] == N // 2
    assert 0.9 < r["auc"] < 1.0 and r["auc_ci"][0] < r["auc"] <= r["auc_ci"][1]
    cur, prop = r["at_current"], r["proposed"]
    assert cur["threshold"] == 0.5 and cur["calibration"] == "model"
    assert cur["sensitivity"] == pytest.approx(sum(
        1 for i, p in enumerate(site["probs"]) if p >= 0.5 and _label(site, i)) / (N // 2))
    assert prop["threshold"] is not None and prop["ood_threshold"] is None  # the test model has no OOD statistics
    data = json.loads(cal.read_text())
    assert data["threshold"] == prop["threshold"] and data["model_id"] == "site-model"
    assert data["weights_sha256"] == load_model(site["model"], "cpu").weights_sha256
    assert data["data"]["n_pneumonia"] == N // 2 and data["target_sensitivity"] == 0.6
    assert r["calibration_written"]["id"].startswith("site-")
    html = (report / "report.html").read_text()
    for name in FIGURES:
        assert (report / name).stat().st_size > 5000
        assert f'src="{name}"' in html
    assert "Wilson" in html and "DeLong" in html and "What these numbers do not prove" in html


def _label(site, i: int) -> bool:
    return any(line.startswith(site["files"][i].name + ",pneumonia") for line in site["labels"].read_text().splitlines())


def test_below_the_floor_reports_but_writes_no_calibration(env, capsys, site, tmp_path: Path) -> None:
    env.setenv("PACSBRIDGE_VALIDATION_MIN_PER_CLASS", "50")
    cal = tmp_path / "cal.json"
    code, r, err = _validate(capsys, site, "--write-calibration", str(cal))
    assert code == 1 and not cal.exists()
    assert r["n"] == N and "at least 50 of each" in r["calibration_refused"]
    assert err.strip().startswith("pacsbridge validate: no calibration written: too few") and len(err.strip().splitlines()) == 1


def test_unusable_labels_exit_2_with_one_line(env, capsys, site, tmp_path: Path) -> None:
    rows = [(f.name, "normal") for f in site["files"][:10]] + [("nope.dcm", "normal"), ("x.dcm", "maybe")]
    bad = write_labels(tmp_path / "bad.csv", "path", rows)
    code, out, err = _run(capsys, "validate", str(site["root"] / "dicom"), "--labels", str(bad), "--quiet")
    assert code == 2 and out == ""
    assert err.startswith("pacsbridge validate: 2 of 12 label rows are unusable") and len(err.strip().splitlines()) == 1
    (tmp_path / "nolabel.csv").write_text("path,finding\na,1\n")
    code, _, err = _run(capsys, "validate", str(site["root"]), "--labels", str(tmp_path / "nolabel.csv"))
    assert code == 2 and "no 'label' column" in err and "Traceback" not in err


def test_predict_and_validate_apply_the_calibration(env, capsys, site, tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    code, r, err = _validate(capsys, site, "--write-calibration", str(cal))
    assert code == 0, err
    cal_id, thr = r["calibration_written"]["id"], r["proposed"]["threshold"]
    env.setenv("PACSBRIDGE_SITE_CALIBRATION", str(cal))
    code, out, err = _run(capsys, "predict", "--json", str(site["root"] / "dicom"))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == N and all(x["calibration"] == cal_id and x["threshold"] == thr for x in rows)
    assert all(x["positive"] == (x["probability"] >= thr) for x in rows)
    code, r2, err = _validate(capsys, site)
    assert code == 0, err
    assert r2["at_current"]["calibration"] == cal_id and r2["at_current"]["threshold"] == thr
    assert r2["at_current"]["sensitivity"] == r["proposed"]["sensitivity"]


def test_a_calibration_for_other_weights_stops_predict(env, capsys, site, tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": "pacsbridge-site-calibration-1", "model_id": "other", "threshold": 0.3,
                               "weights_sha256": "ab" * 32, "ood_threshold": None}))
    env.setenv("PACSBRIDGE_SITE_CALIBRATION", str(cal))
    code, out, err = _run(capsys, "predict", str(site["files"][0]))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert str(cal) in err and "made for model other" in err
    env.setenv("PACSBRIDGE_SITE_CALIBRATION", str(tmp_path / "absent.json"))
    code, _, err = _run(capsys, "validate", str(site["root"]), "--labels", str(site["labels"]))
    assert code == 1 and "absent.json: cannot read it" in err


@pytest.mark.slow
def test_serve_applies_records_and_reports_the_calibration(env, capsys, site, tmp_path: Path) -> None:
    from test_daemon_pipeline import Daemon, _sessions, _wait_scored

    cal = tmp_path / "cal.json"
    code, r, err = _validate(capsys, site, "--write-calibration", str(cal))
    assert code == 0, err
    cal_id, thr = r["calibration_written"]["id"], r["proposed"]["threshold"]
    data = tmp_path / "data"
    data.mkdir()
    daemon = Daemon(data, site["model"], PACSBRIDGE_SITE_CALIBRATION=str(cal), PACSBRIDGE_DEVICE="cpu")
    try:
        daemon.send(*site["files"][:4])
        sessions = _sessions(data)
        _wait_scored(sessions, 4)
        with sessions() as s:
            preds = s.scalars(select(Prediction)).all()
            events = s.scalars(select(Event.detail).where(Event.kind == "calibration_changed")).all()
        assert len(preds) == 4 and all(p.calibration == cal_id and p.threshold == thr for p in preds)
        assert len(events) == 1 and events[0].startswith(f"{cal_id} (was not recorded")
        rows = httpx.get(f"{daemon.url}/api/instances", headers=daemon.token(), timeout=10).json()
        assert {row["calibration"] for row in rows} == {cal_id}
        st = subprocess.run([sys.executable, "-m", "pacsbridge", "status", "--json"], env=daemon.env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
        assert st.returncode == 0, st.stderr
        got = json.loads(st.stdout)["calibration"]
        assert got["id"] == cal_id and got["threshold"] == thr and got["matches_model"] is True
    finally:
        assert daemon.stop() == 0
    # Restarted with the model's own operating point: one more event; a calibration for other weights stops it.
    daemon = Daemon(data, site["model"], PACSBRIDGE_DEVICE="cpu")
    daemon.stop()
    with _sessions(data)() as s:
        events = s.scalars(select(Event.detail).where(Event.kind == "calibration_changed").order_by(Event.id)).all()
    assert len(events) == 2 and events[1].startswith(f"model (was {cal_id}")
    other = tmp_path / "other.json"
    other.write_text(cal.read_text().replace(json.loads(cal.read_text())["weights_sha256"], "cd" * 32))
    proc = subprocess.run([sys.executable, "-m", "pacsbridge", "serve"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**daemon.env, "PACSBRIDGE_SITE_CALIBRATION": str(other)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(other) in proc.stderr and "made for model site-model" in proc.stderr


@pytest.mark.skipif(not (TRAIN / "NORMAL").is_dir(), reason="../shared/data/chest_xray/train is absent")
def test_validate_real_radiographs_with_the_shipped_model(env, capsys, tmp_path: Path) -> None:
    """A few real training radiographs as DICOM (not a measurement: the weights saw them): the shipped
    model's scores, OOD cut and calibration refusal below the floor go through end to end."""
    env.setenv("PACSBRIDGE_MODEL_PATH", str(SHIPPED_MODEL))
    env.setenv("PACSBRIDGE_VALIDATION_MIN_PER_CLASS", "50")
    rows = []
    for cls, label in (("NORMAL", "normal"), ("PNEUMONIA", "pneumonia")):
        for src in sorted((TRAIN / cls).glob("*.jpeg"))[:6]:
            ds = jpeg_to_dicom(src, tmp_path / "dicom" / f"{cls}-{src.stem}.dcm", max_side=512)
            rows.append((ds.SOPInstanceUID, label))
    labels = write_labels(tmp_path / "labels.csv", "sop_instance_uid", rows)
    code, out, err = _run(capsys, "validate", str(tmp_path / "dicom"), "--labels", str(labels), "--json", "--quiet",
                          "--write-calibration", str(tmp_path / "cal.json"))
    r = json.loads(out)
    assert code == 1 and "too few" in r["calibration_refused"] and not (tmp_path / "cal.json").exists()
    assert r["n"] == 12 and r["scored"] >= 10 and r["auc"] > 0.8
    assert r["at_current"]["ood_threshold"] == pytest.approx(load_model(SHIPPED_MODEL, "cpu").ood.threshold)
    assert r["proposed"]["ood_threshold"] <= r["proposed"]["ood_ceiling"]
