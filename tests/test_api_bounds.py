"""Ids, limits and offsets on every HTTP route are bounded: a 2**64 id, a zero or negative id, a huge
offset are 422 (an unknown id in range 404), never a 500, and each is one log line without a
traceback -- over a real socket."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi.routing import APIRoute

from pacsbridge.api.app import MAX_ID, create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pipeline_support import free_port

HUGE = 2**64


@pytest.fixture
def served(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        token = create_user(s, "root", "admin")[1]
    app = create_app(sessions, spool_dir=tmp_path / "spool")
    server = HttpServer(app, "127.0.0.1", free_port())
    server.start()
    try:
        yield app, f"http://127.0.0.1:{server.port}", {"Authorization": f"Bearer {token}"}
    finally:
        server.stop()
        engine.dispose()


def _calls(app, item_id: int) -> list[tuple[str, str, dict | None]]:
    """Every route with an id in its path, called with ``item_id`` (bodies valid, so only the id matters)."""
    out = []
    for route in app.routes:
        if not isinstance(route, APIRoute) or "{" not in route.path:
            continue
        path = route.path.replace("{item_id}", str(item_id)).replace("{instance_id}", str(item_id))
        for method in route.methods:
            body = {"finding": "other"} if path.endswith("/complete") else {"reason": "x"} if path.endswith("/cancel") else None
            out.append((method, path, body))
    return out


def test_huge_and_nonpositive_ids_are_422_unknown_ids_404(served, caplog) -> None:
    app, base, auth = served
    caplog.set_level(logging.INFO)
    calls = _calls(app, HUGE)
    assert len(calls) >= 6  # worklist item, claim, release, complete, cancel, image
    with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
        for bad in (HUGE, MAX_ID + 1, 0, -1, -HUGE):
            for method, path, body in _calls(app, bad):
                r = client.request(method, path, json=body)
                assert r.status_code == 422, (method, path, r.status_code, r.text)
        for method, path, body in _calls(app, MAX_ID):
            r = client.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
        for path in ("/api/worklist", "/api/instances"):
            assert client.get(path, params={"offset": HUGE}).status_code == 422
            assert client.get(path, params={"offset": -1}).status_code == 422
            assert client.get(path, params={"limit": HUGE}).status_code == 422
            assert client.get(path, params={"offset": 1000}).status_code == 200
        assert client.get("/api/worklist", params={"status": "x" * 10000}).status_code == 422
    assert "Traceback" not in caplog.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    lines = [r.getMessage() for r in caplog.records if "client error" in r.getMessage()]
    assert any("client error 422 GET /api/worklist/18446744073709551616" in m for m in lines)
    assert all("\n" not in m for m in lines)
