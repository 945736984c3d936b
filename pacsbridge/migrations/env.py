"""Alembic environment: runs migrations against the URL from pacsbridge's settings.

``pacsbridge db upgrade`` passes the URL (and sometimes an open connection) through the Alembic
Config; the plain ``alembic`` command falls back to load_settings() (PACSBRIDGE_* env / config).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from pacsbridge.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    from pacsbridge.store.db import make_engine

    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
    finally:
        engine.dispose()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from pacsbridge.config import load_settings

    return load_settings().database_url


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
