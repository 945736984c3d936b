"""`pacsbridge worker`: a separate process scores what a receiver-only `pacsbridge serve` stored.

Both run as real subprocesses with the same configuration (database and data_dir), on SQLite and
on the real PostgreSQL (skipped loudly when unreachable).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_support import (
    daemon_env, free_port, pacsbridge_cmd, database_url_for, send_datasets,
    wait_for_port,
)
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance, Prediction
from pipeline_support import export_model, reuid, sample_file


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    yield from database_url_for(request.param, tmp_path / 'data' / 'pacsbridge.db')


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _scored(sessions) -> dict[str, str | None]:
    """SOP Instance UID -> who claimed it, for every instance with a prediction."""
    with sessions() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.claimed_by).join(Prediction)).all()
    return dict(rows)


def test_worker_scores_what_a_receiver_only_serve_stored(tmp_path, database_url):
    data = tmp_path / "data"
    port = free_port()
    env = daemon_env(data, port, PACSBRIDGE_DATABASE_URL=database_url, PACSBRIDGE_FSYNC="false",
                     PACSBRIDGE_MODEL_PATH=str(export_model(tmp_path / "model")))
    assert env["PACSBRIDGE_WORKER_ENABLED"] == "false"  # serve only receives
    files = [sample_file("RG1_UNCR.dcm")] + [reuid(sample_file("RG1_UNCR.dcm"), tmp_path / f"c{i}.dcm")
                                              for i in range(2)]
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        with process(pacsbridge_cmd("serve"), env, tmp_path / "serve.log") as serve:
            wait_for_port(port, 120, serve)
            assert send_datasets(port, files[:1]) == [0]  # stored before the worker exists
            with process(pacsbridge_cmd("worker"), env, tmp_path / "worker.log") as worker:
                assert send_datasets(port, files[1:]) == [0, 0]
                deadline = time.monotonic() + 120
                while len(_scored(sessions)) < len(files) and time.monotonic() < deadline:
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(0.1)
                scored = _scored(sessions)
                assert len(scored) == len(files), (tmp_path / "worker.log").read_text()[-3000:]
                assert {owner.split(":")[1] for owner in scored.values()} == {str(worker.pid)}  # host:pid:uuid
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(60) == 0
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(60) == 0
        with sessions() as s:
            states = s.scalars(select(Instance.state)).all()
    finally:
        engine.dispose()
    assert sorted(states) == ["predicted"] * len(files)
    worker_log = (tmp_path / "worker.log").read_text()
    assert "received SIGTERM" in worker_log and "pacsbridge stopped" in worker_log
    assert "Storage SCP" not in worker_log  # no DICOM listener in the worker


def test_worker_refuses_a_database_that_is_not_migrated(tmp_path):
    env = daemon_env(tmp_path / "data", free_port())
    res = subprocess.run(pacsbridge_cmd("worker"), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "pacsbridge worker: cannot start" in res.stderr and "pacsbridge db upgrade" in res.stderr
