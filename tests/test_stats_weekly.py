"""Weekly live figures (the Statistics page's charts), on SQLite and the real PostgreSQL.

A constructed four weeks with known counts, ``now`` Wednesday 2026-11-25 12:00 UTC (ISO week
2026-W48), so the weeks are 2026-W45..W48:

- W45: 20 images scored, 5 flagged (studies 0-4), 1 refused; readers complete 4 flagged studies
  (3 pneumonia); RIS labels say pneumonia for studies 0, 1, 2 (flagged) and 10, 11 (not).
- W46: nothing at all: a gap (null rates, not zeros).
- W47: 10 scored, none flagged (a flag rate of 0, not a gap), 2 refused.
- W48: 8 scored, all flagged, nothing read yet (PPV a gap); a second model scores 1 image.
- The week before W45 holds data that must not count.
Instances are recorded as the receiver records them (pipeline_support.add_instance), items by the
worklist's updater and completed through its life cycle, labels by ``labels import``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from dicom_support import migrated_sessions_for
from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance, InstanceState, Prediction, Series, WorklistItem
from pacsbridge.validation.ris_labels import import_labels
from pacsbridge.validation.stats import wilson_interval
from pacsbridge.validation.weekly import week_bounds, weekly_figures
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import add_instance

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
MONDAY = {45: datetime(2026, 11, 2, tzinfo=timezone.utc), 44: datetime(2026, 10, 26, tzinfo=timezone.utc),
          47: datetime(2026, 11, 16, tzinfo=timezone.utc), 48: datetime(2026, 11, 23, tzinfo=timezone.utc)}


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path: Path):
    yield from migrated_sessions_for(request.param, tmp_path / "pb.db")


def _image(sessions, uid: str, at: datetime, probability: float | None, model_id: str = "m",  # noqa: ANN001
           refused: str | None = None) -> None:
    iid = add_instance(sessions, Path("/nonexistent"), None, sop_uid=uid + ".1.1", study_uid=uid, received_at=at,
                       state=InstanceState.NOT_ANALYSED.value if refused else InstanceState.PREDICTED.value)
    with sessions.begin() as s:
        s.get(Instance, iid).state_reason = refused
        if probability is not None:
            s.add(Prediction(instance_id=iid, probability=probability, positive=probability >= 0.5, threshold=0.5,
                             model_id=model_id, weights_sha256="ab" * 32, created_at=at))


def _scenario(sessions, tmp_path: Path) -> None:  # noqa: ANN001
    w45 = MONDAY[45] + timedelta(days=1, hours=9)
    for i in range(20):
        _image(sessions, f"4.5.{i}", w45 + timedelta(minutes=i), 0.9 if i < 5 else 0.1)
    _image(sessions, "4.5.99", w45, None, refused="not a chest image (BodyPartExamined HAND)")
    for i in range(10):
        _image(sessions, f"4.7.{i}", MONDAY[47] + timedelta(hours=i), 0.2)
    for i in range(2):
        _image(sessions, f"4.7.9{i}", MONDAY[47], None, refused="not a chest image (BodyPartExamined FOOT)")
    for i in range(8):
        _image(sessions, f"4.8.{i}", MONDAY[48] + timedelta(hours=i), 0.95)
    _image(sessions, "4.8.50", MONDAY[48] + timedelta(hours=1), 0.1, model_id="m2")
    for i in range(3):  # before the window: must not count anywhere
        _image(sessions, f"4.4.{i}", MONDAY[44] + timedelta(days=6, hours=23), 0.9)
    WorklistUpdater(sessions, 240).refresh(now=NOW)
    reader = lifecycle.Actor("anna", "radiologist")
    findings = {"4.5.0": "pneumonia", "4.5.1": "pneumonia", "4.5.2": "pneumonia", "4.5.3": "no_pneumonia",
                "4.4.0": "pneumonia"}
    with sessions.begin() as s:
        items = dict(s.execute(select(WorklistItem.study_id, WorklistItem.id)).all())
        uid_of = {sid: uid for sid, uid in s.execute(select(Series.study_id, Series.series_instance_uid))}
        for sid, item_id in items.items():
            finding = findings.get(uid_of[sid][:-2])
            if finding:
                lifecycle.claim(s, item_id, reader, now=NOW, claim_timeout_s=1800)
                lifecycle.complete(s, item_id, reader, finding=finding, now=NOW)
    csv = tmp_path / "ris.csv"
    csv.write_text("study_instance_uid,finding\n" + "".join(
        f"4.5.{i},{'pneumonia' if i in (0, 1, 2, 10, 11) else 'no_pneumonia'}\n" for i in range(20)))
    with sessions.begin() as s:
        assert not import_labels(s, csv).bad


def _ci(k: int, n: int) -> list[float]:
    lo, hi = wilson_interval(k, n)
    return [round(lo, 4), round(hi, 4)]


def test_week_bounds_are_iso_weeks_in_utc() -> None:
    b = week_bounds(4, NOW)
    assert b[0] == MONDAY[45] and b[-1] == datetime(2026, 11, 30, tzinfo=timezone.utc) and len(b) == 5
    # A Sunday late in the evening UTC is still the week it ends.
    assert week_bounds(1, datetime(2026, 11, 29, 23, 59, tzinfo=timezone.utc))[0] == MONDAY[48]


def test_known_counts_give_known_rates_intervals_and_gaps(sessions, tmp_path: Path) -> None:
    _scenario(sessions, tmp_path)
    with sessions() as s:
        out = weekly_figures(s, weeks=4, now=NOW)
    assert [w["week"] for w in out["weeks"]] == ["2026-W45", "2026-W46", "2026-W47", "2026-W48"]
    assert [(w["received"], w["refused"]) for w in out["weeks"]] == [(21, 1), (0, 0), (12, 2), (9, 0)]
    assert out["weeks"][1]["refusal_rate"] is None and out["weeks"][2]["refusal_rate"] == round(2 / 12, 4)
    assert out["weeks"][2]["refusal_ci"] == _ci(2, 12)
    assert [(m["model_id"], m["calibration"]) for m in out["models"]] == [("m", "model"), ("m2", "model")]
    w45, w46, w47, w48 = out["models"][0]["weeks"]
    assert (w45["scored"], w45["flagged"], w45["flag_rate"], w45["flag_ci"]) == (20, 5, 0.25, _ci(5, 20))
    assert w45["refused"] == 1 and w45["refusal_rate"] == round(1 / 21, 4)
    assert w45["ppv"] == {"value": 0.75, "ci": _ci(3, 4), "n": 4, "k": 3}
    assert w45["sensitivity"] == {"value": 0.6, "ci": _ci(3, 5), "n": 5, "k": 3}
    # The empty week is a gap, not a zero; a week with images and no flags is a zero.
    assert (w46["scored"], w46["flag_rate"], w46["flag_ci"], w46["ppv"]["value"], w46["sensitivity"]["value"]) == \
        (0, None, None, None, None)
    assert (w47["flag_rate"], w47["ppv"]["value"], w47["sensitivity"]["n"]) == (0.0, None, 0)
    assert (w48["scored"], w48["flagged"], w48["flag_rate"], w48["ppv"]["n"]) == (8, 8, 1.0, 0)
    m2 = out["models"][1]["weeks"]
    assert [w["scored"] for w in m2] == [0, 0, 0, 1] and m2[3]["flag_rate"] == 0.0
    assert m2[3]["refused"] == 0 and m2[2]["refused"] == 2  # refusals are the site's
    # More weeks reach back to the week before; fewer keep only the latest.
    with sessions() as s:
        five = weekly_figures(s, weeks=5, now=NOW)
        one = weekly_figures(s, weeks=1, now=NOW)
    first = five["models"][0]["weeks"][0]
    assert (first["week"], first["scored"], first["flagged"], first["ppv"]["n"]) == ("2026-W44", 3, 3, 1)
    assert [w["week"] for w in one["models"][0]["weeks"]] == ["2026-W48"]


def test_api_and_cli(tmp_path: Path) -> None:
    db = tmp_path / "pacsbridge.db"
    engine = make_engine(f"sqlite:///{db}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    now = datetime.now(timezone.utc)
    _image(sessions, "6.6.1", now - timedelta(minutes=5), 0.9)
    _image(sessions, "6.6.2", now - timedelta(minutes=5), 0.1)
    with sessions.begin() as s:
        token = create_user(s, "watcher", "monitor")[1]
    server = HttpServer(create_app(sessions), "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/api/stats/weekly").status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.get(base + "/api/stats/weekly?weeks=3", headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["weeks"]) == 3 and body["models"][0]["weeks"][-1]["flag_rate"] == 0.5
        assert httpx.get(base + "/api/stats/weekly?weeks=0", headers=auth).status_code == 422
        assert httpx.get(base + "/api/stats/weekly?weeks=1000", headers=auth).status_code == 422
    finally:
        server.stop()
        engine.dispose()
    env = {"PACSBRIDGE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pacsbridge", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    r = run("stats", "--weekly", "--weeks", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["weeks"]) == 2 and out["models"][0]["weeks"][-1]["scored"] == 2
    r = run("stats", "--weekly")
    assert r.returncode == 0 and "50.0%" in r.stdout and "Traceback" not in r.stderr
    r = run("stats", "--weekly", "--weeks", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "weeks" in r.stderr
