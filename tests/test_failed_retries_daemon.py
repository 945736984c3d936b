"""`failed` end to end: a receiver-only `pacsbridge serve` stores, `pacsbridge worker` processes meet a
real fault (spool files moved away), retry with backoff, are SIGKILLed in the middle of the retries,
and a new worker finishes once the files are back: nothing lost, nothing scored twice, the image the
model must refuse is refused once and never retried, and the instance whose file never comes back
stops at inference_max_attempts with its reason.  Then the operator's commands: `instances --state
failed`, `status --json`, `instances retry`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from dicom_support import daemon_env, free_port, pacsbridge_cmd, send_datasets, wait_for_port
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, Instance, Prediction
from pipeline_support import export_model, reuid, sample_file


def _rows(sessions) -> dict[str, Instance]:
    with sessions() as s:
        rows = s.scalars(select(Instance)).all()
        s.expunge_all()
    return {r.sop_instance_uid: r for r in rows}


def _wait(condition, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(pacsbridge_cmd(*args), env=env, capture_output=True, text=True, timeout=120)


def test_faults_are_retried_survive_sigkill_and_stop_at_max_attempts(tmp_path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = daemon_env(data, port, PACSBRIDGE_FSYNC="false", PACSBRIDGE_MODEL_PATH=str(export_model(tmp_path / "m")),
                     PACSBRIDGE_INFERENCE_MAX_ATTEMPTS="4", PACSBRIDGE_INFERENCE_RETRY_BASE_S="1.0")
    chest = [reuid(sample_file("RG1_UNCR.dcm"), tmp_path / f"c{i}.dcm", study_uid=f"1.2.826.0.1.9.{i}")
             for i in range(4)]
    not_chest = reuid(sample_file("RG3_UNCR.dcm"), tmp_path / "hand.dcm")
    engine = make_engine(f"sqlite:///{(data / 'pacsbridge.db').resolve()}")
    sessions = make_sessionmaker(engine)
    spool = data / "spool"
    logs = [tmp_path / "serve.log", tmp_path / "worker1.log", tmp_path / "worker2.log"]
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
        return procs[-1]

    try:
        serve = start(pacsbridge_cmd("serve"), logs[0])
        wait_for_port(port, 120, serve)
        assert send_datasets(port, chest + [not_chest]) == [0] * 5
        rows = _rows(sessions)
        chest_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in chest]
        refused_uid = str(dcmread(not_chest, stop_before_pixels=True).SOPInstanceUID)
        assert set(rows) == {*chest_uids, refused_uid}
        restorable, lost = chest_uids[:3], chest_uids[3]
        away = tmp_path / "away"
        away.mkdir()
        for uid in chest_uids:  # the file system loses the chest images' files
            shutil.move(spool / rows[uid].file_path, away / uid)

        worker = start(pacsbridge_cmd("worker"), logs[1])
        _wait(lambda: min(r.attempts for u, r in _rows(sessions).items() if u in restorable) >= 2, 120, worker, logs[1])
        worker.send_signal(signal.SIGKILL)  # in the middle of the retries
        worker.wait(30)
        mid = _rows(sessions)
        assert {mid[u].state for u in chest_uids} <= {"failed", "processing", "received"}
        assert max(mid[u].attempts for u in chest_uids) < 4, "the retries ended before the kill; proved nothing"
        assert mid[refused_uid].state == "not_analysed"

        for uid in restorable:  # the fault goes away, for three of the four
            shutil.move(away / uid, spool / rows[uid].file_path)
        worker = start(pacsbridge_cmd("worker"), logs[2])

        def settled() -> bool:
            now = _rows(sessions)
            return ({now[u].state for u in restorable} == {"predicted"}
                    and now[lost].state == "failed" and now[lost].next_attempt_at is None)

        _wait(settled, 120, worker, logs[2])
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)

    end = _rows(sessions)
    with sessions() as s:
        per_instance = dict(s.execute(select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id)).all())
        events = {(k, i): n for k, i, n in s.execute(
            select(Event.kind, Event.instance_id, func.count()).group_by(Event.kind, Event.instance_id))}
    assert sorted(per_instance) == sorted(end[u].id for u in restorable) and set(per_instance.values()) == {1}
    def attempt_events(iid: int) -> int:
        # a failed attempt is an analysis_failed event, or a claim_released one when the SIGKILL took it
        return events.get(("analysis_failed", iid), 0) + events.get(("claim_released", iid), 0)

    missing, stopped = "the stored file is missing from the spool", "the worker scoring this image stopped"
    for uid in restorable:
        assert 1 <= end[uid].attempts < 4 and end[uid].last_error.startswith((missing, stopped))
        assert attempt_events(end[uid].id) == end[uid].attempts  # one event per recorded attempt
    assert (end[lost].state, end[lost].attempts) == ("failed", 4)
    assert end[lost].state_reason.startswith((missing, stopped))
    assert attempt_events(end[lost].id) == 4 and events[("analysis_failed", end[lost].id)] >= 3
    assert (end[refused_uid].state, end[refused_uid].attempts) == ("not_analysed", 0)
    assert "chest" in end[refused_uid].state_reason
    assert events[("not_analysed", end[refused_uid].id)] == 1
    assert ("analysis_failed", end[refused_uid].id) not in events

    # The operator's view and commands.
    res = _cli(env, "instances", "--state", "failed", "--json")
    assert res.returncode == 0, res.stderr
    [row] = json.loads(res.stdout)
    assert (row["id"], row["state"], row["attempts"], row["next_attempt_at"]) == (end[lost].id, "failed", 4, None)
    res = _cli(env, "instances", "--state", "failed")
    assert res.returncode == 0 and f"no retry left: {end[lost].state_reason[:30]}" in res.stdout
    res = _cli(env, "status", "--json")
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)["instances"]
    assert (counts["failed"], counts["predicted"], counts["not_analysed"], counts["pending"]) == (1, 3, 1, 0)
    for args in (["999999"], [str(end[restorable[0]].id)]):
        res = _cli(env, "instances", "retry", *args)
        assert res.returncode == 1 and res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1 and "nothing changed" in res.stderr, res.stderr
    res = _cli(env, "instances", "retry", str(end[lost].id))
    assert (res.returncode, res.stdout.strip()) == (0, f"1 instance queued again: {end[lost].id}"), res.stderr
    assert _rows(sessions)[lost].state == "received" and _rows(sessions)[lost].attempts == 0
    res = _cli(env, "instances", "retry", "--all-failed")
    assert (res.returncode, res.stdout.strip()) == (0, "0 instances queued again")
    engine.dispose()
