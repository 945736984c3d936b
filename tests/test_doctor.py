"""``pacsbridge doctor`` as an admin runs it, each failure caused for real: no database file, a database
server that does not answer, a schema behind head, the spool replaced by a file, a model that does not
match its card, a port taken by another socket, DICOM and HL7 destinations down, an expired certificate
(made with openssl), a bad configuration."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from dicom_support import daemon_env, free_port, pacsbridge_cmd, wait_for_port
from hostile_support import make_pki
from pipeline_support import SHIPPED_MODEL
from pynetdicom import AE
from pynetdicom.sop_class import Verification


def doctor(env: dict[str, str]) -> tuple[int, dict[str, dict], str]:
    res = subprocess.run(pacsbridge_cmd("doctor", "--json"), env=env, capture_output=True, text=True, timeout=120)
    checks = json.loads(res.stdout)
    assert all(set(c) >= {"name", "ok", "detail"} for c in checks)
    return res.returncode, {c["name"]: c for c in checks}, res.stderr


def text_doctor(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(pacsbridge_cmd("doctor"), env=env, capture_output=True, text=True, timeout=120)


def failing(checks: dict[str, dict]) -> set[str]:
    return {n for n, c in checks.items() if not c["ok"]}


def upgraded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = daemon_env(tmp_path / "data", free_port(), PACSBRIDGE_HTTP_PORT=str(free_port()),
                     PACSBRIDGE_HTTP_HOST="127.0.0.1", PACSBRIDGE_MIN_FREE_BYTES=str(1024 * 1024),
                     PACSBRIDGE_ALLOWED_CALLING_AES="MODALITY1", **extra)
    res = subprocess.run(pacsbridge_cmd("db", "upgrade"), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (tmp_path / "data" / "spool" / "tmp").mkdir(parents=True)
    return env


@pytest.fixture
def echo_scp():
    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(Verification)
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False)
    yield port, ae
    ae.shutdown()  # stops whatever is still running


@pytest.fixture
def mllp_listener():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    yield lst
    lst.close()


def test_healthy_installation_passes_with_serve_running(tmp_path, echo_scp, mllp_listener):
    pki = make_pki(tmp_path / "pki")  # certificates valid for 2 days: a warning, not a failure
    dests = [{"name": "archive", "kind": "dicom", "host": "127.0.0.1", "port": echo_scp[0], "ae_title": "ARCHIVE"},
             {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": mllp_listener.getsockname()[1]}]
    env = upgraded_env(tmp_path, PACSBRIDGE_DESTINATIONS=json.dumps(dests), PACSBRIDGE_DICOM_TLS_CA=str(pki.ca))
    rc, checks, err = doctor(env)
    assert rc == 0, checks
    assert checks["dicom_port"]["detail"].endswith("free")

    serve = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(int(env["PACSBRIDGE_DICOM_PORT"]), 60, serve)
        wait_for_port(int(env["PACSBRIDGE_HTTP_PORT"]), 60, serve)
        rc, checks, err = doctor(env)
        assert rc == 0, (checks, err)
        assert set(checks) >= {"config", "database", "migrations", "spool", "model", "site calibration",
                               "dicom_port", "http_port", "destination archive", "destination ris",
                               "certificate dicom_tls_ca"}
        assert "held by a running pacsbridge" in checks["dicom_port"]["detail"]
        assert "held by a running pacsbridge" in checks["http_port"]["detail"]
        assert "C-ECHO ok" in checks["destination archive"]["detail"]
        assert checks["certificate dicom_tls_ca"]["status"] == "warn"  # expires within 30 days
        assert checks["site calibration"]["ok"] and "not configured" in checks["site calibration"]["detail"]
        assert checks["spool marker"]["status"] == "ok", checks["spool marker"]  # serve recorded the cluster id
        assert checks["scheduler leader"]["status"] == "ok", checks["scheduler leader"]  # SQLite: serve leads
        assert "this node runs none" in checks["workers"]["detail"]  # worker_enabled = false here
        out = text_doctor(env)
        assert out.returncode == 0
        assert all(line.split(" ", 1)[0] in {"ok", "warn"} for line in out.stdout.splitlines())
    finally:
        serve.terminate()
        serve.wait(60)

    # Destinations down: the echo SCP stopped, the MLLP listener closed.
    echo_scp[1].shutdown()
    mllp_listener.close()
    rc, checks, _ = doctor(env)
    assert rc == 1 and failing(checks) == {"destination archive", "destination ris"}, checks
    assert "cannot connect" in checks["destination ris"]["detail"]
    out = text_doctor(env)
    assert out.returncode == 1 and "FAIL destination archive:" in out.stdout and "Traceback" not in out.stderr


def test_port_taken_by_another_socket(tmp_path):
    env = upgraded_env(tmp_path)
    other = socket.socket()
    other.bind(("127.0.0.1", int(env["PACSBRIDGE_DICOM_PORT"])))
    other.listen(1)
    try:
        rc, checks, _ = doctor(env)
    finally:
        other.close()
    assert rc == 1 and failing(checks) == {"dicom_port"}
    assert "taken by another process" in checks["dicom_port"]["detail"]


def test_database_missing_stopped_and_behind(tmp_path):
    env = daemon_env(tmp_path / "fresh", free_port())
    rc, checks, err = doctor(env)
    assert rc == 1 and {"database", "migrations"} <= failing(checks)
    assert "does not exist" in checks["database"]["detail"]
    assert not (tmp_path / "fresh" / "pacsbridge.db").exists()  # doctor changes nothing

    dead = free_port()  # nothing listens there: a PostgreSQL server that is down
    env = daemon_env(tmp_path / "pg", free_port(),
                     PACSBRIDGE_DATABASE_URL=f"postgresql+psycopg2://postgres@127.0.0.1:{dead}/test")
    rc, checks, _ = doctor(env)
    assert rc == 1 and "database" in failing(checks)
    assert "OperationalError" in checks["database"]["detail"]

    env = upgraded_env(tmp_path / "behind")
    res = subprocess.run(pacsbridge_cmd("db", "downgrade", "0006"), env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    rc, checks, _ = doctor(env)
    assert rc == 1 and failing(checks) == {"migrations"}
    assert "0006" in checks["migrations"]["detail"]


def test_spool_a_file_and_model_not_matching_its_card(tmp_path):
    model = tmp_path / "model" / "m.pt"
    model.parent.mkdir()
    shutil.copy(SHIPPED_MODEL, model)
    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    card["weights_sha256"] = "0" * 64
    model.with_suffix(".json").write_text(json.dumps(card))
    env = upgraded_env(tmp_path, PACSBRIDGE_MODEL_PATH=str(model), PACSBRIDGE_WORKER_ENABLED="true")
    spool = tmp_path / "data" / "spool"
    shutil.rmtree(spool)
    spool.write_text("not a folder")
    rc, checks, _ = doctor(env)
    assert rc == 1 and failing(checks) == {"spool", "model"}, checks
    assert "not a folder" in checks["spool"]["detail"]
    assert "does not match" in checks["model"]["detail"]


def _expired_cert(folder: Path) -> Path:
    folder.mkdir()
    (folder / "index.txt").touch()
    (folder / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndir = .\ndatabase = index.txt\nnew_certs_dir = .\n"
                                   "serial = serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n")

    def openssl(*args: str) -> None:
        res = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"openssl {args}: {res.stderr}"

    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "old.key", "-out", "old.csr", "-subj", "/CN=expired")
    openssl("ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "old.key", "-in", "old.csr", "-out",
            "old.pem", "-notext", "-startdate", "20200101000000Z", "-enddate", "20210101000000Z")
    return folder / "old.pem"


def test_expired_certificate_fails(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed: the expired-certificate test needs it")
    cert = _expired_cert(tmp_path / "pki")
    env = upgraded_env(tmp_path, PACSBRIDGE_DICOM_TLS_CA=str(cert))
    rc, checks, _ = doctor(env)
    assert rc == 1 and failing(checks) == {"certificate dicom_tls_ca"}
    assert "expired on 2021-01-01" in checks["certificate dicom_tls_ca"]["detail"]


def test_bad_configuration_is_one_failed_check(tmp_path):
    env = daemon_env(tmp_path / "data", free_port(), PACSBRIDGE_MIN_FREE_BYTES="lots")
    res = text_doctor(env)
    assert res.returncode == 1
    assert res.stdout.startswith("FAIL config: invalid configuration: min_free_bytes") and "Traceback" not in res.stderr


def test_site_calibration_for_other_weights_fails(tmp_path):
    from pacsbridge.model.artifact import sha256_file
    from pacsbridge.validation.calibration import write_calibration

    other = tmp_path / "other.json"
    write_calibration(other, {"threshold": 0.4, "ood_threshold": None, "model_id": "someone-else",
                              "weights_sha256": "0" * 64})
    env = upgraded_env(tmp_path, PACSBRIDGE_SITE_CALIBRATION=str(other))
    rc, checks, _ = doctor(env)
    assert rc == 1 and failing(checks) == {"site calibration"}
    assert "made for other weights" in checks["site calibration"]["detail"]

    ours = tmp_path / "ours.json"
    write_calibration(ours, {"threshold": 0.4, "ood_threshold": None, "model_id": "pneumonia-v3",
                             "weights_sha256": sha256_file(SHIPPED_MODEL)})
    env["PACSBRIDGE_SITE_CALIBRATION"] = str(ours)
    rc, checks, _ = doctor(env)
    assert rc == 0 and "matches the model" in checks["site calibration"]["detail"], checks


# -- the cluster: spool marker, scheduler leader, live workers -------------------------------------------
def _live_workers(url: str) -> int:
    from pacsbridge.store.db import make_engine, make_sessionmaker
    from pacsbridge.store.workers import live_count

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            return live_count(s)
    finally:
        engine.dispose()


def test_cluster_spool_marker_leader_and_workers_on_postgresql(tmp_path):
    """On the real PostgreSQL: no leader and no worker are warnings; a real `pacsbridge worker` records the
    cluster id and counts as live; a real leader process holds the lock until it is SIGKILLed; a spool with
    another cluster's marker, or none, fails with the reason."""
    from dicom_support import postgres_schema_url, postgres_unavailable_reason
    from leader_support import Candidate
    from pacsbridge.store.spool_marker import MARKER_NAME
    from pipeline_support import export_model
    from waiting import wait_until

    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_schema_url() as url:
        env = upgraded_env(tmp_path, PACSBRIDGE_DATABASE_URL=url, PACSBRIDGE_WORKER_ENABLED="true",
                           PACSBRIDGE_MODEL_PATH=str(export_model(tmp_path / "model")))
        rc, checks, _ = doctor(env)
        assert rc == 0, checks
        assert checks["spool marker"]["status"] == "warn" and "no cluster id yet" in checks["spool marker"]["detail"]
        assert checks["scheduler leader"]["status"] == "warn"
        assert "no node holds the scheduler lock" in checks["scheduler leader"]["detail"]
        assert checks["workers"]["status"] == "warn" and "no live worker" in checks["workers"]["detail"]

        worker = subprocess.Popen(pacsbridge_cmd("worker"), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        leader = Candidate(url, 1.0)
        try:
            wait_until(lambda: _live_workers(url) >= 1, 120, "the worker registers")
            leader.expect("LEADER", 60)
            rc, checks, _ = doctor(env)
            assert rc == 0, checks
            assert checks["spool marker"]["status"] == "ok", checks["spool marker"]
            assert "belongs to this database's cluster" in checks["spool marker"]["detail"]
            assert checks["workers"]["status"] == "ok" and "1 live worker" in checks["workers"]["detail"]
            assert checks["scheduler leader"]["status"] == "ok", checks["scheduler leader"]
            assert leader.node in checks["scheduler leader"]["detail"]
            assert "holds the scheduler lock" in checks["scheduler leader"]["detail"]
        finally:
            leader.kill()  # SIGKILL: its session ends, PostgreSQL releases the lock; its row stays
            worker.terminate()
            worker.wait(60)

        rc, checks, _ = doctor(env)
        assert rc == 0 and checks["scheduler leader"]["status"] == "warn", checks
        assert f"the last leader, {leader.node}, no longer holds it" in checks["scheduler leader"]["detail"]
        assert checks["workers"]["status"] == "warn"  # stopped cleanly: no longer live

        marker = tmp_path / "data" / "spool" / MARKER_NAME
        ours = json.loads(marker.read_text())["cluster_id"]
        marker.write_text(json.dumps({"cluster_id": "2b1c6a6e-0000-4000-8000-000000000000"}))
        rc, checks, _ = doctor(env)
        assert rc == 1 and failing(checks) == {"spool marker"}, checks
        detail = checks["spool marker"]["detail"]
        assert "names cluster 2b1c6a6e-0000-4000-8000-000000000000" in detail and ours in detail

        marker.unlink()  # a node with a spool of its own: no marker at all
        rc, checks, _ = doctor(env)
        assert rc == 1 and failing(checks) == {"spool marker"}, checks
        assert f"has no {MARKER_NAME}" in checks["spool marker"]["detail"] and ours in checks["spool marker"]["detail"]
        assert not marker.exists()  # doctor writes nothing


def test_cluster_checks_skip_without_a_usable_database(tmp_path):
    env = daemon_env(tmp_path / "fresh", free_port())
    rc, checks, _ = doctor(env)
    assert rc == 1
    assert all(checks[n]["status"] == "warn" and "not checked" in checks[n]["detail"]
               for n in ("spool marker", "scheduler leader", "workers"))
