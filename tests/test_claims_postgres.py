"""Concurrent claiming on the real PostgreSQL (127.0.0.1:5432, database ``test``).

Tables are made with ``Base.metadata.create_all`` in a fresh schema and dropped afterwards, so the
test does not depend on the migrations.  Skips loudly when the server is unreachable.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.model.artifact import load_model
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Base, Instance, Prediction
from pipeline_support import add_instance, export_model, sample_file

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg(tmp_path: Path):
    schema = f"pb_claims_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432/test is unreachable: {type(exc).__name__}: {exc}")
    engine = make_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"}, pool_size=10)
    try:
        Base.metadata.create_all(engine)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(export_model(tmp_path_factory.mktemp("model")), "auto")


def test_concurrent_claims_are_disjoint_and_complete(pg, tmp_path: Path, model) -> None:
    n = 60
    for i in range(n):
        add_instance(pg, tmp_path, None, sop_uid=f"1.{i}", study_uid=f"2.{i % 7}")
    workers = [InferenceWorker(pg, model, tmp_path, worker_id=f"test:w{k}") for k in range(4)]
    got: dict[str, list[int]] = {w.worker_id: [] for w in workers}
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []
    sizes: list[int] = []

    def loop(w: InferenceWorker) -> None:
        try:
            barrier.wait()
            while batch := w.claim(3):
                sizes.append(len(batch))
                got[w.worker_id].extend(c.id for c in batch)
                time.sleep(0.005)  # a real worker scores between claims; lets the others interleave
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert max(sizes) <= 3  # a claim never takes more than asked for
    all_ids = [i for ids in got.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == n  # nobody claimed a row twice, none left behind
    assert sum(1 for ids in got.values() if ids) >= 2  # the claims really interleaved
    with pg() as s:
        owners = dict(s.execute(select(Instance.id, Instance.claimed_by)).all())
    for wid, ids in got.items():
        assert all(owners[i] == wid for i in ids)


def test_two_workers_draining_concurrently_score_each_instance_once(pg, tmp_path: Path, model) -> None:
    spool = tmp_path / "spool"
    names = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm", "RG1_J2KI.dcm"]
    for i in range(8):
        add_instance(pg, spool, sample_file(names[i % 4]), sop_uid=f"3.{i}", study_uid=f"4.{i}")
    workers = [InferenceWorker(pg, model, spool, batch_size=2, max_wait_ms=0, worker_id=f"test:d{k}")
               for k in range(2)]
    outs = [None, None]

    def run(k: int) -> None:
        outs[k] = workers[k].drain()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(o.predicted for o in outs) == 8 and all(o.lost_claims == 0 for o in outs)
    with pg() as s:
        per_instance = s.execute(select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id)).all()
        states = s.scalars(select(Instance.state)).all()
    assert len(per_instance) == 8 and all(c == 1 for _, c in per_instance)
    assert set(states) == {"predicted"}


def test_claim_skips_rows_locked_by_another_transaction(pg, tmp_path: Path, model) -> None:
    for i in range(6):
        add_instance(pg, tmp_path, None, sop_uid=f"5.{i}")
    worker = InferenceWorker(pg, model, tmp_path, worker_id="test:skip")
    with pg() as other:  # another worker mid-claim: holds row locks on the three oldest rows
        locked = other.scalars(
            select(Instance.id).order_by(Instance.received_at, Instance.id).limit(3).with_for_update()
        ).all()
        result: list = []
        t = threading.Thread(target=lambda: result.extend(worker.claim(3)))
        t.start()
        t.join(15)
        blocked = t.is_alive()
        other.rollback()
        t.join(15)
    assert not blocked, "claim waited for the other transaction's row locks instead of skipping them"
    assert len(result) == 3 and not {c.id for c in result} & set(locked)
