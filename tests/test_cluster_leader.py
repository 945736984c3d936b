"""Several nodes: one scheduler leader by a PostgreSQL advisory lock (two candidate processes, the
leader SIGKILLed, the other takes over within the stated bound), a leader whose session ends stops
at once, SQLite's one process always leads; ``serve --roles``: a receiver-only node stores and scores
nothing, a worker-only node on the same data scores it; an unknown role is one line and exit 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, text

from dicom_support import database_url_for, daemon_env, free_port, pacsbridge_cmd, run_dcmtk, wait_for_port
from leader_support import Candidate
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.leader import Leadership, leader_info
from pacsbridge.store.models import Event, Instance
from pipeline_support import sample_file

RETRY_S = 1.0
#: The stated failover bound for a killed leader: PostgreSQL ends its session at once, a standby
#: retries every leader_retry_s; twice that plus process and connection start-up slack.
FAILOVER_BOUND_S = 2 * RETRY_S + 5.0


@pytest.fixture
def pg_url(tmp_path):
    for url in database_url_for("postgresql", tmp_path / "unused.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        yield url


def _info(url: str) -> dict:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            return leader_info(s)
    finally:
        engine.dispose()


def _wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_processes_one_leader_and_failover_after_sigkill(pg_url):
    a = Candidate(pg_url, RETRY_S)
    b = None
    try:
        a.expect("LEADER", 30)
        b = Candidate(pg_url, RETRY_S)
        b.expect("STANDBY", 30)
        info = _info(pg_url)
        assert info["leader"] == a.node and info["held"] is True

        killed_at = time.time()
        a.kill()
        took = float(b.expect("LEADER", FAILOVER_BOUND_S + 5).split()[1]) - killed_at
        assert took < FAILOVER_BOUND_S, f"failover took {took:.1f} s"
        info = _info(pg_url)
        assert info["leader"] == b.node and info["held"] is True

        a = Candidate(pg_url, RETRY_S)  # the old node comes back: it stands by
        a.expect("STANDBY", 30)
        assert _info(pg_url)["leader"] == b.node
    finally:
        for c in (a, b):
            if c is not None:
                c.kill()
    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as s:
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.kind.like("leader_%")).order_by(Event.id))]
    engine.dispose()
    assert kinds == ["leader_acquired", "leader_acquired"]


def test_leader_whose_session_ends_stops_at_once_and_the_standby_takes_over(pg_url):
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    a = Leadership(engine, sessions, retry_s=60)  # no retry during the test: only the check can notice
    b = Leadership(engine, sessions, retry_s=0.2)
    try:
        a.start()
        b.start()
        assert a.is_leader() and not b.is_leader()
        with sessions() as s:
            pid = s.execute(text("SELECT backend_pid FROM scheduler_leader")).scalar()
            s.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        assert a.is_leader() is False  # the very next check before a job says no
        _wait(b.is_leader, 10, "the standby to lead")
        with sessions() as s:
            assert leader_info(s)["leader"] == b.node
            lost = s.scalars(select(Event).where(Event.kind == "leader_lost")).all()
        assert len(lost) == 1 and a.node in lost[0].detail
    finally:
        b.stop()
        a.stop()
    with sessions() as s:
        assert leader_info(s) == {"leader": None, "since": None, "held": False}  # a clean stop clears the row
    engine.dispose()


def test_sqlite_one_process_always_leads(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'one.db'}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    lead = Leadership(engine, sessions, retry_s=0.2)
    lead.start()
    try:
        assert lead.is_leader()
        with sessions() as s:
            info = leader_info(s)
        assert info["leader"] == lead.node and info["held"] and info["since"]
    finally:
        lead.stop()
    engine.dispose()


def _serve(data: Path, port: int, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(pacsbridge_cmd("serve", *args), env=daemon_env(data, port, PACSBRIDGE_FSYNC="false",
                                                                          **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def _states(data: Path) -> list[str]:
    engine = make_engine(f"sqlite:///{data / 'pacsbridge.db'}")
    try:
        with make_sessionmaker(engine)() as s:
            return list(s.scalars(select(Instance.state)))
    finally:
        engine.dispose()


def test_receiver_role_stores_and_scores_nothing_then_a_worker_node_scores(tmp_path):
    data, port = tmp_path / "data", free_port()
    receiver = _serve(data, port, "--roles", "receiver", PACSBRIDGE_WORKER_ENABLED="true")
    try:
        wait_for_port(port, 60, receiver)
        res = run_dcmtk("storescu", "-aec", "PACSBRIDGE", "127.0.0.1", str(port), str(sample_file("RG1_UNCR.dcm")))
        assert res.returncode == 0, res.stderr
        assert _states(data) == ["received"]  # committed before the success status
    finally:
        log = _stop(receiver)
    assert receiver.returncode == 0, log
    ready = next(line for line in log.splitlines() if "pacsbridge is ready" in line)
    assert "(1 component(s)" in ready and "worker" not in ready and "scheduler" not in ready, ready
    assert _states(data) == ["received"]

    worker = _serve(data, free_port(), "--roles", "worker", PACSBRIDGE_WORKER_ENABLED="true",
                    # RG1 is an adult's, unlike the shipped paediatric model's data: let it be scored.
                    PACSBRIDGE_AGE_GATE="false", PACSBRIDGE_OOD_GATE="false")
    try:
        _wait(lambda: _states(data)[0] in ("predicted", "not_analysed"), 120, "the worker-only node to score")
    finally:
        log = _stop(worker)
    assert _states(data) == ["predicted"], log
    status = subprocess.run(pacsbridge_cmd("status", "--json"), env=daemon_env(data, port), capture_output=True,
                            text=True, timeout=60)
    body = json.loads(status.stdout)
    assert body["scheduler"] == {"leader": None, "since": None, "held": False}  # no node had the role


@pytest.mark.parametrize("how", ["flag", "config"])
def test_unknown_role_is_one_line(tmp_path, how):
    data, port = tmp_path / "data", free_port()
    if how == "flag":
        proc = _serve(data, port, "--roles", "receiver,archiver")
        expected_rc = 1
    else:
        proc = _serve(data, port, PACSBRIDGE_ROLES="receiver,archiver")
        expected_rc = 2  # as every configuration error
    out, _ = proc.communicate(timeout=120)  # it exits by itself
    assert proc.returncode == expected_rc, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "unknown role 'archiver'" in lines[0] and "receiver, worker" in lines[0], out
    assert "Traceback" not in out and not os.path.exists(data / "pacsbridge.db")


def test_standby_daemon_forwards_only_once_it_leads(pg_url, tmp_path):
    """Two scheduler nodes (in-process daemons) on one PostgreSQL: the leader forwards, the standby's
    gated forwarder does nothing; after the leader stops, the standby leads and forwards."""
    from forward_support import MllpListener, add_result

    from pacsbridge.config import load_settings
    from pacsbridge.daemon import Daemon

    with MllpListener([]) as ris:
        def node() -> Daemon:
            settings = load_settings(
                None, data_dir=tmp_path / "data", database_url=pg_url, roles=["scheduler"], http_port=0,
                dicom_port=free_port(), worker_enabled=False, fsync=False, min_free_bytes=0, leader_retry_s=0.3,
                destinations=[{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port,
                               "send": "all", "timeout_s": 5}])
            d = Daemon(settings)
            d.start()
            return d

        a = node()
        b = node()
        try:
            assert a.leadership.is_leader() and not b.leadership.is_leader()
            leader_check = {c.name: c for c in b.readiness()}["scheduler_leader_known"]
            assert leader_check.ok and a.leadership.node in leader_check.detail
            dest = a.settings.destinations

            def result(i: int) -> None:
                src = tmp_path / f"r{i}.dcm"
                ds = dcmread(sample_file("RG1_UNCR.dcm"))
                ds.SOPInstanceUID = f"1.2.826.0.1.{i}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(src)
                add_result(a.sessions, Path(a.settings.spool_dir), src, dest)

            result(1)
            _wait(lambda: len(ris.received) == 1, 30, "the leader to forward")
            b_forwarder = next(c for c in b.components if c.name == "forwarder")
            assert b_forwarder._metrics.outcomes.labels("ris", "sent")._value.get() == 0
            a.stop()
            _wait(b.leadership.is_leader, 10, "the standby to lead")
            result(2)
            sent_by_b = b_forwarder._metrics.outcomes.labels("ris", "sent")._value.get
            _wait(lambda: sent_by_b() == 1, 30, "the new leader to forward")  # recorded after the ACK
        finally:
            b.stop()
            if a.components:
                a.stop()
    assert len({str(m.segment("MSH")[10]) for m in ris.received}) == 2


def test_node_ids_are_stable_per_data_folder_and_never_shared_by_live_processes(tmp_path):
    from pacsbridge.store.node import node_id, release
    from pacsbridge.store.spool import Spool

    first = node_id(tmp_path)
    second = node_id(tmp_path)  # a second live process on this data folder: the next slot
    assert first != second
    release(first)
    again = node_id(tmp_path)
    assert again == first  # a restart takes its own id (and tmp folder) again
    a, b = Spool(tmp_path / "spool", fsync=False, node=again), Spool(tmp_path / "spool", fsync=False, node=second)
    a.prepare()
    writing, _ = a.write_temp(b"being received")
    b.prepare()  # the other node starting up
    assert writing.is_file() and writing.parent == tmp_path / "spool" / "tmp" / first
    assert a.prepare() == 1 and not writing.exists()  # its own leftover, at its own restart
    release(again)
    release(second)
