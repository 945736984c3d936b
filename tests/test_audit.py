"""Audit reads of negatives: the deterministic draw within its fraction and the day's cap, never twice;
the priority band below every flag; the blinded read over the API (item, instances, history,
heatmap) until completion; UPS shows audits as LOW quality-audit steps without a score; the
sensitivity estimate from audit reads on a scenario whose truth is known; a real daemon; the page
in headless Chromium.  On SQLite and on the real PostgreSQL."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from dicom_support import database_url_for, migrated_sessions_for
from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user
from pacsbridge.dicom.ups_dataset import build_ups_dataset
from pacsbridge.dicom.ups_scp import load_records
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance, InstanceState, Prediction, Study, WorklistItem, utcnow
from pacsbridge.validation.audit_estimate import audit_sensitivity
from pacsbridge.validation.live import live_stats
from pacsbridge.validation.ris_labels import import_labels, match_labels
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.audit import audit_draw
from pacsbridge.worklist.items import WorklistUpdater, list_worklist
from pipeline_support import add_instance, export_model, reuid, sample_file, synthetic_chest

FRACTION = 0.25
ANNA = lifecycle.Actor("anna", "radiologist")


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path: Path):
    yield from migrated_sessions_for(request.param, tmp_path / "audit.db")


def _scored(sessions, uid: str, p: float, at: datetime, *, n: int = 1, shadow: bool = False,
            spool: Path | None = None, source: Path | None = None) -> int:
    """A study with image number ``n`` scored ``p`` (threshold 0.5) at ``at``; returns the instance id."""
    iid = add_instance(sessions, spool or Path("/nonexistent"), source, sop_uid=f"{uid}.{n}", study_uid=uid,
                       received_at=at - timedelta(seconds=5))
    with sessions.begin() as s:
        s.get(Instance, iid).state = InstanceState.PREDICTED.value
        s.add(Prediction(instance_id=iid, probability=p, positive=p >= 0.5, threshold=0.5, model_id="m",
                         weights_sha256="ab" * 32, created_at=at, shadow=shadow))
    return iid


def _uids(prefix: str, n: int, drawn: bool) -> list[str]:
    """``n`` Study Instance UIDs under ``prefix`` that are (or are not) drawn at FRACTION."""
    out, j = [], 0
    while len(out) < n:
        uid = f"{prefix}.{j}"
        if (audit_draw(uid) < FRACTION) == drawn:
            out.append(uid)
        j += 1
    return out


def _items(sessions) -> dict[str, tuple[str, str, float]]:
    """Study UID -> (kind, status, priority) of every item."""
    with sessions() as s:
        return {uid: (k, st, p) for uid, k, st, p in s.execute(
            select(Study.study_instance_uid, WorklistItem.kind, WorklistItem.status, WorklistItem.priority)
            .join(Study, Study.id == WorklistItem.study_id))}


def test_draw_is_a_hash_within_its_fraction() -> None:
    uids = [f"1.2.826.0.1.3680043.10.7.{i}" for i in range(4000)]
    assert [audit_draw(u) for u in uids[:50]] == [audit_draw(u) for u in uids[:50]]
    assert all(0.0 <= audit_draw(u) < 1.0 for u in uids)
    share = sum(audit_draw(u) < 0.02 for u in uids) / len(uids)
    sd = (0.02 * 0.98 / len(uids)) ** 0.5
    assert abs(share - 0.02) < 3 * sd, share  # the hash behaves like a fair coin of weight audit_fraction


def test_choice_deterministic_capped_never_twice_and_below_flags(sessions) -> None:
    now = utcnow().replace(hour=12)
    day1 = now - timedelta(minutes=30)
    drawn, skipped = _uids("1.2.826.0.1.91", 8, True), _uids("1.2.826.0.1.91", 20, False)
    for uid in drawn + skipped:
        _scored(sessions, uid, 0.1, day1)
    _scored(sessions, "1.2.826.0.1.90.1", 0.9, day1)  # a flag
    shadow = _uids("1.2.826.0.1.95", 1, True)[0]  # drawn, but scored in shadow mode
    _scored(sessions, shadow, 0.1, day1, shadow=True)
    updater = WorklistUpdater(sessions, 240, audit_fraction=FRACTION, audit_max_per_day=5)
    updater.refresh(now=now)
    items = _items(sessions)
    audits = sorted(uid for uid, (kind, _, _) in items.items() if kind == "audit")
    assert len(audits) == 5 and set(audits) <= set(drawn)  # the cap, and only drawn studies
    assert items["1.2.826.0.1.90.1"][0] == "flag"
    assert shadow not in items
    assert min(p for k, _, p in items.values() if k == "flag") > max(p for k, _, p in items.values() if k == "audit")
    with sessions() as s:
        decisions = dict(s.execute(select(Study.study_instance_uid, Study.audit_decision)).all())
        rows = list_worklist(s, now=now)
    assert sorted(u for u in drawn if decisions[u] == "capped") == sorted(set(drawn) - set(audits))
    assert all(decisions[u] is None for u in skipped)
    assert rows[0]["kind"] == "flag" and {r["kind"] for r in rows[1:]} == {"audit"}

    # Again, a fresh updater (a restart), and the next day: nothing is drawn twice, capped stays capped,
    # also when a capped study gets another negative image (a resend cannot game the draw).
    capped = next(u for u in drawn if decisions[u] == "capped")
    WorklistUpdater(sessions, 240, audit_fraction=FRACTION, audit_max_per_day=5).refresh(now=now)
    assert _items(sessions) == items
    tomorrow = now + timedelta(days=1)
    _scored(sessions, capped, 0.2, tomorrow - timedelta(minutes=1), n=2)
    fresh = _uids("1.2.826.0.1.96", 1, True)[0]
    _scored(sessions, fresh, 0.1, tomorrow - timedelta(minutes=1))
    pending = _uids("1.2.826.0.1.94", 1, True)[0]  # drawn, but its second image still waits for the model
    _scored(sessions, pending, 0.1, tomorrow - timedelta(minutes=10))
    add_instance(sessions, Path("/nonexistent"), None, sop_uid=pending + ".2", study_uid=pending)
    updater.refresh(now=tomorrow - timedelta(minutes=5))
    assert pending not in _items(sessions)
    with sessions.begin() as s:  # ... then that image is refused (out of scope): the study is scored negative
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == pending + ".2")).one()
        inst.state, inst.updated_at = InstanceState.NOT_ANALYSED.value, tomorrow - timedelta(minutes=2)
    updater.refresh(now=tomorrow)
    later = _items(sessions)
    assert capped not in later and later[fresh][0] == "audit" and later[pending][0] == "audit"
    assert {u: v for u, v in later.items() if u in items} == {
        u: (k, st, p) for u, (k, st, p) in later.items() if u in items}

    # A positive image for an audited study: the study is no longer negative, its item becomes a flag.
    promoted = audits[0]
    _scored(sessions, promoted, 0.8, tomorrow, n=3)
    updater.refresh(now=tomorrow)
    kind, status, priority = _items(sessions)[promoted]
    assert (kind, status) == ("flag", "scheduled") and priority > 0
    with sessions() as s:
        row = next(r for r in list_worklist(s, now=tomorrow) if r["study_instance_uid"] == promoted)
    assert row["probability"] == 0.8 and row["blinded"] is False


def test_audit_off_and_audit_ageing(sessions) -> None:
    now = utcnow()
    uid = _uids("1.2.826.0.1.97", 1, True)[0]
    _scored(sessions, uid, 0.1, now - timedelta(hours=10))
    WorklistUpdater(sessions, 240).refresh(now=now)  # audit_fraction 0: off
    assert _items(sessions) == {}
    updater = WorklistUpdater(sessions, 240, audit_fraction=FRACTION, audit_max_per_day=5)
    updater.refresh(now=now - timedelta(hours=9, minutes=59))
    first = _items(sessions)[uid][2]
    updater.refresh(now=now)  # waited past the maximum: it ages, and stays below every flag
    aged = _items(sessions)[uid][2]
    assert first < aged < 0


def _api(sessions, tmp_path: Path):
    spool = tmp_path / "spool"
    src = tmp_path / "syn.dcm"
    synthetic_chest(3, study_uid="9").save_as(src, enforce_file_format=True)
    at = utcnow() - timedelta(minutes=5)
    uid = _uids("1.2.826.0.1.98", 1, True)[0]
    audit_iid = _scored(sessions, uid, 0.23, at, spool=spool, source=src)
    _scored(sessions, "1.2.826.0.1.90.7", 0.9, at, spool=spool, source=src)
    WorklistUpdater(sessions, 240, audit_fraction=FRACTION, audit_max_per_day=5).refresh()
    with sessions.begin() as s:
        token = create_user(s, "anna", "radiologist")[1]
    client = TestClient(create_app(sessions, claim_timeout_s=600, spool_dir=spool))
    client.headers["Authorization"] = f"Bearer {token}"
    return client, uid, audit_iid


def test_blinded_until_completed_over_the_api(sessions, tmp_path: Path) -> None:
    client, uid, audit_iid = _api(sessions, tmp_path)
    rows = client.get("/api/worklist").json()
    assert [r["kind"] for r in rows] == ["flag", "audit"]
    flag, audit = rows
    assert flag["probability"] == 0.9 and flag["blinded"] is False
    assert audit["probability"] is None and audit["blinded"] is True and audit["study_instance_uid"] == uid
    assert [r["kind"] for r in client.get("/api/worklist?kind=audit").json()] == ["audit"]
    assert [r["kind"] for r in client.get("/api/worklist?kind=flag").json()] == ["flag"]
    assert len(client.get("/api/worklist?kind=all").json()) == 2
    assert client.get("/api/worklist?kind=maybe").status_code == 422

    def hidden(item: dict) -> None:
        assert item["probability"] is None and item["blinded"] is True and item["heatmap_available"] is False
        assert [(i["probability"], i["positive"], i["threshold"]) for i in item["instances"]] == [(None, None, None)]
        assert not any("%" in h["text"] for h in item["history"]), item["history"]
    hidden(client.get(f"/api/worklist/{audit['id']}").json())
    assert client.get(f"/api/instances/{audit_iid}/image.png?overlay=heatmap").status_code == 403
    assert client.get(f"/api/instances?study_instance_uid={uid}").json()[0]["probability"] is None
    assert client.get(f"/api/instances/{audit_iid}/image.png").status_code == 200  # the picture itself is shown
    hidden(client.post(f"/api/worklist/{audit['id']}/claim").json())
    hidden(client.post(f"/api/worklist/{audit['id']}/release").json())
    client.post(f"/api/worklist/{audit['id']}/claim")
    done = client.post(f"/api/worklist/{audit['id']}/complete", json={"finding": "pneumonia"}).json()
    assert done["blinded"] is False and done["probability"] == 0.23 and done["kind"] == "audit"
    assert done["instances"][0]["probability"] == 0.23
    assert any("23%" in h["text"] for h in done["history"])
    assert client.get(f"/api/instances/{audit_iid}/image.png?overlay=heatmap").status_code == 404  # no model here
    assert client.get(f"/api/instances?study_instance_uid={uid}").json()[0]["probability"] == 0.23
    stats = client.get("/api/stats").json()
    assert stats["models"][0]["audit"] == {"sampled": 1, "completed": 1, "pneumonia": 1}
    assert stats["models"][0]["completed"] == {"pneumonia": 0, "no_pneumonia": 0, "other": 0}  # not a flag read


def test_ups_shows_audits_as_low_quality_audit_steps(sessions, tmp_path: Path) -> None:
    client, uid, _ = _api(sessions, tmp_path)
    with sessions() as s:
        items = list(s.scalars(select(WorklistItem).order_by(WorklistItem.priority.desc())))
        flag_ds, audit_ds = (build_ups_dataset(r) for r in load_records(s, items))
    assert audit_ds.ScheduledProcedureStepPriority == "LOW"
    assert "Quality audit" in audit_ds.ProcedureStepLabel and "p=" not in audit_ds.ProcedureStepLabel
    assert len(audit_ds.ScheduledProcessingParametersSequence) == 0  # no probability while blinded
    assert "pneumonia suspected" in flag_ds.ProcedureStepLabel
    assert len(flag_ds.ScheduledProcessingParametersSequence) == 1


def test_sensitivity_from_audits_on_a_known_truth(sessions, tmp_path: Path) -> None:
    """400 studies, 80 pneumonia; the model flags 64 of them (true sensitivity 0.8) and 30 normals.
    Audits at 25 % of the 306 negatives, every item read with the truth through the life cycle."""
    at = utcnow() - timedelta(hours=2)
    truth: dict[str, bool] = {}
    for i in range(400):
        uid = f"1.2.826.0.1.99.{i}"
        pneumonia, flagged = i < 80, i < 64 or 80 <= i < 110
        truth[uid] = pneumonia
        _scored(sessions, uid, 0.8 if flagged else 0.2, at)
    WorklistUpdater(sessions, 240, audit_fraction=FRACTION, audit_max_per_day=1000).refresh()
    with sessions.begin() as s:
        items = s.execute(select(WorklistItem.id, Study.study_instance_uid, WorklistItem.kind)
                          .join(Study, Study.id == WorklistItem.study_id)).all()
    for iid, uid, _ in items:
        with sessions.begin() as s:
            lifecycle.claim(s, iid, ANNA, now=utcnow(), claim_timeout_s=600)
            lifecycle.complete(s, iid, ANNA, finding="pneumonia" if truth[uid] else "no_pneumonia", now=utcnow())
    audited = [uid for _, uid, kind in items if kind == "audit"]
    negatives = [u for u in truth if not (int(u.rsplit(".", 1)[1]) < 64 or 80 <= int(u.rsplit(".", 1)[1]) < 110)]
    assert len(negatives) == 306 and sorted(audited) == sorted(u for u in negatives if audit_draw(u) < FRACTION)
    k = sum(truth[u] for u in audited)
    with sessions() as s:
        [m] = live_stats(s)["models"]
    assert m["audit"] == {"sampled": len(audited), "completed": len(audited), "pneumonia": k}
    assert m["studies"] == {"flagged": 94, "negative": 306}
    sens = m["sensitivity"]
    expected = 64 / (64 + 306 * k / len(audited))  # TP / (TP + audit pneumonias / effective fraction)
    assert sens["method"] == "audit_estimate" and sens["value"] == round(expected, 4)
    assert sens["ci"][0] < 0.8 < sens["ci"][1], sens  # the interval holds the truth
    assert sens == audit_sensitivity(94, 94, 64, 306, len(audited), k)
    assert m["ppv"] == round(64 / 94, 4)

    # Full RIS labels: no estimate, the direct figure (exactly the truth).
    csv = tmp_path / "ris.csv"
    csv.write_text("study_instance_uid,finding\n" + "".join(
        f"{u},{'pneumonia' if t else 'no_pneumonia'}\n" for u, t in truth.items()))
    with sessions.begin() as s:
        assert not import_labels(s, csv).bad
    with sessions.begin() as s:
        match_labels(s)
    with sessions() as s:
        [m] = live_stats(s)["models"]
    assert (m["sensitivity"]["method"], m["sensitivity"]["value"]) == ("ris_labels", 0.8)


def test_estimator_edges() -> None:
    assert audit_sensitivity(10, 10, 8, 100, 0, 0) is None  # no audit read yet
    assert audit_sensitivity(10, 0, 0, 100, 5, 0) is None  # flags exist but none read
    none_missed = audit_sensitivity(10, 10, 8, 100, 50, 0)
    assert none_missed["value"] == 1.0 and none_missed["ci"][1] == 1.0 and none_missed["ci"][0] < 1.0
    # One audit pneumonia in 2 reads of 100 negatives stands for 50 misses: a wide interval.
    wide = audit_sensitivity(10, 10, 10, 100, 2, 1)
    assert wide["value"] == round(10 / 60, 4) and wide["ci"][1] - wide["ci"][0] > 0.4


# -- a real daemon -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_daemon_audits_negatives_blinded_within_the_cap(backend, tmp_path: Path) -> None:
    from test_daemon_pipeline import Daemon

    data = tmp_path / "data"
    data.mkdir()
    for url in database_url_for(backend, data / "pacsbridge.db"):
        model = export_model(tmp_path / "model", threshold=1.0, name="audit-model")  # every image negative
        src = tmp_path / "in"
        src.mkdir()
        files = [reuid(sample_file("RG1_UNCR.dcm"), src / f"a{i}.dcm", study_uid=f"1.2.826.0.1.3680043.10.55.{i}")
                 for i in range(3)]
        daemon = Daemon(data, model, PACSBRIDGE_DATABASE_URL=url, PACSBRIDGE_AGE_GATE="false",
                        PACSBRIDGE_OOD_GATE="false", PACSBRIDGE_AUDIT_FRACTION="1.0", PACSBRIDGE_AUDIT_MAX_PER_DAY="2")
        sessions = make_sessionmaker(make_engine(url))
        try:
            daemon.send(*files)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                with sessions() as s:
                    decided = s.scalar(select(func.count()).where(Study.audit_decision.is_not(None)))
                if decided == 3:
                    break
                time.sleep(0.2)
            assert decided == 3, daemon.logs()[-3000:]
            auth = daemon.token()
            rows = httpx.get(f"{daemon.url}/api/worklist", headers=auth, timeout=10).json()
            assert len(rows) == 2 and all(r["kind"] == "audit" and r["blinded"] and r["probability"] is None
                                          for r in rows)
            detail = httpx.get(f"{daemon.url}/api/worklist/{rows[0]['id']}", headers=auth, timeout=10).json()
            assert detail["heatmap_available"] is False and detail["instances"][0]["probability"] is None
            stats = httpx.get(f"{daemon.url}/api/stats", headers=auth, timeout=30).json()
            assert stats["models"][0]["audit"] == {"sampled": 2, "completed": 0, "pneumonia": 0}
        finally:
            assert daemon.stop() == 0, daemon.logs()[-3000:]
        with sessions() as s:
            assert sorted(s.scalars(select(Study.audit_decision))) == ["capped", "sampled", "sampled"]


# -- the page ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_page_shows_no_score_until_the_audit_is_completed(tmp_path: Path, browser) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline_support import sqlite_sessions

    sessions = sqlite_sessions(tmp_path)
    spool = tmp_path / "spool"
    src = tmp_path / "syn.dcm"
    synthetic_chest(5, study_uid="9").save_as(src, enforce_file_format=True)
    at = utcnow() - timedelta(minutes=5)
    _scored(sessions, _uids("1.2.826.0.1.98", 1, True)[0], 0.23, at, spool=spool, source=src)
    _scored(sessions, "1.2.826.0.1.90.7", 0.9, at, spool=spool, source=src)
    WorklistUpdater(sessions, 240, audit_fraction=FRACTION, audit_max_per_day=5).refresh()
    with sessions.begin() as s:
        token = create_user(s, "anna", "radiologist")[1]
        audit_id = s.scalar(select(WorklistItem.id).where(WorklistItem.kind == "audit"))
    server = HttpServer(create_app(sessions, spool_dir=spool, claim_timeout_s=600), "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        wait = WebDriverWait(browser, 60)
        browser.get(url + "/")
        wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys(token)
        browser.find_element(By.ID, "signin").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")) == 2)
        row = browser.find_element(By.CSS_SELECTOR, f"#worklist tbody tr[data-id='{audit_id}']")
        assert "Quality audit (blinded)" in row.text and "%" not in row.text, row.text
        row.click()
        wait.until(EC.visibility_of_element_located((By.ID, "item-view")))
        wait.until(lambda d: "Quality audit (blinded)" in d.find_element(By.ID, "facts").text)
        facts = browser.find_element(By.ID, "facts").text
        assert "%" not in facts, facts
        assert "%" not in browser.find_element(By.ID, "instances").text
        assert browser.find_element(By.ID, "heatmap").get_attribute("disabled") is not None
        assert "23%" not in browser.find_element(By.ID, "history").text
        browser.find_element(By.ID, "claim").click()
        wait.until(EC.visibility_of_element_located((By.ID, "complete-form")))
        browser.find_element(By.CSS_SELECTOR, "input[name='finding'][value='no_pneumonia']").click()
        browser.find_element(By.ID, "complete").click()
        # Shown once the read is done: in the message, and on the item.
        wait.until(lambda d: "the AI had scored this study 23%" in d.find_element(By.ID, "message").text)
        browser.execute_script(f"openItem({audit_id})")
        wait.until(lambda d: "23%" in d.find_element(By.ID, "facts").text)
        assert "quality audit" in browser.find_element(By.ID, "facts").text
    finally:
        server.stop()


from test_web_page import browser  # noqa: E402,F401 - the headless Chromium fixture


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_0013_existing_items_are_flags_and_downgrade_keeps_rows(backend, tmp_path: Path) -> None:
    from sqlalchemy import text

    for url in database_url_for(backend, tmp_path / "m.db"):
        engine = make_engine(url)
        try:
            migrations.upgrade(engine, "0009")
            t = "2026-01-02 03:04:05+00:00"
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2', :t)"),
                             {"t": t})
                conn.execute(text(
                    "INSERT INTO worklist_items (id, study_id, open_study_id, ups_uid, priority, probability, status, "
                    "first_positive_at, created_at, updated_at) VALUES (1, 1, 1, '2.25.1', 0.9, 0.9, 'scheduled', "
                    ":t, :t, :t)"), {"t": t})
            migrations.upgrade(engine)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT kind FROM worklist_items")).scalars().all() == ["flag"]
                assert conn.execute(text("SELECT audit_decision FROM studies")).scalars().all() == [None]
            migrations.downgrade(engine, "0009")
            with engine.connect() as conn:  # no table copy: the study and its item are still there
                assert conn.execute(text("SELECT count(*) FROM worklist_items")).scalar() == 1
                assert conn.execute(text("SELECT count(*) FROM studies")).scalar() == 1
        finally:
            engine.dispose()
