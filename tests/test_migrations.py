"""Alembic migrations on SQLite and on the real PostgreSQL: upgrade, downgrade, no drift."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from dicom_support import postgres_schema_url, postgres_unavailable_reason
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine
from pacsbridge.store.models import Base

TABLES = {"studies", "series", "instances", "predictions", "worklist_items", "events"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_schema_url() as url:
        yield url


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
