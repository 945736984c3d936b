"""``pacsbridge predict``, ``pacsbridge worklist`` and the status keys, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from pacsbridge.imaging import load_for_model
from pacsbridge.model.artifact import load_model
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance, InstanceState, Prediction, utcnow
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import add_instance, export_model, sample_file

REPO = Path(__file__).resolve().parents[1]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(PACSBRIDGE_DATA_DIR=str(data_dir), PACSBRIDGE_DEVICE="cpu", **extra)
    return env


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsbridge", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_model(tmp_path_factory.mktemp("model"), threshold=0.5, name="cli-test-model")


def test_predict_json_lines(tmp_path: Path, model_path: Path) -> None:
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    (folder / "garbage.dcm").write_bytes(os.urandom(4096))
    (folder / "b_chest.dcm").write_bytes(sample_file("RG1_J2KR.dcm").read_bytes())
    (tmp_path / "in" / "empty").write_bytes(b"")
    uncr, rg3 = sample_file("RG1_UNCR.dcm"), sample_file("RG3_UNCR.dcm")
    r = _run("predict", "--json", "--model", str(model_path), str(uncr), str(rg3), str(tmp_path / "in"),
             env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(x["path"]).name for x in lines] == ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "empty", "b_chest.dcm",
                                                      "garbage.dcm"]
    scored = {Path(x["path"]).name: x for x in lines if not x.get("skipped")}
    skipped = {Path(x["path"]).name: x for x in lines if x.get("skipped")}
    assert set(scored) == {"RG1_UNCR.dcm", "b_chest.dcm"}
    model = load_model(model_path, "cpu")
    for name, src in (("RG1_UNCR.dcm", uncr), ("b_chest.dcm", sample_file("RG1_J2KR.dcm"))):
        x = scored[name]
        assert set(x) == {"path", "sop_instance_uid", "probability", "positive", "threshold", "model", "calibration",
                          "ood_score", "state", "reasons"}
        assert x["calibration"] == "model"  # no site_calibration configured
        assert x["ood_score"] is None  # this test model carries no OOD statistics
        assert x["sop_instance_uid"].startswith("1.3.6.1.4.1.5962.1.1.9.1.")
        assert x["model"] == "cli-test-model" and x["threshold"] == 0.5
        assert x["positive"] == (x["probability"] >= 0.5)
        expected = model.predict_images([load_for_model(src).image])[0]
        assert x["probability"] == pytest.approx(expected, abs=1e-4)
    assert "chest" in skipped["RG3_UNCR.dcm"]["reason"]
    for name in ("empty", "garbage.dcm"):
        assert skipped[name]["skipped"] is True and skipped[name]["reason"]


def test_predict_human_output_and_usage_errors(tmp_path: Path, model_path: Path) -> None:
    r = _run("predict", "--model", str(model_path), str(sample_file("RG1_UNCR.dcm")), env=_env(tmp_path))
    assert r.returncode == 0 and "RG1_UNCR.dcm\t0." in r.stdout
    r = _run("predict", "--json", str(tmp_path / "nope.dcm"), env=_env(tmp_path))
    assert r.returncode == 2 and "no such file" in r.stderr and r.stdout == ""
    r = _run("predict", "--json", "--model", str(tmp_path / "missing.pt"), str(sample_file("RG1_UNCR.dcm")),
             env=_env(tmp_path))
    assert r.returncode == 1 and "cannot load the model" in r.stderr


def test_worklist_and_status_json(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run("db", "upgrade", env=env).returncode == 0
    sessions = make_sessionmaker(make_engine(f"sqlite:///{(tmp_path / 'pacsbridge.db').resolve()}"))
    t0 = utcnow() - timedelta(minutes=1)
    for i, p in enumerate((0.55, 0.9, 0.1)):
        iid = add_instance(sessions, tmp_path / "spool", None, sop_uid=f"1.{i}", study_uid=f"2.{i}", received_at=t0)
        with sessions.begin() as s:
            s.get(Instance, iid).state = InstanceState.PREDICTED.value
            s.add(Prediction(instance_id=iid, probability=p, positive=p >= 0.5, threshold=0.5, model_id="m",
                             weights_sha256="0" * 64, decode_ms=10.0 * (i + 1), inference_ms=5.0,
                             created_at=t0 + timedelta(seconds=i + 1)))
    WorklistUpdater(sessions, 240).refresh()
    r = _run("worklist", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["study_instance_uid"] for x in rows] == ["2.1", "2.0"]
    assert {"id", "status", "priority", "probability", "study_instance_uid", "accession_number", "patient_name",
            "patient_id", "patient_age", "study_date", "study_description", "modality", "received_at", "waiting_s",
            "claimed_by", "claim_expires_at", "finding"} <= set(rows[0])
    assert rows[0]["status"] == "scheduled" and rows[0]["modality"] == "CR"
    r = _run("worklist", env=env)
    assert r.returncode == 0 and "2.1" in r.stdout
    r = _run("status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["worklist"] == {"items": 2}
    t = status["timings"]
    assert t["samples"] == 3 and t["decode_ms"]["p50"] == 20.0 and t["inference_ms"]["p95"] == 5.0
    assert 1000 <= t["store_to_prediction_ms"]["p50"] <= 3000
