"""`pacsbridge validate --from-db`: a shadow-mode daemon scores a site's studies, the RIS labels are
imported, and the report built from the database gives the same numbers as `validate` on the same
files; on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_support import database_url_for
from pacsbridge.cli import main
from pacsbridge.imaging import load_for_model
from pacsbridge.model.artifact import load_model
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance, OutboxEntry, WorklistItem
from pipeline_support import export_model, synthetic_chest
from test_daemon_pipeline import Daemon
from validation_support import write_labels

pytestmark = pytest.mark.slow

N = 16
#: The report's figures (not the bookkeeping of files and rows, which differs by nature).
SAME = ("n", "n_pneumonia", "n_normal", "unit", "images", "scored", "refused", "auc", "auc_ci", "at_current",
        "proposed", "calibration_refused", "model", "data_sha256")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path):
    yield from database_url_for(request.param, tmp_path / "data" / "pacsbridge.db")


def _site(root: Path) -> dict:
    """N synthetic studies (one image each) with spread scores; labels rank-informative, one swap each way."""
    files, uids = [], []
    for seed in range(N):
        uid = f"1.2.826.0.1.3680043.10.4242.{seed}"
        p = root / "dicom" / f"img{seed:02d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        synthetic_chest(seed, rows=256, cols=256, study_uid=uid).save_as(p, enforce_file_format=True)
        files.append(p)
        uids.append(uid)
    model_path = export_model(root / "model", spread_on=[load_for_model(p).image for p in files], name="site-model")
    probs = load_model(model_path, "cpu").predict_images([load_for_model(p).image for p in files])
    order = sorted(range(N), key=lambda i: probs[i])
    truth = {i: rank >= N // 2 for rank, i in enumerate(order)}
    lo, hi = order[N // 2 - 1], order[N // 2]
    truth[lo], truth[hi] = truth[hi], truth[lo]
    labels = write_labels(root / "labels.csv", "study_instance_uid",
                          [(uids[i], "pneumonia" if truth[i] else "normal") for i in range(N)])
    ris = root / "ris.csv"
    ris.write_text("study_instance_uid,finding\n" + "".join(
        f"{uids[i]},{'pneumonia' if truth[i] else ('other' if i % 5 == 0 else 'no_pneumonia')}\n" for i in range(N)))
    return {"files": files, "model": model_path, "labels": labels, "ris": ris}


def _close(a: object, b: object) -> bool:
    """Equal, numbers within 1e-5 relative (recursively through dicts and lists)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-6)
    return a == b


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_from_db_after_shadow_mode_equals_validate_on_files(database_url, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    site = _site(tmp_path / "site")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {"PACSBRIDGE_MODEL_PATH": str(site["model"]), "PACSBRIDGE_DEVICE": "cpu",
           "PACSBRIDGE_DATA_DIR": str(data), "PACSBRIDGE_DATABASE_URL": database_url,
           "PACSBRIDGE_VALIDATION_MIN_PER_CLASS": "5"}
    for key in list(os.environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ("--target-sensitivity", "0.6", "--confidence", "0.6", "--json")
    code, out, err = _main(capsys, "validate", str(site["files"][0].parent), "--labels", str(site["labels"]),
                           "--quiet", *args)
    assert code == 0, err
    on_files = json.loads(out)

    daemon = Daemon(data, site["model"], PACSBRIDGE_MODE="shadow", PACSBRIDGE_DATABASE_URL=database_url,
                    PACSBRIDGE_DEVICE="cpu")
    try:
        daemon.send(*site["files"])
        sessions = make_sessionmaker(make_engine(database_url))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with sessions() as s:
                done = s.scalar(select(func.count()).where(Instance.state.in_(["predicted", "not_analysed"])))
            if done == N:
                break
            time.sleep(0.2)
        assert done == N
    finally:
        assert daemon.stop() == 0, daemon.logs()[-3000:]
    with sessions() as s:  # shadow mode: nothing acted on
        assert s.scalar(select(func.count()).select_from(WorklistItem)) == 0
        assert s.scalar(select(func.count()).select_from(OutboxEntry)) == 0

    # Before any label: nothing to validate, one line, exit 2.
    code, out, err = _main(capsys, "validate", "--from-db", *args)
    assert code == 2 and "no labelled" in err and "Traceback" not in err
    code, out, err = _main(capsys, "labels", "import", str(site["ris"]))
    assert code == 0, err
    cal = tmp_path / "site-calibration.json"
    code, out, err = _main(capsys, "validate", "--from-db", *args, "--write-calibration", str(cal))
    assert code == 0, err
    from_db = json.loads(out)
    for key in SAME:  # the daemon scores in other batches than validate: float noise of about 1e-7
        assert _close(from_db[key], on_files[key]), (key, from_db[key], on_files[key])
    assert from_db["labels"]["rows"] == N and from_db["labels"]["rows_used"] == N
    assert from_db["labels"]["label_sources"] == {"ris": N, "reader": 0}
    written = json.loads(cal.read_text())
    assert _close(written["threshold"], on_files["proposed"]["threshold"])
    assert written["data"]["sha256"] == on_files["data_sha256"]

    # --since after everything was received: no study left; a bad --since is one line, exit 2.
    code, out, err = _main(capsys, "validate", "--from-db", "--since", "2999-01-01", *args)
    assert code == 2 and "no labelled" in err
    code, out, err = _main(capsys, "validate", "--from-db", "--since", "yesterday", *args)
    assert code == 2 and err.startswith("pacsbridge validate: --since") and "Traceback" not in err
    code, out, err = _main(capsys, "validate", "--from-db", str(site["files"][0]), *args)
    assert code == 2 and "--from-db takes no PATH" in err
