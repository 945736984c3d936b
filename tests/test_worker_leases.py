"""Claim leases and heartbeats: a worker that stops heartbeating loses its claims while others run.

The lease rules in-process (time moved with ``now=``, no sleeps), then real `pacsbridge worker`
subprocesses: on PostgreSQL one is frozen (SIGSTOP) holding claims while another keeps running,
on SQLite one is killed (SIGKILL) holding claims; either way every instance ends ``predicted``
exactly once, and `pacsbridge workers --json` lists who is live.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from dicom_support import daemon_env, database_url_for, free_port, migrated_sessions, pacsbridge_cmd
from pacsbridge.store import claim_rules, migrations, queue, workers
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, Instance, Prediction, utcnow
from pipeline_support import add_instance, export_model, sample_file
from waiting import wait_until

A = workers.WorkerInfo("host-a:11:aaaaaaaa", "worker", 8, host="host-a", pid=11)
B = workers.WorkerInfo("host-b:22:bbbbbbbb", "serve", 4, host="host-b", pid=22)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    yield from database_url_for(request.param, tmp_path / "data" / "pacsbridge.db")


@pytest.fixture
def sessions(database_url):
    yield from migrated_sessions(database_url)


def _rows(sessions) -> list:
    with sessions() as s:
        return s.execute(select(Instance.sop_instance_uid, Instance.state, Instance.claimed_by, Instance.attempts,
                                Instance.lease_until).order_by(Instance.id)).all()


# -- the rules --------------------------------------------------------------------------------
def test_a_renewed_lease_holds_and_an_expired_one_returns_to_the_queue(sessions, tmp_path: Path) -> None:
    for i in range(2):
        add_instance(sessions, tmp_path, None, sop_uid=f"1.{i}")
    t0 = utcnow()
    claimed = queue.claim(sessions, A.id, 8, now=t0, lease_s=10)
    assert len(claimed) == 2
    other = dict(worker_id=B.id, stale_after=timedelta(minutes=10), include_own=False)
    assert queue.recover_stale_claims(sessions, now=t0 + timedelta(seconds=5), **other) == 0
    assert workers.beat(sessions, A, lease_s=10, now=t0 + timedelta(seconds=8)) == 2  # the heartbeat renews
    assert queue.recover_stale_claims(sessions, now=t0 + timedelta(seconds=15), **other) == 0
    # A's own heartbeat never takes A's claims, however late (its batch is in hand).
    assert queue.recover_stale_claims(sessions, A.id, timedelta(minutes=10), t0 + timedelta(hours=1),
                                      include_own=False) == 0
    assert queue.recover_stale_claims(sessions, now=t0 + timedelta(seconds=19), **other) == 2
    rows = _rows(sessions)
    assert [(r.state, r.claimed_by, r.attempts, r.lease_until) for r in rows] == [("failed", None, 1, None)] * 2
    with sessions() as s:
        details = s.scalars(select(Event.detail).where(Event.kind == "claim_released")).all()
    assert len(details) == 2 and all(f"claim by {A.id} released: its lease expired" in d for d in details)
    # Due again at once; the old holder can no longer record anything.
    again = queue.claim(sessions, B.id, 8, now=t0 + timedelta(seconds=20))
    assert [c.sop_instance_uid for c in again] == ["1.0"]  # a row with attempts behind it is claimed alone
    with sessions.begin() as s:
        assert not queue.mark_predicted(s, claimed[0], A.id, utcnow())
        assert queue.mark_predicted(s, again[0], B.id, utcnow())


def test_a_clean_stop_returns_its_claims_without_counting_an_attempt(sessions, tmp_path: Path) -> None:
    add_instance(sessions, tmp_path, None, sop_uid="2.1")
    assert len(queue.claim(sessions, A.id, 8)) == 1
    assert queue.release_claims(sessions, B.id) == 0  # only the stopping worker's own
    assert queue.release_claims(sessions, A.id) == 1
    [row] = _rows(sessions)
    assert (row.state, row.claimed_by, row.attempts, row.lease_until) == ("received", None, 0, None)


def test_the_registry_tells_live_stopped_and_lost_workers_apart(sessions, tmp_path: Path) -> None:
    t0 = utcnow()
    workers.register(sessions, A, now=t0)
    workers.register(sessions, B, now=t0)
    add_instance(sessions, tmp_path, None, sop_uid="3.1")
    queue.claim(sessions, A.id, 8, now=t0)
    workers.mark_stopped(sessions, B.id, now=t0 + timedelta(seconds=1))
    with sessions() as s:
        live = workers.list_workers(s, 10, now=t0 + timedelta(seconds=2))
        every = workers.list_workers(s, 10, include_gone=True, now=t0 + timedelta(seconds=31))
        assert workers.live_count(s, 10, now=t0 + timedelta(seconds=2)) == 1
    assert [(w["id"], w["state"], w["claims"], w["host"], w["pid"], w["batch_size"]) for w in live] == [
        (A.id, "live", 1, "host-a", 11, 8)]
    assert {w["id"]: w["state"] for w in every} == {A.id: "lost", B.id: "stopped"}  # no heartbeat for 3 x 10 s
    workers.beat(sessions, A)
    with sessions() as s:
        assert [w["id"] for w in workers.list_workers(s, 10)] == [A.id]


def test_a_worker_whose_loop_is_stuck_stops_renewing_its_leases(sessions, tmp_path: Path) -> None:
    add_instance(sessions, tmp_path, None, sop_uid="4.1")
    t0 = utcnow()
    queue.claim(sessions, A.id, 8, now=t0, lease_s=5)
    loop_ok = [False]
    hb = workers.Heartbeat(sessions, A, lease_s=5, interval_s=1, working=lambda: loop_ok[0])
    assert hb.beat_once() is False  # stuck: nothing sent, the lease set at the claim stands
    [row] = _rows(sessions)
    assert workers._utc(row.lease_until) == t0 + timedelta(seconds=5)
    loop_ok[0] = True
    assert hb.beat_once() is True
    [row] = _rows(sessions)
    assert workers._utc(row.lease_until) > t0 + timedelta(seconds=5)


def test_claims_of_a_dead_process_on_this_machine_return_at_once(sessions, tmp_path: Path) -> None:
    """Killed or crashed on this machine: its claims need not wait for their lease.  A live process,
    a clean stop, or another machine's worker with the same pid: the lease decides."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here, t0 = workers.machine_id(), utcnow()
    assert here is not None  # Linux: host, boot and pid namespace
    killed = workers.WorkerInfo(f"h:{dead.pid}:11111111", "worker", 8, host="h", pid=dead.pid, machine=here)
    running = workers.WorkerInfo(f"h:{alive.pid}:22222222", "worker", 8, host="h", pid=alive.pid, machine=here)
    elsewhere = workers.WorkerInfo(f"h:{dead.pid}:33333333", "worker", 8, host="h", pid=dead.pid, machine="x" * 32)
    stopped = workers.WorkerInfo(f"h:{dead.pid}:44444444", "worker", 8, host="h", pid=dead.pid, machine=here)
    try:
        for k, w in enumerate((killed, running, elsewhere, stopped)):
            workers.register(sessions, w, now=t0)
            add_instance(sessions, tmp_path, sample_file("RG1_UNCR.dcm"), sop_uid=f"7.{k}", study_uid=f"6.{k}")
            assert len(queue.claim(sessions, w.id, 1, now=t0, lease_s=3600)) == 1
        workers.mark_stopped(sessions, stopped.id, now=t0)
        me = "h:1:99999999"
        with sessions() as s:
            gone = workers.gone_on_this_machine(s, me)
        assert gone == {killed.id}
        assert queue.recover_stale_claims(sessions, me, timedelta(hours=2), t0, gone=gone) == 1
        rows = {r.sop_instance_uid: (r.state, r.claimed_by) for r in _rows(sessions)}
        assert rows == {"7.0": ("failed", None), "7.1": ("processing", running.id),
                        "7.2": ("processing", elsewhere.id), "7.3": ("processing", stopped.id)}
        with sessions() as s:
            [detail] = s.scalars(select(Event.detail).where(Event.kind == "claim_released")).all()
        assert f"claim by {killed.id} released: its worker process on this machine is gone" in detail
    finally:
        alive.kill()
        alive.wait()


def test_a_zombie_process_is_not_alive() -> None:
    """Killed but not yet reaped by its parent (a supervisor that is slow to wait): gone all the same."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
                   30, "the child to exit")
        assert not claim_rules.pid_alive(child.pid)
        assert claim_rules.pid_alive(os.getpid())
    finally:
        child.wait()
    assert not claim_rules.pid_alive(child.pid)


# -- real worker processes --------------------------------------------------------------------
@contextlib.contextmanager
def _worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen(pacsbridge_cmd("worker"), env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def _until(what, deadline_s: float, *procs: subprocess.Popen, log: Path | None = None):  # noqa: ANN001, ANN202
    """Poll ``what()`` until it is truthy (returns it) or the deadline passes (fails, with the log tail)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"worker exited {p.returncode}: " + (log.read_text()[-3000:] if log else "")
        got = what()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"not reached within {deadline_s} s" + (f": {log.read_text()[-3000:]}" if log else ""))


def _worker_id(sessions, pid: int) -> str | None:
    with sessions() as s:
        return next((w["id"] for w in workers.list_workers(s, 0.5, include_gone=True) if w["pid"] == pid), None)


def _held_by(sessions, worker_id: str, n: int) -> bool:
    return sum(r.state == "processing" and r.claimed_by == worker_id for r in _rows(sessions)) == n


def _cli_workers(env: dict[str, str], *args: str) -> list[dict]:
    res = subprocess.run(pacsbridge_cmd("workers", "--json", *args), env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _queue_at_once(sessions, spool: Path, n: int) -> None:
    """``n`` instances that become due in one statement, so that one claim takes them all."""
    for i in range(n):
        add_instance(sessions, spool, sample_file("RG1_UNCR.dcm"), sop_uid=f"9.{i}", study_uid=f"8.{i}",
                     state="failed")  # not due: no next attempt
    with sessions.begin() as s:
        s.execute(update(Instance).values(state="received"))


def _released(sessions) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Event).where(Event.kind == "claim_released")) or 0)


def _predictions_per_instance(sessions) -> dict[str, int]:
    with sessions() as s:
        return dict(s.execute(select(Instance.sop_instance_uid, func.count(Prediction.id)).join(Prediction)
                              .group_by(Instance.sop_instance_uid)).all())


def test_a_frozen_or_killed_workers_claims_return_and_are_scored_once(tmp_path: Path, database_url: str) -> None:
    n = 6
    postgres = database_url.startswith("postgresql")
    engine = make_engine(database_url)
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    data = tmp_path / "data"
    spool = data / "spool"
    spool.mkdir(parents=True)
    env = daemon_env(data, free_port(), PACSBRIDGE_DATABASE_URL=database_url, PACSBRIDGE_FSYNC="false",
                     PACSBRIDGE_MODEL_PATH=str(export_model(tmp_path / "model")), PACSBRIDGE_HEARTBEAT_S="0.5",
                     # killed: a lease far longer than the test, so only "its process is gone" can return them
                     PACSBRIDGE_CLAIM_LEASE_S="4" if postgres else "600")
    # A claims a whole batch, then waits 10 s for it to fill: the window in which it is frozen or killed.
    env_a = {**env, "PACSBRIDGE_INFERENCE_BATCH_SIZE": "64", "PACSBRIDGE_INFERENCE_MAX_WAIT_MS": "10000"}
    env_b = {**env, "PACSBRIDGE_INFERENCE_MAX_WAIT_MS": "0"}
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    try:
        with _worker(env_a, log_a) as a, contextlib.ExitStack() as stack:
            b = stack.enter_context(_worker(env_b, log_b)) if postgres else None
            id_a = _until(lambda: _worker_id(sessions, a.pid), 120, a, log=log_a)
            if b is not None:  # B runs before A is frozen; paused while A takes the batch, so that A gets it all
                id_b = _until(lambda: _worker_id(sessions, b.pid), 120, b, log=log_b)
                b.send_signal(signal.SIGSTOP)
            _queue_at_once(sessions, spool, n)
            _until(lambda: _held_by(sessions, id_a, n), 30, a, log=log_a)
            a.send_signal(signal.SIGSTOP if postgres else signal.SIGKILL)
            stopped_at = utcnow()
            if b is not None:
                b.send_signal(signal.SIGCONT)
            else:
                b = stack.enter_context(_worker(env_b, log_b))
                id_b = _until(lambda: _worker_id(sessions, b.pid), 120, b, log=log_b)
            # Frozen: a running B returns them by its heartbeat within a lease or two. Killed: B, starting on
            # the same machine, sees A's process is gone and returns them at once, long before the lease ends.
            _until(lambda: _released(sessions) == n, 40, b, log=log_b)
            _until(lambda: len(_predictions_per_instance(sessions)) == n, 120, b, log=log_b)
            rows = _rows(sessions)
            assert {(r.state, r.claimed_by) for r in rows} == {("predicted", id_b)}
            with sessions() as s:
                released = s.execute(select(Event.sop_instance_uid, Event.at, Event.detail)
                                     .where(Event.kind == "claim_released")).all()
            assert sorted(r.sop_instance_uid for r in released) == sorted(r.sop_instance_uid for r in rows)
            why = "its lease expired" if postgres else "its worker process on this machine is gone"
            assert all(f"claim by {id_a} released: {why}" in r.detail for r in released), released
            first = min(workers._utc(r.at) for r in released)
            print(f"claims of the {'frozen' if postgres else 'killed'} worker returned "
                  f"{(first - stopped_at).total_seconds():.1f} s after it stopped "
                  f"(lease {'4' if postgres else '600'} s, heartbeat 0.5 s)")

            def only_b() -> list[dict] | None:  # A is no longer live once 3 heartbeats are missed
                rows = _cli_workers(env)
                return rows if [w["id"] for w in rows] == [id_b] else None

            listed = _until(only_b, 60, b, log=log_b)
            assert [(w["id"], w["pid"], w["state"], w["kind"]) for w in listed] == [(id_b, b.pid, "live", "worker")]
            assert listed[0]["heartbeat_age_s"] < 5 and listed[0]["batch_size"] == 8
            if postgres:  # A wakes up: it finishes its batch but records nothing
                a.send_signal(signal.SIGCONT)
                _until(lambda: "claims were taken back before recording" in log_a.read_text(), 60, a, log=log_a)
                a.send_signal(signal.SIGTERM)
                assert a.wait(60) == 0, log_a.read_text()[-3000:]
            b.send_signal(signal.SIGTERM)
            assert b.wait(60) == 0, log_b.read_text()[-3000:]
        assert _predictions_per_instance(sessions) == {f"9.{i}": 1 for i in range(n)}
        assert _cli_workers(env) == []
        gone = {w["id"]: w["state"] for w in _cli_workers(env, "--all")}
        assert gone == {id_a: "stopped" if postgres else "lost", id_b: "stopped"}
        res = subprocess.run(pacsbridge_cmd("status", "--json"), env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and json.loads(res.stdout)["workers"] == {"live": 0}, res.stderr
    finally:
        engine.dispose()


def test_workers_command_on_a_missing_database_says_so_in_one_line(tmp_path: Path) -> None:
    res = subprocess.run(pacsbridge_cmd("workers", "--json"), env=daemon_env(tmp_path / "nothing", free_port()),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "no pacsbridge database" in res.stderr
    assert not (tmp_path / "nothing").exists()  # a read command creates nothing
