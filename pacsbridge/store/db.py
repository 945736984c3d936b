"""Engine and session set-up for SQLite (WAL, foreign keys) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs: object) -> Engine:
    """Create an engine; for SQLite, turn on WAL, foreign keys and a busy timeout per connection."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged instance survives power loss
            cur.execute("PRAGMA busy_timeout=30000")
            # 32 MiB of pages per connection (default 2 MiB): the live figures probe indexes all over
            # a large history, and a small cache makes them read the same pages again and again.
            cur.execute("PRAGMA cache_size=-32768")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)  # reconnect transparently after a database restart
    if url.startswith("postgresql"):
        # Fail fast when the server is unreachable: a C-STORE waiting on the database holds its sender.
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
