"""The API side of the reading room and the admin desk: every worklist write answers with the same
item as GET (heatmap_available included), viewer links, the admin's audit trail (GET /api/events),
instances filtered by date, the history in plain words, and the viewer_url setting."""

from __future__ import annotations

import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from pacsbridge.api.app import create_app
from pacsbridge.config import ConfigError, load_settings
from pacsbridge.store.events import parse_since
from pacsbridge.store.models import Event, Instance, OutboxEntry, Prediction, Study, utcnow
from pacsbridge.store.records import record_event
from pacsbridge.worklist.viewer import check_template, viewer_link
from test_api import _fill

VIEWER = "https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_instance_uid}&acc={accession_number}"


@pytest.fixture
def desk(tmp_path: Path, monkeypatch):
    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{tmp_path / 'desk.db'}")
    migrations.upgrade(engine)
    sessions, _, headers, clock, _ = _fill(make_sessionmaker(engine), tmp_path)
    # A model and a heatmap module: heatmap_available is true (the module is a stand-in; no image is drawn here).
    monkeypatch.setitem(sys.modules, "pacsbridge.model.heatmap", types.ModuleType("pacsbridge.model.heatmap"))
    app = create_app(sessions, claim_timeout_s=600, spool_dir=tmp_path / "spool", clock=clock, model=object(),
                     viewer_url=VIEWER)
    yield sessions, TestClient(app), headers, clock
    engine.dispose()


def _first_item(client, h) -> dict:
    return client.get("/api/worklist", headers=h["anna"]).json()[0]


def test_every_write_answers_with_the_item_as_get_shows_it(desk) -> None:
    sessions, client, h, _ = desk
    item = _first_item(client, h)
    iid = item["id"]
    get = client.get(f"/api/worklist/{iid}", headers=h["anna"]).json()
    assert get["heatmap_available"] is True
    for path, body, who in [("claim", None, "anna"), ("release", None, "anna"), ("claim", None, "anna"),
                            ("complete", {"finding": "pneumonia"}, "anna")]:
        r = client.post(f"/api/worklist/{iid}/{path}", json=body, headers=h[who])
        assert r.status_code == 200, r.text
        answer = r.json()
        again = client.get(f"/api/worklist/{iid}", headers=h[who]).json()
        assert set(answer) == set(again), (path, set(again) ^ set(answer))
        assert answer["heatmap_available"] is True and answer["viewer_url"] == again["viewer_url"]
        assert answer["status"] == again["status"]
    other = client.get("/api/worklist", headers=h["anna"]).json()[0]["id"]
    r = client.post(f"/api/worklist/{other}/cancel", json={"reason": "duplicate order"}, headers=h["root"])
    assert r.status_code == 200 and r.json()["heatmap_available"] is True and r.json()["status"] == "canceled"


def test_viewer_url_in_list_and_detail_encoded_and_null_when_unset(desk, tmp_path: Path) -> None:
    sessions, client, h, _ = desk
    with sessions.begin() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == "2.1")).one()
        study.accession_number = "A 1&x=2"  # must not change the link's shape
    items = client.get("/api/worklist", headers=h["anna"]).json()
    by_uid = {it["study_instance_uid"]: it for it in items}
    assert by_uid["2.1"]["viewer_url"] == ("https://pacs.example.org/ohif/viewer?StudyInstanceUIDs=2.1"
                                           "&acc=A%201%26x%3D2")
    detail = client.get(f"/api/worklist/{by_uid['2.1']['id']}", headers=h["anna"]).json()
    assert detail["viewer_url"] == by_uid["2.1"]["viewer_url"]
    plain = TestClient(create_app(sessions))
    assert plain.get("/api/worklist", headers=h["anna"]).json()[0]["viewer_url"] is None
    assert plain.get(f"/api/worklist/{by_uid['2.1']['id']}", headers=h["anna"]).json()["viewer_url"] is None


def test_viewer_template_checks() -> None:
    assert viewer_link("http://o:8042/stone-webviewer/index.html?study={study_instance_uid}", "1.2.3", None) \
        == "http://o:8042/stone-webviewer/index.html?study=1.2.3"
    assert viewer_link("https://p/v?acc={accession_number}", "1.2", None) is None  # the value it needs is missing
    assert viewer_link("", "1.2", "A") is None
    for bad, why in [("javascript:alert(1)//{study_instance_uid}", "http"), ("https://p/{patient_id}", "unknown"),
                     ("https://p/static", "needs"), ("https://p/{study_instance_uid", "template")]:
        with pytest.raises(ValueError, match=why):
            check_template(bad)


def test_viewer_url_setting_is_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('viewer_url = "https://pacs/viewer?uid={study_uid}"\n')
    with pytest.raises(ConfigError, match=r"viewer_url .*unknown placeholder \{study_uid\}"):
        load_settings(cfg)
    cfg.write_text('viewer_url = "http://orthanc:8042/ohif/viewer?StudyInstanceUIDs={study_instance_uid}"\n')
    assert load_settings(cfg).viewer_url.endswith("={study_instance_uid}")


def test_events_route_admin_only_with_filters_and_a_bounded_limit(desk) -> None:
    sessions, client, h, clock = desk
    old = clock.now - timedelta(days=3)
    with sessions.begin() as s:
        s.add(Event(at=old, kind="association_rejected", level="warning", detail="calling AE title not in "
                    "allowed_calling_aes", peer="ROGUE@10.0.0.9:4000"))
    record_event(sessions, "store_rejected", "status 0xA900: image SOP class but the dataset has no Pixel Data",
                 level="warning", peer="CR1@10.0.0.8:4001")
    item = _first_item(client, h)["id"]
    client.post(f"/api/worklist/{item}/claim", headers=h["anna"])
    for who in ("anna", "watch"):
        assert client.get("/api/events", headers=h[who]).status_code == 403
    assert client.get("/api/events").status_code == 401
    rows = client.get("/api/events", headers=h["root"]).json()
    assert {"at", "kind", "level", "actor", "detail"} <= set(rows[0])
    assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
    kinds = {r["kind"] for r in rows}
    assert {"association_rejected", "store_rejected", "worklist_claim", "user_created"} <= kinds
    only = client.get("/api/events?kind=store_rejected", headers=h["root"]).json()
    assert [r["kind"] for r in only] == ["store_rejected"] and only[0]["peer"] == "CR1@10.0.0.8:4001"
    recent = client.get("/api/events?since=24h", headers=h["root"]).json()
    assert "association_rejected" not in {r["kind"] for r in recent} and len(recent) == len(rows) - 1
    iso = client.get("/api/events?since=" + (old - timedelta(hours=1)).isoformat().replace("+", "%2B"),
                     headers=h["root"]).json()
    assert len(iso) == len(rows)
    assert len(client.get("/api/events?limit=2", headers=h["root"]).json()) == 2
    assert client.get("/api/events?limit=1001", headers=h["root"]).status_code == 422
    assert client.get("/api/events?limit=0", headers=h["root"]).status_code == 422
    r = client.get("/api/events?since=yesterday", headers=h["root"])
    assert r.status_code == 422 and "90m, 24h, 7d" in r.json()["detail"]


def test_instances_filtered_by_date(desk) -> None:
    sessions, client, h, clock = desk
    with sessions.begin() as s:
        s.scalars(select(Instance).where(Instance.sop_instance_uid == "1.9")).one().received_at = \
            clock.now - timedelta(days=5)
    every = client.get("/api/instances", headers=h["root"]).json()
    assert len(every) == 5
    recent = client.get("/api/instances?since=2d", headers=h["root"]).json()
    assert len(recent) == 4 and "1.9" not in {r["sop_instance_uid"] for r in recent}
    until = (clock.now - timedelta(days=2)).isoformat().replace("+", "%2B")
    old = client.get(f"/api/instances?until={until}&state=not_analysed", headers=h["root"]).json()
    assert [r["sop_instance_uid"] for r in old] == ["1.9"] and "HAND" in old[0]["reason"]
    assert client.get("/api/instances?since=soon", headers=h["root"]).status_code == 422


def test_history_in_plain_words(desk) -> None:
    sessions, client, h, clock = desk
    items = client.get("/api/worklist", headers=h["anna"]).json()
    iid = next(it["id"] for it in items if it["study_instance_uid"] == "2.1")
    with sessions.begin() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == "1.1")).one()
        inst.calling_ae = "CR_ROOM2"
        pred = s.scalars(select(Prediction).where(Prediction.instance_id == inst.id)).one()
        s.add(OutboxEntry(prediction_id=pred.id, destination="reading-pacs", object="sr", state="sent",
                          attempts=1, sent_at=clock.now + timedelta(seconds=300)))
        s.add(OutboxEntry(prediction_id=pred.id, destination="ris", object="oru", state="dead", attempts=5,
                          last_error="connection refused", updated_at=clock.now + timedelta(seconds=305)))
    for path, who, body in [("claim", "anna", None), ("release", "root", None), ("claim", "boris", None),
                            ("complete", "boris", {"finding": "no_pneumonia"})]:
        clock.now += timedelta(seconds=30)
        assert client.post(f"/api/worklist/{iid}/{path}", json=body, headers=h[who]).status_code == 200
    history = client.get(f"/api/worklist/{iid}", headers=h["anna"]).json()["history"]
    texts = [e["text"] for e in history]
    assert texts[0] == "Image 1 received from CR_ROOM2"
    assert texts[1] == "Image 1 scored 95% by m (threshold 50%): flagged"
    assert texts[2] == "Put on the worklist at AI score 95%"
    assert texts[3:7] == ["Claimed by anna", "Released by root (it was claimed by anna): back on the list",
                          "Claimed by boris", "Completed by boris: no pneumonia"]
    assert "Forwarded the AI result (DICOM SR) of image 1 to reading-pacs" in texts
    assert "Could not forward the AI result (HL7 ORU) of image 1 to ris: connection refused" in texts
    assert all(e["at"] for e in history) and [e["at"] for e in history] == sorted(e["at"] for e in history)
    assert not any("->" in t or "in_progress" in t or "Test^" in t for t in texts)  # no developer text, no name


def test_parse_since_forms() -> None:
    now = utcnow()
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-12-01").isoformat() == "2026-12-01T00:00:00+00:00"
    assert parse_since("2026-12-01T20:00:00Z").isoformat() == "2026-12-01T20:00:00+00:00"
    with pytest.raises(ValueError, match="not a time"):
        parse_since("last week")


def test_worklist_command_gives_the_same_viewer_link(desk, tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    sessions, client, h, _ = desk
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(PACSBRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'desk.db'}", PACSBRIDGE_VIEWER_URL=VIEWER,
               PACSBRIDGE_DEFAULT_CONFIG=str(tmp_path / "none.toml"))
    r = subprocess.run([sys.executable, "-m", "pacsbridge", "worklist", "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cli = {it["id"]: it["viewer_url"] for it in json.loads(r.stdout)}
    api = {it["id"]: it["viewer_url"] for it in client.get("/api/worklist", headers=h["anna"]).json()}
    assert cli == api and all(v and v.startswith("https://pacs.example.org/") for v in cli.values())
    table = subprocess.run([sys.executable, "-m", "pacsbridge", "worklist"], env=env, capture_output=True,
                           text=True, timeout=120)
    head, first = table.stdout.splitlines()[:2]
    assert {"patient", "age", "accession"} <= set(head.split())
    assert "Test Patient2" in first and "61y" in first and "A2" in first and "STAT" in first


def test_event_counts_grow_with_new_events_and_match_a_fresh_count(tmp_path: Path) -> None:
    """The running totals (only new events are read on later scrapes) equal a count from scratch, and
    labels are fixed classes whatever the reason's text (an AE title a peer chose is never a label)."""
    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine, make_sessionmaker
    from pacsbridge.store.events import LOOKBACK_IDS, EventCounts

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    reasons = ["calling AE title not in allowed_calling_aes", "called AE title 'EVIL{i}' is not ours ('PACSBRIDGE')",
               "too many associations from 10.0.0.{i} (max_associations_per_peer = 8)", "TLS handshake failed: x",
               "something new {i}"]
    refusals = ["patient age 25 y is outside this model's intended use (0-17 y) [Patient's Age 025Y]",
                "body part HAND is not chest", "image unlike this model's training data (out-of-distribution "
                "score 9.10 > threshold 3.00): outside its intended use", "lateral view (View Position LL); the "
                "model reads frontal views", "pixel data could not be decoded: x"]
    counts = EventCounts()

    def add(n: int, start: int) -> None:
        for i in range(start, start + n):
            record_event(sessions, "association_rejected", reasons[i % 5].format(i=i), level="warning")
            record_event(sessions, "store_rejected" if i % 2 else "store_failed",
                         f"status 0x{0xA700 if i % 2 else 0xA900:04X}: x {i}", level="warning")
            record_event(sessions, "not_analysed", refusals[i % 5])
            record_event(sessions, "worklist_claim", "not counted")

    add(2 * LOOKBACK_IDS, 0)
    with sessions() as s:
        first = counts.read(s)
    add(LOOKBACK_IDS // 2 + 3, 1000)
    with sessions() as s:
        later, fresh = counts.read(s), EventCounts().read(s)
    assert later == fresh
    n = 2 * LOOKBACK_IDS + LOOKBACK_IDS // 2 + 3
    assert sum(later["associations_rejected"].values()) == n > sum(first["associations_rejected"].values())
    assert set(later["associations_rejected"]) == {"calling_ae_title", "called_ae_title", "too_many_from_peer",
                                                   "tls", "other"}
    assert set(later["stores_rejected"]) == {"0xA700", "0xA900"} and sum(later["stores_rejected"].values()) == n
    assert set(later["refusals"]) == {"age", "body_part", "ood", "view", "decode"}
    engine.dispose()
