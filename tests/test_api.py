"""The read-only HTTP API: worklist order, health, metrics, and the auth hook."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException, Request
from fastapi.testclient import TestClient

from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.store.models import Instance, InstanceState, Prediction, utcnow
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import add_instance, sqlite_sessions


@pytest.fixture
def db(tmp_path: Path):
    sessions = sqlite_sessions(tmp_path)
    t0 = utcnow() - timedelta(minutes=5)
    for i, (p, prio) in enumerate([(0.7, None), (0.95, None), (0.6, "STAT"), (0.2, None)]):
        iid = add_instance(sessions, tmp_path, None, sop_uid=f"1.{i}", study_uid=f"2.{i}", received_at=t0,
                           requested_priority=prio)
        with sessions.begin() as s:
            s.get(Instance, iid).state = InstanceState.PREDICTED.value
            s.add(Prediction(instance_id=iid, probability=p, positive=p >= 0.5, threshold=0.5, model_id="m",
                             weights_sha256="0" * 64, decode_ms=40.0 + i, inference_ms=20.0))
    WorklistUpdater(sessions, 240).refresh()
    return sessions


def test_worklist_in_priority_order(db) -> None:
    client = TestClient(create_app(db))
    r = client.get("/api/worklist")
    assert r.status_code == 200
    rows = r.json()
    assert [x["study_instance_uid"] for x in rows] == ["2.2", "2.1", "2.0"]  # STAT first, then by probability
    assert set(rows[0]) == {"study_instance_uid", "priority", "probability", "status", "received_at"}
    assert [x["priority"] for x in rows] == sorted((x["priority"] for x in rows), reverse=True)


def test_healthz_and_metrics(db) -> None:
    client = TestClient(create_app(db))
    assert client.get("/healthz").json() == {"status": "ok"}
    body = client.get("/metrics").text
    assert "pacsbridge_instances_predicted_total 4.0" in body
    assert "pacsbridge_worklist_items 3.0" in body
    assert "pacsbridge_decode_ms_bucket" in body


def test_healthz_reports_a_broken_database(tmp_path: Path) -> None:
    sessions = sqlite_sessions(tmp_path)
    client = TestClient(create_app(sessions))
    assert client.get("/healthz").json() == {"status": "ok"}
    sessions.kw["bind"].dispose()
    (tmp_path / "db.sqlite").unlink()
    (tmp_path / "db.sqlite").mkdir()  # now it cannot even be opened
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "error"


def test_auth_hook_guards_every_route(db) -> None:
    def deny(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer ok":
            raise HTTPException(401, "no")

    client = TestClient(create_app(db, authorize=deny))
    for route in ("/api/worklist", "/healthz", "/metrics"):
        assert client.get(route).status_code == 401
        assert client.get(route, headers={"authorization": "Bearer ok"}).status_code == 200


def test_http_server_component_serves_on_a_real_socket(db) -> None:
    server = HttpServer(create_app(db), "127.0.0.1", 0)
    server.start()
    try:
        assert server.healthy()
        r = httpx.get(f"http://127.0.0.1:{server.port}/api/worklist", timeout=10)
        assert r.status_code == 200 and len(r.json()) == 3
    finally:
        server.stop()
    assert not server.healthy()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2)
