"""Drift alarms on SQLite and PostgreSQL: out-of-scope images replacing in-scope ones raise an alarm
(one event, one WARNING line, the gauge, the drift object), and it clears when in-scope images are back;
the same over a real daemon fed by storescu (adults after children)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
from image_variants import variant
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select

from pacsbridge.store.models import Event, utcnow
from pacsbridge.validation.drift import DriftLimits, DriftMonitor, Reference, evaluate, reference_from
from pacsbridge.validation.monitor_metrics import MonitoringCollector
from pipeline_support import export_model, reuid
from test_daemon_pipeline import REPO, Daemon, _sessions, _wait_scored
from test_monitoring_stats import _study, sessions  # noqa: F401 - the parametrised (SQLite, PostgreSQL) fixture
from waiting import wait_until

SHIPPED_CARD = Path(__file__).resolve().parents[1] / "pacsbridge" / "models" / "pneumonia-v3.json"
OOD = ("image unlike this model's training data (out-of-distribution score 5.10 > threshold 3.73): "
       "outside its intended use")
HAND = "not a chest image (BodyPartExamined HAND)"


def _traffic(sessions, start, n: int, *, flag_every: int = 3, refuse: str | None = None,  # noqa: F811
             refuse_every: int = 0, tag: int = 1) -> object:
    """``n`` one-image studies received one second apart from ``start``; returns the next start."""
    with sessions.begin() as s:
        for i in range(n):
            at = start + timedelta(seconds=i)
            if refuse and refuse_every and i % refuse_every == 0:
                _study(s, f"8.{tag}.{i}", refused=refuse, at=at)
            else:
                p = 0.9 if i % flag_every else 0.1  # two in three flagged, near the card's validation 0.69
                _study(s, f"8.{tag}.{i}", probability=p, at=at)
    return start + timedelta(seconds=n)


def test_reference_from_the_card_and_from_a_calibration() -> None:
    card = json.loads(SHIPPED_CARD.read_text())
    ref = reference_from(card)
    v = card["validation"]
    assert ref.flag_rate == (v["tp"] + v["fp"]) / (v["tp"] + v["fn"] + v["tn"] + v["fp"])
    assert ref.ood_rate == card["ood"]["validation_refusal_rate"] and "validation" in ref.source
    cal = {"validated": {"sensitivity": 0.9, "specificity": 0.8, "ood_refusal_rate": 0.02},
           "data": {"n_pneumonia": 100, "n_normal": 300}}
    site = reference_from(card, cal, "site-abc")
    assert site.flag_rate == (0.9 * 100 + 0.2 * 300) / 400 and site.ood_rate == 0.02 and "site-abc" in site.source


def test_limits_and_too_little_data() -> None:
    ref = Reference("r", 0.01, 0.01, 0.5)
    lim = DriftLimits(min_images=50)
    few = evaluate({"images": 20, "refused": 20, "ood_refused": 0, "scored": 0, "flagged": 0}, ref, lim)
    assert all(s["alarm"] is None for s in few)
    ok = evaluate({"images": 200, "refused": 3, "ood_refused": 2, "scored": 197, "flagged": 100}, ref, lim)
    assert [s["alarm"] for s in ok] == [False, False, False]
    low = evaluate({"images": 200, "refused": 0, "ood_refused": 0, "scored": 200, "flagged": 60}, ref, lim)
    assert low[2]["alarm"] is True and low[2]["limit"] < 0.5  # flag rate too low: the lower limit


def test_out_of_scope_images_raise_an_alarm_that_clears(sessions, caplog) -> None:  # noqa: F811
    ref = reference_from(json.loads(SHIPPED_CARD.read_text()))
    monitor = DriftMonitor(sessions, ref, DriftLimits(window_images=200, window_days=7, min_images=50))
    registry = CollectorRegistry()
    registry.register(MonitoringCollector(sessions, monitor))
    t = utcnow() - timedelta(hours=2)
    # Validation-like traffic: about two in three flagged, one OOD refusal in 200.
    t = _traffic(sessions, t, 200, refuse=OOD, refuse_every=200, tag=1)
    assert monitor.check() == []
    with sessions() as s:
        assert monitor.status(s)["alarm"] is False
    # A new room sends hands and adults: 120 of the last 200 images are refused.
    caplog.set_level(logging.WARNING, logger="pacsbridge.validation.drift")
    t = _traffic(sessions, t, 120, refuse=HAND, refuse_every=2, tag=2)
    t = _traffic(sessions, t, 60, refuse=OOD, refuse_every=1, tag=3)
    fired = monitor.check()
    assert "drift_alarm:refusal_rate" in fired and "drift_alarm:ood_score" in fired
    assert monitor.check() == []  # one event per alarm, not one per check
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(fired) and any("refusal_rate: window" in w and "limit" in w for w in warnings)
    with sessions() as s:
        status = monitor.status(s)
        details = list(s.scalars(select(Event.detail).where(Event.kind == "drift_alarm")))
    assert status["alarm"] is True
    refusal = next(x for x in status["signals"] if x["name"] == "refusal_rate")
    assert refusal["alarm"] and refusal["since"] and refusal["value"] > refusal["limit"] > refusal["reference"]
    assert details and not any(f"8.{tag}." in d for d in details for tag in (1, 2, 3))  # no study UIDs
    metrics = generate_latest(registry).decode()
    assert 'pacsbridge_drift_alarm{signal="refusal_rate"} 1.0' in metrics
    assert 'pacsbridge_drift_alarm{signal="flag_rate"} 0.0' in metrics
    # In-scope traffic again: the window is back within its limits and the alarms clear by themselves.
    _traffic(sessions, t, 200, refuse=OOD, refuse_every=200, tag=4)
    cleared = monitor.check()
    assert sorted(cleared) == sorted(f.replace("alarm", "cleared") for f in fired)
    with sessions() as s:
        assert monitor.status(s)["alarm"] is False
    assert 'pacsbridge_drift_alarm{signal="refusal_rate"} 0.0' in generate_latest(registry).decode()


# -- over a real daemon ----------------------------------------------------------------------------
def _api(daemon, auth: dict[str, str], path: str) -> dict:  # noqa: ANN001
    r = httpx.get(f"{daemon.url}{path}", headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_adults_sent_to_a_running_daemon_raise_an_alarm_that_clears(tmp_path: Path) -> None:
    """A real `serve` (SQLite, 1 s monitoring) judging a window of 40 images: in-scope children, then
    adults (refused on their age), then children again.  The alarm is on /api/stats, /metrics, the
    audit trail and the log, with no patient data, and it clears by itself."""
    model = export_model(tmp_path / "model", threshold=0.0, name="drift-model")  # every scored image flagged
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["intended_use"] = {"age_years": {"min": 1, "max_exclusive": 6, "label": "1-5 y"}}
    card["validation"] = {"tp": 60, "fp": 40, "tn": 0, "fn": 0}  # reference flag rate 1.0, as this model flags all
    card["ood"] = {"validation_refusal_rate": 0.01}
    card_path.write_text(json.dumps(card))
    src = tmp_path / "in"

    def batch(kind: str, n: int, birth: str) -> list[Path]:
        return [reuid(variant(tmp_path, f"{kind}{i}-0", PatientBirthDate=birth), src / f"{kind}{i}.dcm")
                for i in range(n)]

    children, adults, again = batch("child", 30, "20000301"), batch("adult", 30, "19400305"), batch("back", 40, "20000301")
    data = tmp_path / "data"
    data.mkdir()
    db = _sessions(data)
    daemon = Daemon(data, model, PACSBRIDGE_DRIFT_WINDOW_IMAGES="40", PACSBRIDGE_DRIFT_MIN_IMAGES="20",
                    PACSBRIDGE_MONITOR_INTERVAL_S="1")
    try:
        auth = daemon.token("physicist", "monitor")
        daemon.send(*children)
        _wait_scored(db, 30)
        time.sleep(2.5)  # two monitoring rounds over in-scope traffic
        drift = _api(daemon, auth, "/api/stats")["drift"]
        assert drift["alarm"] is False and {s["name"] for s in drift["signals"]} >= {"refusal_rate", "flag_rate"}
        assert all(s["limit"] is not None for s in drift["signals"] if s["name"] != "ood_score"), drift

        sent = time.monotonic()
        daemon.send(*adults)  # one association, 30 images
        drift = wait_until(lambda: (lambda d: d if d["alarm"] else None)(_api(daemon, auth, "/api/stats")["drift"]),
                           60, "a drift alarm on /api/stats within a minute of the adults")
        print(f"drift alarm on /api/stats {time.monotonic() - sent:.1f} s after the adults began to arrive")
        refusal = next(s for s in drift["signals"] if s["name"] == "refusal_rate")
        assert refusal["alarm"] and refusal["value"] > refusal["limit"] > refusal["reference"] and refusal["since"]
        metrics = httpx.get(f"{daemon.url}/metrics", headers=auth, timeout=30).text
        assert 'pacsbridge_drift_alarm{signal="refusal_rate"} 1.0' in metrics
        warning = wait_until(lambda: next((line for line in daemon.logs().splitlines()
                                           if "WARNING" in line and "refusal_rate" in line), None), 10, "the WARNING")
        assert "limit" in warning and "Test^Patient" not in warning and "TEST-PATIENT" not in warning

        daemon.send(*again)
        wait_until(lambda: not _api(daemon, auth, "/api/stats")["drift"]["alarm"], 120, "the alarm to clear")
        events = subprocess.run([sys.executable, "-m", "pacsbridge", "events", "--json"], env=daemon.env, cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert events.returncode == 0, events.stderr
        kinds = [e["kind"] for e in json.loads(events.stdout)]
        assert kinds.count("drift_alarm") >= 1 and kinds.count("drift_cleared") == kinds.count("drift_alarm")
    finally:
        assert daemon.stop() == 0, daemon.logs()[-3000:]
