"""The spool marker: a node whose spool is not the cluster's refuses to start its worker.

The rules on SQLite and on the real PostgreSQL, then `pacsbridge worker` as a real subprocess: a
spool without the cluster's marker stops it with one line and exit 1; the matching one starts.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_support import daemon_env, database_url_for, free_port, migrated_sessions, pacsbridge_cmd
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import ClusterIdentity
from pacsbridge.store.spool_marker import MARKER_NAME, SpoolNotTheClusters, check_spool_marker, read_marker
from pacsbridge.store.workers import list_workers
from pipeline_support import export_model


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    yield from database_url_for(request.param, tmp_path / "data" / "pacsbridge.db")


@pytest.fixture
def sessions(database_url):
    yield from migrated_sessions(database_url)


def _db_id(sessions) -> str | None:
    with sessions() as s:
        row = s.get(ClusterIdentity, 1)
        return row.cluster_id if row else None


def test_fresh_database_and_spool_get_one_id_then_only_that_spool_passes(sessions, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    cluster = check_spool_marker(sessions, spool)
    assert read_marker(spool) == cluster == _db_id(sessions)
    assert check_spool_marker(sessions, spool) == cluster  # a second node on the same (shared) spool
    assert json.loads((spool / MARKER_NAME).read_text())["cluster_id"] == cluster
    assert [p.name for p in spool.iterdir()] == [MARKER_NAME]  # no temporary file left

    local = tmp_path / "node-b-spool"  # what an admin might try first: a spool of the node's own
    local.mkdir()
    (local / "ab").mkdir()
    with pytest.raises(SpoolNotTheClusters, match="this node's spool is not the cluster's") as exc:
        check_spool_marker(sessions, local)
    assert f"has no {MARKER_NAME}" in str(exc.value) and cluster in str(exc.value)
    assert read_marker(local) is None  # nothing written on a refusal

    other = tmp_path / "other-cluster"
    other.mkdir()
    (other / MARKER_NAME).write_text(json.dumps({"cluster_id": "2b1c6a6e-0000-4000-8000-000000000000"}))
    with pytest.raises(SpoolNotTheClusters, match="names cluster 2b1c6a6e"):
        check_spool_marker(sessions, other)

    (spool / MARKER_NAME).write_text("garbled")
    with pytest.raises(SpoolNotTheClusters, match="not readable"):
        check_spool_marker(sessions, spool)


def test_a_new_database_beside_a_marked_spool_adopts_its_id(sessions, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    kept = "7f3e2a10-1111-4222-8333-444455556666"
    (spool / MARKER_NAME).write_text(json.dumps({"cluster_id": kept}))
    assert check_spool_marker(sessions, spool) == kept
    assert _db_id(sessions) == kept


def _run_worker(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(pacsbridge_cmd("worker"), env=env, capture_output=True, text=True, timeout=timeout)


def test_worker_refuses_a_spool_that_is_not_the_clusters_and_starts_on_the_right_one(
        tmp_path: Path, database_url: str) -> None:
    engine = make_engine(database_url)
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    model = str(export_model(tmp_path / "model"))
    shared = tmp_path / "shared"
    (shared / "spool").mkdir(parents=True)
    cluster = check_spool_marker(sessions, shared / "spool")  # the cluster's first node marked its spool

    own = tmp_path / "node-b"  # a node with a data folder (and spool) of its own
    (own / "spool").mkdir(parents=True)
    env = daemon_env(own, free_port(), PACSBRIDGE_DATABASE_URL=database_url, PACSBRIDGE_MODEL_PATH=model,
                     PACSBRIDGE_HEARTBEAT_S="0.5", PACSBRIDGE_CLAIM_LEASE_S="5")
    res = _run_worker(env)
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "cannot start" in ln]
    assert len(lines) == 1 and "this node's spool is not the cluster's" in lines[0] and cluster in lines[0]
    assert "Traceback" not in res.stderr
    with sessions() as s:
        assert list_workers(s, 0.5, include_gone=True) == []  # it never registered, never claimed

    env["PACSBRIDGE_DATA_DIR"] = str(shared)
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(pacsbridge_cmd("worker"), env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        live: list = []
        while not live and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            with sessions() as s:
                live = list_workers(s, 0.5)
            time.sleep(0.1)
        assert [w["pid"] for w in live] == [proc.pid], log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        engine.dispose()
