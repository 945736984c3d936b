"""The HTTP API: Bearer tokens and roles on every route, the worklist life cycle over HTTP (claim,
409 for a second claimant, expiry, complete/release/cancel, events with the user), instances and
their rendered image, statistics, OpenAPI behind admin, and a real socket; on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from pacsbridge.api import render
from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user, revoke_user
from pacsbridge.store.models import Event, Instance, InstanceState, Prediction, Study, utcnow
from pacsbridge.worklist.items import WorklistUpdater
from pacsbridge.worklist.scheduler import worklist_job
from dicom_support import database_url_for
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pipeline_support import add_instance, sample_file, sqlite_sessions

OPEN_ROUTES = {"/healthz", "/readyz", "/", "/static", "/favicon.ico"}


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, tmp_path: Path):
    for url in database_url_for(request.param, tmp_path / "api.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        try:
            yield _fill(make_sessionmaker(engine), tmp_path)
        finally:
            engine.dispose()


def _fill(sessions, tmp_path: Path):
    sessions_ = sessions
    spool = tmp_path / "spool"
    t0 = utcnow() - timedelta(minutes=5)
    src = sample_file("RG1_UNCR.dcm")
    for i, (p, prio) in enumerate([(0.7, None), (0.95, None), (0.6, "STAT"), (0.2, None)]):
        iid = add_instance(sessions, spool, src, sop_uid=f"1.{i}", study_uid=f"2.{i}", received_at=t0,
                           requested_priority=prio)
        with sessions.begin() as s:
            s.get(Instance, iid).state = InstanceState.PREDICTED.value
            study = s.scalars(select(Study).where(Study.study_instance_uid == f"2.{i}")).one()
            study.patient_name, study.accession_number, study.patient_age = f"Test^Patient{i}", f"A{i}", "061Y"
            s.add(Prediction(instance_id=iid, probability=p, positive=p >= 0.5, threshold=0.5, model_id="m",
                             weights_sha256="0" * 64, decode_ms=40.0 + i, inference_ms=20.0, created_at=t0))
    refused = add_instance(sessions, spool, src, sop_uid="1.9", study_uid="2.9", received_at=t0,
                           state=InstanceState.NOT_ANALYSED.value)
    with sessions.begin() as s:
        s.get(Instance, refused).state_reason = "not a chest radiograph: BodyPartExamined is HAND"
    WorklistUpdater(sessions_, 240).refresh()
    tokens = {}
    with sessions.begin() as s:
        for name, role in [("anna", "radiologist"), ("boris", "radiologist"), ("root", "admin"),
                           ("watch", "monitor"), ("gone", "radiologist")]:
            tokens[name] = create_user(s, name, role)[1]
    with sessions.begin() as s:
        revoke_user(s, "gone")
    clock = Clock()
    app = create_app(sessions, claim_timeout_s=600, spool_dir=spool, clock=clock)
    client = TestClient(app)
    return sessions, client, {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}, clock, app


def _protected_routes(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        path = getattr(r, "path", "")
        if path in OPEN_ROUTES or path.startswith("/static"):
            continue
        for m in getattr(r, "methods", None) or ["GET"]:
            if m != "HEAD":
                out.append((m, path.replace("{item_id}", "1").replace("{instance_id}", "1")))
    return out


def test_every_route_but_health_needs_a_valid_token(env) -> None:
    sessions, client, h, _, app = env
    routes = _protected_routes(app)
    assert ("GET", "/api/worklist") in routes and ("POST", "/api/worklist/1/claim") in routes
    assert ("GET", "/metrics") in routes and ("GET", "/openapi.json") in routes and ("GET", "/docs") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, h["gone"]):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers.get("www-authenticate") == "Bearer"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/").status_code == 200 and "<html" in client.get("/").text.lower()


def test_revoking_stops_a_token_at_once(env) -> None:
    sessions, client, h, _, _ = env
    assert client.get("/api/me", headers=h["anna"]).json() == {"name": "anna", "role": "radiologist", "mode": "live"}
    with sessions.begin() as s:
        revoke_user(s, "anna")
    r = client.get("/api/me", headers=h["anna"])
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_roles(env) -> None:
    _, client, h, _, _ = env
    assert client.get("/api/worklist", headers=h["watch"]).status_code == 403
    assert "role monitor may not" in client.get("/api/worklist", headers=h["watch"]).json()["detail"]
    assert client.post("/api/worklist/1/claim", headers=h["watch"]).status_code == 403
    assert client.get("/metrics", headers=h["watch"]).status_code == 200
    assert client.get("/api/stats", headers=h["watch"]).status_code == 200
    assert client.get("/metrics", headers=h["anna"]).status_code == 403
    assert client.get("/openapi.json", headers=h["anna"]).status_code == 403
    assert client.get("/docs", headers=h["anna"]).status_code == 403
    assert client.post("/api/worklist/1/cancel", headers=h["anna"], json={"reason": "x"}).status_code == 403
    assert client.get("/metrics", headers=h["root"]).status_code == 200
    body = client.get("/metrics", headers=h["root"]).text
    assert "pacsbridge_instances_predicted_total 4.0" in body and "pacsbridge_worklist_items 3.0" in body


def test_openapi_lists_every_route_and_docs_page(env) -> None:
    _, client, h, _, app = env
    schema = client.get("/openapi.json", headers=h["root"]).json()
    api_routes = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
                  for m in r.methods}
    listed = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert api_routes == listed
    for path in ("/api/worklist", "/api/worklist/{item_id}", "/api/worklist/{item_id}/claim",
                 "/api/worklist/{item_id}/release", "/api/worklist/{item_id}/complete",
                 "/api/worklist/{item_id}/cancel", "/api/instances", "/api/instances/{instance_id}/image.png",
                 "/api/stats", "/metrics", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    docs = client.get("/docs", headers=h["root"])
    assert docs.status_code == 200 and "/api/worklist/{item_id}/claim" in docs.text
    assert "cdn" not in docs.text.lower()


def test_worklist_fields_and_order(env) -> None:
    _, client, h, _, _ = env
    rows = client.get("/api/worklist", headers=h["anna"]).json()
    assert [x["study_instance_uid"] for x in rows] == ["2.2", "2.1", "2.0"]  # STAT first, then by probability
    assert {"id", "status", "priority", "probability", "study_instance_uid", "accession_number", "patient_name",
            "patient_id", "patient_age", "study_date", "study_description", "modality", "received_at", "waiting_s",
            "claimed_by", "claim_expires_at", "finding"} <= set(rows[0])
    assert rows[0]["patient_name"] == "Test^Patient2" and rows[0]["accession_number"] == "A2"
    assert rows[0]["status"] == "scheduled" and rows[0]["modality"] == "CR" and 290 <= rows[0]["waiting_s"] <= 400
    assert client.get("/api/worklist?status=completed", headers=h["anna"]).json() == []
    assert len(client.get("/api/worklist?status=all", headers=h["anna"]).json()) == 3
    assert client.get("/api/worklist?status=bogus", headers=h["anna"]).status_code == 422
    assert [x["id"] for x in client.get("/api/worklist?limit=1&offset=1", headers=h["anna"]).json()] == [rows[1]["id"]]


def test_claim_conflict_complete_and_events_with_user(env) -> None:
    sessions, client, h, clock, _ = env
    item = client.get("/api/worklist", headers=h["anna"]).json()[0]["id"]
    r = client.post(f"/api/worklist/{item}/claim", headers=h["anna"])
    assert r.status_code == 200 and r.json()["status"] == "in_progress" and r.json()["claimed_by"] == "anna"
    first_expiry = r.json()["claim_expires_at"]
    r = client.post(f"/api/worklist/{item}/claim", headers=h["boris"])
    assert r.status_code == 409 and r.json()["holder"] == "anna" and r.json()["current"] == "in_progress"
    assert "anna" in r.json()["detail"]
    clock.now += timedelta(minutes=2)
    r = client.post(f"/api/worklist/{item}/claim", headers=h["anna"])  # renew
    assert r.status_code == 200 and r.json()["claim_expires_at"] > first_expiry
    listed = {x["id"]: x for x in client.get("/api/worklist", headers=h["boris"]).json()}
    assert listed[item]["claimed_by"] == "anna" and listed[item]["status"] == "in_progress"

    r = client.post(f"/api/worklist/{item}/complete", headers=h["boris"], json={"finding": "pneumonia"})
    assert r.status_code == 409 and r.json()["holder"] == "anna"
    r = client.post(f"/api/worklist/{item}/complete", headers=h["anna"], json={"finding": "maybe"})
    assert r.status_code == 422
    r = client.post(f"/api/worklist/{item}/complete", headers=h["anna"],
                    json={"finding": "pneumonia", "comment": "right lower lobe"})
    assert r.status_code == 200 and r.json()["status"] == "completed" and r.json()["finding"] == "pneumonia"
    assert item not in {x["id"] for x in client.get("/api/worklist", headers=h["anna"]).json()}
    r = client.post(f"/api/worklist/{item}/claim", headers=h["anna"])
    assert r.status_code == 409 and "is completed; cannot claim" in r.json()["detail"]

    detail = client.get(f"/api/worklist/{item}", headers=h["anna"]).json()
    assert [(e["kind"], e["actor"]) for e in detail["events"]] == [
        ("worklist_claim", "anna"), ("worklist_claim", "anna"), ("worklist_complete", "anna")]
    with sessions() as s:
        kinds = s.execute(select(Event.kind, Event.actor).where(Event.worklist_item_id == item)).all()
    assert ("worklist_complete", "anna") in kinds
    assert detail["instances"][0]["probability"] == pytest.approx(0.6)
    assert detail["instances"][0]["model_id"] == "m" and detail["instances"][0]["threshold"] == 0.5
    assert detail["instances"][0]["image_url"].endswith("/image.png")

    stats = client.get("/api/stats", headers=h["watch"]).json()["models"]
    [m] = stats
    assert (m["model_id"], m["scored"], m["flagged"]) == ("m", 4, 3)
    assert m["completed"]["pneumonia"] == 1 and m["ppv"] == 1.0 and m["receipt_to_completion_s"]["n"] == 1


def test_release_cancel_and_unknown_item(env) -> None:
    _, client, h, _, _ = env
    a, b = [x["id"] for x in client.get("/api/worklist", headers=h["anna"]).json()[:2]]
    assert client.post(f"/api/worklist/{a}/release", headers=h["anna"]).status_code == 409  # not claimed
    client.post(f"/api/worklist/{a}/claim", headers=h["anna"])
    assert client.post(f"/api/worklist/{a}/release", headers=h["boris"]).status_code == 409
    r = client.post(f"/api/worklist/{a}/release", headers=h["anna"])
    assert r.status_code == 200 and r.json()["status"] == "scheduled"
    assert client.post(f"/api/worklist/{b}/cancel", headers=h["root"], json={}).status_code == 422
    r = client.post(f"/api/worklist/{b}/cancel", headers=h["root"], json={"reason": "duplicate study"})
    assert r.status_code == 200 and r.json()["status"] == "canceled" and r.json()["cancel_reason"] == "duplicate study"
    assert client.post("/api/worklist/99999/claim", headers=h["anna"]).status_code == 404
    assert client.get("/api/worklist/99999", headers=h["anna"]).status_code == 404


def test_claim_expiry_returns_the_item(env) -> None:
    sessions, client, h, clock, _ = env
    item = client.get("/api/worklist", headers=h["anna"]).json()[0]["id"]
    assert client.post(f"/api/worklist/{item}/claim", headers=h["anna"]).status_code == 200
    updater = WorklistUpdater(sessions, 240)
    assert worklist_job(updater, sessions, now=clock.now + timedelta(seconds=599)) == 0
    assert worklist_job(updater, sessions, now=clock.now + timedelta(seconds=601)) == 1
    row = {x["id"]: x for x in client.get("/api/worklist", headers=h["boris"]).json()}[item]
    assert row["status"] == "scheduled" and row["claimed_by"] is None
    events = client.get(f"/api/worklist/{item}", headers=h["anna"]).json()["events"]
    assert [(e["kind"], e["actor"]) for e in events][-1] == ("worklist_claim_expired", "system")
    assert client.post(f"/api/worklist/{item}/claim", headers=h["boris"]).status_code == 200


def test_instances_list_and_image(env) -> None:
    _, client, h, _, _ = env
    rows = client.get("/api/instances", headers=h["root"]).json()
    assert len(rows) == 5
    refused = [r for r in rows if r["state"] == "not_analysed"]
    assert refused[0]["reason"].startswith("not a chest radiograph") and refused[0]["probability"] is None
    # A row recorded without the structured list: one reason, its code read from the text.
    assert refused[0]["reasons"] == [{"code": "body_part", "text": refused[0]["reason"]}]
    only = client.get("/api/instances?study_instance_uid=2.1", headers=h["anna"]).json()
    assert [(r["probability"], r["positive"]) for r in only] == [(0.95, True)]
    assert client.get("/api/instances?state=not_analysed", headers=h["anna"]).json()[0]["id"] == refused[0]["id"]
    assert client.get("/api/instances?state=failed", headers=h["anna"]).json() == []
    assert client.get("/api/instances?state=bogus", headers=h["anna"]).status_code == 422
    assert {"attempts", "next_attempt_at", "last_error"} <= set(refused[0])

    r = client.get(f"/api/instances/{only[0]['id']}/image.png?size=256", headers=h["anna"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    pic = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert max(pic.shape[:2]) == 256
    band = pic[: max(14, pic.shape[0] // 18)]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 80)
    assert yellow.sum() > 50  # the burned-in NOT FOR DIAGNOSTIC USE label
    # Same decode path as the model: the picture is the model's display image, scaled.
    from pacsbridge.imaging import load_for_model

    ref = load_for_model(sample_file("RG1_UNCR.dcm")).image
    ref_small = np.asarray(Image.fromarray((ref * 255).astype(np.uint8)).resize(pic.shape[1::-1]), dtype=float)
    mid = slice(pic.shape[0] // 4, 3 * pic.shape[0] // 4)
    assert np.corrcoef(pic[mid, :, 0].ravel(), ref_small[mid].ravel())[0, 1] > 0.95

    r = client.get(f"/api/instances/{only[0]['id']}/image.png?overlay=heatmap", headers=h["anna"])
    if render.heatmap_module() is None:
        assert r.status_code == 404 and "heatmap not available" in r.json()["detail"]
    else:  # the model issue's heatmap module is present, but this app has no model loaded
        assert r.status_code == 404 and "no model" in r.json()["detail"]
    assert client.get("/api/instances/99999/image.png", headers=h["anna"]).status_code == 404
    assert client.get(f"/api/instances/{only[0]['id']}/image.png?size=99999", headers=h["anna"]).status_code == 422


def test_http_server_component_serves_on_a_real_socket(env) -> None:
    sessions, _, h, _, app = env
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    try:
        assert server.healthy()
        assert httpx.get(f"http://127.0.0.1:{server.port}/api/worklist", timeout=10).status_code == 401
        r = httpx.get(f"http://127.0.0.1:{server.port}/api/worklist", headers=h["anna"], timeout=10)
        assert r.status_code == 200 and len(r.json()) == 3
    finally:
        server.stop()
    assert not server.healthy()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2)


def test_healthz_reports_a_broken_database(tmp_path: Path) -> None:
    sessions = sqlite_sessions(tmp_path)
    client = TestClient(create_app(sessions))
    assert client.get("/healthz").json() == {"status": "ok"}
    sessions.kw["bind"].dispose()
    (tmp_path / "db.sqlite").unlink()
    (tmp_path / "db.sqlite").mkdir()  # now it cannot even be opened
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "error"
    assert client.get("/readyz").status_code == 503


def test_heatmap_overlay_uses_the_models_heatmap_module(env, monkeypatch, tmp_path: Path) -> None:
    """With a model and pacsbridge.model.heatmap (the model issue's module) the overlay is drawn by its
    overlay_rgb from its grad_cam; here a recording stand-in for the module checks the wiring."""
    import sys
    import types

    sessions, client, h, _, _ = env
    calls = []
    fake = types.ModuleType("pacsbridge.model.heatmap")

    def grad_cam(model, image2d):
        calls.append(("grad_cam", model, image2d.shape))
        return np.ones_like(image2d)

    def overlay_rgb(image2d, heat, label):
        calls.append(("overlay", heat.shape))
        out = np.zeros(image2d.shape + (3,), np.uint8)
        out[..., 0] = 200  # red everywhere
        return out

    fake.grad_cam, fake.overlay_rgb = grad_cam, overlay_rgb
    monkeypatch.setitem(sys.modules, "pacsbridge.model.heatmap", fake)
    sentinel = object()
    client2 = TestClient(create_app(sessions, spool_dir=tmp_path / "spool", model=sentinel))
    iid = client2.get("/api/instances?study_instance_uid=2.1", headers=h["anna"]).json()[0]["id"]
    item = client2.get("/api/worklist", headers=h["anna"]).json()[1]["id"]
    assert client2.get(f"/api/worklist/{item}", headers=h["anna"]).json()["heatmap_available"] is True
    r = client2.get(f"/api/instances/{iid}/image.png?overlay=heatmap&size=128", headers=h["anna"])
    assert r.status_code == 200
    pic = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    mid = pic[pic.shape[0] // 2]
    assert (mid[:, 0] > 150).all() and (mid[:, 1] < 50).all()
    assert calls[0][0] == "grad_cam" and calls[0][1] is sentinel and calls[1][0] == "overlay"
