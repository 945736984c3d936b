"""``pacsbridge users add|list|token|revoke`` and ``pacsbridge instances`` as subprocesses, against the
API on the same database: a token printed by the CLI works, only its hash is stored, revoking stops it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from pacsbridge.api.app import create_app
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import ApiToken, Event, Instance, InstanceState, Prediction
from pipeline_support import add_instance

REPO = Path(__file__).resolve().parents[1]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(PACSBRIDGE_DATA_DIR=str(data_dir))
    return env


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsbridge", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_users_lifecycle_from_the_cli(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = _run("users", "add", "anna", "--role", "radiologist", env=env)
    assert r.returncode == 1 and "pacsbridge db upgrade" in r.stderr  # unmigrated database: a clear message
    assert _run("db", "upgrade", env=env).returncode == 0
    r = _run("users", "add", "anna", "--role", "radiologist", "--json", env=env)
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert set(created) == {"name", "role", "token"} and created["role"] == "radiologist"
    token = created["token"]
    assert len(token) >= 40
    r = _run("users", "add", "anna", "--role", "admin", env=env)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = _run("users", "add", "bad name!", "--role", "admin", env=env)
    assert r.returncode == 1 and "not valid" in r.stderr
    assert _run("users", "add", "x", "--role", "superuser", env=env).returncode == 2  # argparse choices
    r = _run("users", "add", "ops", "--role", "monitor", env=env)
    assert r.returncode == 0 and "shown once" in r.stdout

    # Read the files before this process opens the database: closing a descriptor of an SQLite file
    # drops that process's POSIX locks on it.
    for f in tmp_path.glob("pacsbridge.db*"):
        assert token.encode() not in f.read_bytes()
    sessions = make_sessionmaker(make_engine(f"sqlite:///{(tmp_path / 'pacsbridge.db').resolve()}"))
    with sessions() as s:
        hashes = set(s.scalars(select(ApiToken.token_sha256)))
    assert hashlib.sha256(token.encode()).hexdigest() in hashes and token not in hashes

    client = TestClient(create_app(sessions))
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/me", headers=auth).json() == {"name": "anna", "role": "radiologist", "mode": "live"}

    r = _run("users", "token", "anna", "--json", env=env)
    second = json.loads(r.stdout)["token"]
    assert second != token
    assert client.get("/api/me", headers={"Authorization": f"Bearer {second}"}).status_code == 200

    rows = json.loads(_run("users", "list", "--json", env=env).stdout)
    assert [(u["name"], u["role"], u["active"], u["tokens"]) for u in rows] == [
        ("anna", "radiologist", True, 2), ("ops", "monitor", True, 1)]
    assert rows[0]["last_used_at"] is not None

    r = _run("users", "revoke", "anna", env=env)
    assert r.returncode == 0 and "2 token(s)" in r.stdout
    for t in (token, second):
        assert client.get("/api/me", headers={"Authorization": f"Bearer {t}"}).status_code == 401
    assert _run("users", "token", "anna", env=env).returncode == 1
    assert "revoked" in _run("users", "list", env=env).stdout
    with sessions() as s:
        kinds = [(e.kind, e.actor) for e in s.scalars(select(Event).order_by(Event.id))]
    assert ("user_created", "cli") in kinds and ("user_revoked", "cli") in kinds


def test_instances_command_explains_why_a_study_was_not_flagged(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run("db", "upgrade", env=env).returncode == 0
    sessions = make_sessionmaker(make_engine(f"sqlite:///{(tmp_path / 'pacsbridge.db').resolve()}"))
    a = add_instance(sessions, tmp_path, None, sop_uid="1.1", study_uid="9.1")
    b = add_instance(sessions, tmp_path, None, sop_uid="1.2", study_uid="9.2")
    with sessions.begin() as s:
        s.get(Instance, a).state = InstanceState.PREDICTED.value
        s.add(Prediction(instance_id=a, probability=0.31, positive=False, threshold=0.42, model_id="pneumonia-v1",
                         weights_sha256="0" * 64))
        s.get(Instance, b).state = InstanceState.NOT_ANALYSED.value
        s.get(Instance, b).state_reason = "not a chest radiograph: BodyPartExamined is HAND"
    rows = json.loads(_run("instances", "--json", env=env).stdout)
    assert {r["study_instance_uid"]: (r["state"], r["probability"], r["positive"], r["reason"]) for r in rows} == {
        "9.1": ("predicted", 0.31, False, None),
        "9.2": ("not_analysed", None, None, "not a chest radiograph: BodyPartExamined is HAND")}
    out = _run("instances", "--study", "9.1", env=env).stdout
    assert "0.3100 negative (threshold 0.4200, pneumonia-v1)" in out and "9.2" not in out
    assert "HAND" in _run("instances", "--state", "not_analysed", env=env).stdout


def test_users_bind_and_unbind_ae_titles_from_the_cli(tmp_path: Path) -> None:
    """`users add --ae-title`, `users bind/unbind`: an AE title to at most one user, clear one-line errors."""
    env = _env(tmp_path)
    assert _run("db", "upgrade", env=env).returncode == 0
    r = _run("users", "add", "anna", "--role", "radiologist", "--ae-title", "READSTATION1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ae_titles"] == ["READSTATION1"]
    assert _run("users", "add", "bob", "--role", "radiologist", env=env).returncode == 0
    r = _run("users", "bind", "bob", "--ae-title", "READSTATION1", env=env)
    assert r.returncode == 1 and "already bound to user 'anna'" in r.stderr and "Traceback" not in r.stderr
    r = _run("users", "bind", "bob", "--ae-title", "BAD\\AE", env=env)
    assert r.returncode == 1 and "not valid" in r.stderr
    r = _run("users", "bind", "bob", "--ae-title", "READSTATION2", "--tls-subject", "CN=rs2, O=Hospital", env=env)
    assert r.returncode == 0, r.stderr
    r = _run("users", "bind", "nobody", "--ae-title", "READSTATION3", env=env)
    assert r.returncode == 1 and "no user 'nobody'" in r.stderr
    rows = {u["name"]: u for u in json.loads(_run("users", "list", "--json", env=env).stdout)}
    assert rows["anna"]["ae_titles"] == [{"ae_title": "READSTATION1", "tls_subject": None}]
    assert rows["bob"]["ae_titles"] == [{"ae_title": "READSTATION2", "tls_subject": "CN=rs2,O=Hospital"}]
    assert "AE READSTATION1" in _run("users", "list", env=env).stdout
    r = _run("users", "unbind", "anna", "--ae-title", "READSTATION1", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == {"name": "anna", "ae_title": "READSTATION1", "bound": False}
    r = _run("users", "unbind", "anna", "--ae-title", "READSTATION1", env=env)
    assert r.returncode == 1 and "not bound" in r.stderr
    sessions = make_sessionmaker(make_engine(f"sqlite:///{(tmp_path / 'pacsbridge.db').resolve()}"))
    with sessions() as s:
        kinds = [e.kind for e in s.scalars(select(Event).order_by(Event.id))]
    assert kinds.count("ae_bound") == 2 and kinds.count("ae_unbound") == 1
