"""Shadow mode over a real daemon: images are received, scored and recorded, but no worklist item and
no outbox entry is made; switching to live acts on images scored from then on only."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pacsbridge.store.models import OutboxEntry, Prediction, WorklistItem
from pipeline_support import export_model, free_port, reuid, sample_file
from test_daemon_pipeline import REPO, Daemon, _sessions, _wait_scored

pytestmark = pytest.mark.slow


def _count(sessions, model) -> int:  # noqa: ANN001
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)))


def test_shadow_mode_records_but_queues_nothing_then_live_acts_on_new_images(tmp_path: Path) -> None:
    # Threshold 0: every scored image is positive, so in live mode each study would be an item and an outbox entry.
    model_path = export_model(tmp_path / "model", threshold=0.0, name="shadow-model")
    src = tmp_path / "in"
    src.mkdir()
    shadow_files = [reuid(sample_file("RG1_UNCR.dcm"), src / f"s{i}.dcm", study_uid=f"1.2.826.0.1.77.{i}")
                    for i in range(3)]
    live_file = reuid(sample_file("RG1_UNCR.dcm"), src / "live.dcm", study_uid="1.2.826.0.1.77.9")
    data = tmp_path / "data"
    data.mkdir()
    # A destination nobody listens on: entries would stay pending, which is what we count.
    dest = json.dumps([{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": free_port(),
                        "ae_title": "NOBODY", "timeout_s": 1}])
    common = {"PACSBRIDGE_DESTINATIONS": dest, "PACSBRIDGE_AGE_GATE": "false", "PACSBRIDGE_OOD_GATE": "false"}
    sessions = _sessions(data)

    daemon = Daemon(data, model_path, PACSBRIDGE_MODE="shadow", **common)
    try:
        daemon.send(*shadow_files)
        _wait_scored(sessions, 3)
        time.sleep(1.5)  # several scheduler ticks
        auth = daemon.token()
        assert httpx.get(f"{daemon.url}/api/worklist", headers=auth, timeout=10).json() == []
        stats = httpx.get(f"{daemon.url}/api/stats", headers=auth, timeout=10).json()
        assert stats["mode"] == "shadow"
        assert stats["models"][0]["scored"] == 3 and stats["models"][0]["flagged"] == 3
        assert httpx.get(f"{daemon.url}/api/me", headers=auth, timeout=10).json()["mode"] == "shadow"
        # This test model's card has no validation rates: drift alarms are off, and say so.
        assert stats["drift"] == {"alarm": False, "reference": None, "signals": []}
        metrics = httpx.get(f"{daemon.url}/metrics", headers=auth, timeout=10).text
        assert 'pacsbridge_drift_alarm{signal="refusal_rate"} 0.0' in metrics
        assert 'pacsbridge_live_scored_images{calibration="model",model="shadow-model"} 3.0' in metrics
        r = subprocess.run([sys.executable, "-m", "pacsbridge", "status", "--json"], env=daemon.env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["mode"] == "shadow"
    finally:
        assert daemon.stop() == 0, daemon.logs()[-3000:]
    logs = Path(daemon.log.name).read_text()
    assert "shadow mode" in logs and "drift alarms are off" in logs
    with sessions() as s:
        flags = s.execute(select(Prediction.positive, Prediction.shadow)).all()
    assert flags == [(True, True)] * 3
    assert _count(sessions, WorklistItem) == 0 and _count(sessions, OutboxEntry) == 0

    # Live from now on: the shadow predictions stay off the worklist and the outbox, a new image is acted on.
    daemon = Daemon(data, model_path, **common)
    try:
        daemon.send(live_file)
        _wait_scored(sessions, 4)
        time.sleep(1.5)
        auth = daemon.token("reader2")
        rows = httpx.get(f"{daemon.url}/api/worklist", headers=auth, timeout=10).json()
        assert [r["study_instance_uid"] for r in rows] == ["1.2.826.0.1.77.9"]
        assert httpx.get(f"{daemon.url}/api/stats", headers=auth, timeout=10).json()["mode"] == "live"
    finally:
        assert daemon.stop() == 0, daemon.logs()[-3000:]
    with sessions() as s:
        outbox_predictions = set(s.scalars(select(OutboxEntry.prediction_id)))
        live_ids = set(s.scalars(select(Prediction.id).where(Prediction.shadow.is_(False))))
    assert len(live_ids) == 1 and outbox_predictions == live_ids
