"""Alembic migrations on SQLite and on the real PostgreSQL: upgrade, downgrade, no drift."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from dicom_support import database_url_for
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine
from pacsbridge.store.models import Base

TABLES = {"studies", "series", "instances", "predictions", "worklist_items", "events"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    yield from database_url_for(request.param, tmp_path / 'migrate.db')


def _drift(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_upgrade_downgrade_and_no_drift(database_url):
    engine = make_engine(database_url)
    try:
        assert migrations.current_revision(engine) is None
        migrations.upgrade(engine)
        assert migrations.current_revision(engine) == migrations.head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        assert _drift(engine) == [], "models.py and the migrations disagree; write a migration"
        migrations.upgrade(engine)  # idempotent
        migrations.downgrade(engine, "base")
        assert migrations.current_revision(engine) is None
        assert not (TABLES & set(inspect(engine).get_table_names()))
        migrations.upgrade(engine)  # and back up again
        assert _drift(engine) == []
    finally:
        engine.dispose()


def test_drift_check_can_fail(tmp_path):
    """The drift check notices a schema that differs from the models."""
    engine = make_engine(f"sqlite:///{tmp_path / 'drift.db'}")
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE events ADD COLUMN surprise INTEGER")
    assert _drift(engine) != []
    engine.dispose()


def test_cli_db_upgrade_from_any_directory(tmp_path):
    db = tmp_path / "cli.db"
    env = {"PACSBRIDGE_DATABASE_URL": f"sqlite:///{db}", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "pacsbridge", "db", "upgrade"], cwd="/", env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "at revision" in res.stdout
    engine = make_engine(f"sqlite:///{db}")
    assert migrations.current_revision(engine) == migrations.head_revision()
    engine.dispose()


def test_0002_moves_the_deleted_file_marker_both_ways(database_url):
    """0001 marked a file deleted by retention with file_path ''; 0002 restores the (hash-derived) path
    and sets spool_deleted_at, and downgrading brings the old marker back."""
    from sqlalchemy import text

    from pacsbridge.store.spool import spool_relpath

    engine = make_engine(database_url)
    try:
        migrations.upgrade(engine, "0001")
        now = "2026-01-02 03:04:05+00:00"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2', :t)"), {"t": now})
            conn.execute(text("INSERT INTO series (id, study_id, series_instance_uid, created_at) "
                              "VALUES (1, 1, '1.2.3', :t)"), {"t": now})
            for iid, sop, path in [(1, "1.2.3.1", ""), (2, "1.2.3.2", spool_relpath("1.2.3.2"))]:
                conn.execute(text(
                    "INSERT INTO instances (id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                    "file_path, file_size, state, received_at, updated_at) "
                    "VALUES (:id, 1, :sop, '1.2.840.10008.5.1.4.1.1.1', '1.2.840.10008.1.2.1', :path, 10, "
                    "'predicted', :t, :t)"), {"id": iid, "sop": sop, "path": path, "t": now})
        migrations.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, file_path, spool_deleted_at FROM instances ORDER BY id")).all()
        assert [(r[0], r[1]) for r in rows] == [(1, spool_relpath("1.2.3.1")), (2, spool_relpath("1.2.3.2"))]
        assert rows[0][2] is not None and rows[1][2] is None
        migrations.downgrade(engine, "0001")
        with engine.connect() as conn:
            paths = conn.execute(text("SELECT file_path FROM instances ORDER BY id")).scalars().all()
        assert paths == ["", spool_relpath("1.2.3.2")]
    finally:
        engine.dispose()


def test_0003_renames_pending_fixes_first_positive_and_gives_ups_uids(database_url):
    """Items of 0002 become scheduled with a UPS UID and an open-study marker, and first_positive_at
    becomes the study's first positive prediction (it held the study's arrival)."""
    from sqlalchemy import text

    engine = make_engine(database_url)
    try:
        migrations.upgrade(engine, "0002")
        arrived, first_pos, later = "2026-01-02 03:00:00+00:00", "2026-01-02 03:30:00+00:00", "2026-01-02 04:00:00+00:00"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2', :t)"),
                         {"t": arrived})
            conn.execute(text("INSERT INTO series (id, study_id, series_instance_uid, created_at) "
                              "VALUES (1, 1, '1.2.3', :t)"), {"t": arrived})
            for iid, at in [(1, later), (2, first_pos)]:
                conn.execute(text(
                    "INSERT INTO instances (id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                    "file_path, file_size, state, received_at, updated_at) VALUES (:id, 1, :sop, '1.2', '1.2', "
                    "'x', 10, 'predicted', :t, :t)"), {"id": iid, "sop": f"1.2.3.{iid}", "t": arrived})
                conn.execute(text(
                    "INSERT INTO predictions (instance_id, probability, positive, threshold, model_id, "
                    "weights_sha256, created_at) VALUES (:id, 0.9, :pos, 0.5, 'm', 'x', :t)"),
                    {"id": iid, "pos": True, "t": at})
            conn.execute(text("INSERT INTO worklist_items (id, study_id, priority, probability, status, "
                              "first_positive_at, created_at, updated_at) VALUES (1, 1, 1.0, 0.9, 'pending', :t, "
                              ":t, :t)"), {"t": arrived})
        migrations.upgrade(engine)
        with engine.connect() as conn:
            status, open_sid, ups, first = conn.execute(text(
                "SELECT status, open_study_id, ups_uid, first_positive_at FROM worklist_items")).one()
        assert (status, open_sid) == ("scheduled", 1)
        assert ups and ups.startswith("1.2.826.0.1.3680043")  # pydicom's generate_uid root
        first = first if isinstance(first, str) else first.isoformat(sep=" ")
        assert first.startswith("2026-01-02 03:30:00")
        migrations.downgrade(engine, "0002")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT status FROM worklist_items")).scalar() == "pending"
    finally:
        engine.dispose()


def test_0007_moves_only_transient_not_analysed_rows_to_failed(database_url):
    """Rows 0005 recorded not_analysed for a fault of the system become failed and due at once; every
    refusal of the image stays not_analysed; the downgrade makes failed rows not_analysed again."""
    from sqlalchemy import text

    engine = make_engine(database_url)
    reasons = {
        1: ("the stored file is missing from the spool", "failed"),
        2: ("could not decode the image (RuntimeError: decoder bug)", "failed"),
        3: ("the model failed on this image (RuntimeError: CUDA out of memory)", "failed"),
        4: ("the model produced a non-finite score", "failed"),
        5: ("body part HAND is not a chest", "not_analysed"),
        6: ("pixel data could not be decoded: ValueError: short", "not_analysed"),
        7: ("the stored file was deleted by retention at 2026-01-01T00:00:00+00:00", "not_analysed"),
        8: ("image unlike this model's training data (out-of-distribution score 9.00 > threshold 3.00)",
            "not_analysed"),
    }
    try:
        migrations.upgrade(engine, "0005")
        now = "2026-01-02 03:04:05+00:00"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2', :t)"), {"t": now})
            conn.execute(text("INSERT INTO series (id, study_id, series_instance_uid, created_at) "
                              "VALUES (1, 1, '1.2.3', :t)"), {"t": now})
            for iid, (reason, _) in [*reasons.items(), (9, (None, "predicted"))]:
                conn.execute(text(
                    "INSERT INTO instances (id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                    "file_path, file_size, state, state_reason, received_at, updated_at) VALUES (:id, 1, :sop, "
                    "'1.2', '1.2', 'x', 10, :state, :reason, :t, :t)"),
                    {"id": iid, "sop": f"1.2.3.{iid}", "t": now, "reason": reason,
                     "state": "predicted" if reason is None else "not_analysed"})
        migrations.upgrade(engine)
        with engine.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(text(
                "SELECT id, state, attempts, next_attempt_at, last_error, state_reason FROM instances"))}
        for iid, (reason, state) in reasons.items():
            got_state, attempts, due, last_error, kept = rows[iid]
            assert (got_state, attempts, kept) == (state, 0, reason), iid
            assert (due is not None, last_error) == ((True, reason) if state == "failed" else (False, None)), iid
        assert rows[9][:2] == ("predicted", 0)
        from pacsbridge.store import queue
        from pacsbridge.store.db import make_sessionmaker

        claimed = queue.claim(make_sessionmaker(engine), "test:1", 20)  # due at once: the worker retries them
        assert sorted(c.id for c in claimed) == [1, 2, 3, 4]
        with engine.begin() as conn:
            conn.execute(text("UPDATE instances SET state = 'failed' WHERE state = 'processing'"))
        migrations.downgrade(engine, "0005")
        with engine.connect() as conn:
            states = dict(conn.execute(text("SELECT id, state FROM instances")).all())
        assert states == {**{i: "not_analysed" for i in reasons}, 9: "predicted"}
    finally:
        engine.dispose()


def test_0010_moves_the_draft_of_the_current_claim_from_events_into_columns(database_url):
    """0009 kept N-SET drafts as JSON events tagged with a hash of the claim's Transaction UID; 0010 gives
    each in-progress item the last draft of its current claim as columns and leaves only one plain line
    in every such event; the downgrade writes the drafts back as events the old code reads."""
    import hashlib
    import json

    from sqlalchemy import text

    def tag(txn: str) -> str:
        return hashlib.sha256(txn.encode()).hexdigest()[:16]

    def draft(txn: str, finding, comment=None, reason=None) -> str:
        return json.dumps({"txn": tag(txn), "finding": finding, "comment": comment, "cancel_reason": reason})

    engine = make_engine(database_url)
    try:
        migrations.upgrade(engine, "0009")
        t = "2026-01-02 03:04:05+00:00"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2', :t), "
                              "(2, '1.3', :t), (3, '1.4', :t)"), {"t": t})
            for iid, status, txn in [(1, "in_progress", "9.1"), (2, "scheduled", None), (3, "completed", "9.3")]:
                conn.execute(text(
                    "INSERT INTO worklist_items (id, study_id, ups_uid, priority, probability, status, "
                    "first_positive_at, claimed_by, transaction_uid, created_at, updated_at) VALUES (:id, :id, "
                    ":uid, 1.0, 0.9, :status, :t, 'reader1', :txn, :t, :t)"),
                    {"id": iid, "uid": f"2.25.{iid}", "status": status, "txn": txn, "t": t})
            for n, (iid, actor, detail) in enumerate([
                (1, "reader9", draft("9.0", "other", "an earlier claim's")),  # a claim that lapsed
                (1, "reader1", draft("9.1", "no_pneumonia")),
                (1, "reader1", draft("9.1", "pneumonia", "RLL consolidation")),  # the last one wins
                (1, "reader1", "not json"),
                (2, "reader2", draft("9.2", "other")),  # released since: no claim, no draft
                (3, "reader1", draft("9.3", "pneumonia", "done")),  # completed: its finding is the item's
            ]):
                conn.execute(text("INSERT INTO events (at, kind, level, actor, worklist_item_id, detail) VALUES "
                                  "(:at, 'ups_performed_data', 'info', :actor, :iid, :detail)"),
                             {"at": f"2026-01-02 03:0{n}:00+00:00", "actor": actor, "iid": iid, "detail": detail})
        migrations.upgrade(engine)
        with engine.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(text(
                "SELECT id, draft_finding, draft_comment, draft_cancel_reason, draft_by, draft_at "
                "FROM worklist_items"))}
            details = conn.execute(text("SELECT detail FROM events ORDER BY id")).scalars().all()
        assert rows[1][:4] == ("pneumonia", "RLL consolidation", None, "reader1")
        at = rows[1][4] if isinstance(rows[1][4], str) else rows[1][4].isoformat(sep=" ")
        assert at.startswith("2026-01-02 03:02:00")
        assert rows[2] == rows[3] == (None,) * 5
        assert details == ["item 1: draft saved, finding other", "item 1: draft saved, finding no_pneumonia",
                           "item 1: draft saved, finding pneumonia", "not json",
                           "item 2: draft saved, finding other", "item 3: draft saved, finding pneumonia"]
        migrations.downgrade(engine, "0009")
        with engine.connect() as conn:
            back = conn.execute(text("SELECT worklist_item_id, actor, detail FROM events ORDER BY id DESC")).first()
        assert back[:2] == (1, "reader1")
        assert json.loads(back[2]) == json.loads(draft("9.1", "pneumonia", "RLL consolidation"))
    finally:
        engine.dispose()
