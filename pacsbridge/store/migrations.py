"""Schema migrations (Alembic), usable from any working directory.

The migration scripts ship inside the package (``pacsbridge/migrations/``, package data), so an
installed wheel migrates as well as a checkout.  The database URL always comes from the settings,
never from alembic.ini.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import pacsbridge


def script_location() -> Path:
    """The ``pacsbridge/migrations/`` folder; PACSBRIDGE_ALEMBIC_DIR overrides it for unusual installs."""
    override = os.environ.get("PACSBRIDGE_ALEMBIC_DIR")
    path = Path(override) if override else Path(pacsbridge.__file__).resolve().parent / "migrations"
    if not (path / "env.py").is_file():
        raise FileNotFoundError(
            f"Alembic migrations not found at {path}; the installation is incomplete "
            "(reinstall pacsbridge) or set PACSBRIDGE_ALEMBIC_DIR"
        )
    return path


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    # Alembic's Config interpolates '%'; URLs may contain escaped characters.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database behind ``engine`` to ``revision`` (default: the latest)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
