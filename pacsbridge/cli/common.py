"""What every command shares: logging set-up, settings, the one way to open the database, the error
policy (:class:`CommandError`) and the stream for machine-readable results."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from pacsbridge.config import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("pacsbridge")

#: How a command uses the database (see :func:`open_database`).
Mode = Literal["read", "write", "inspect", "migrate"]


class CommandError(Exception):
    """An expected failure: printed as one line ``pacsbridge <command>: <message>``; exit ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def command_name(args: argparse.Namespace) -> str:
    """``outbox list``, ``db current``, ``status``: the words an operator typed, for error lines."""
    words = [getattr(args, "command", None) or ""]
    for attr in ("db_command", "outbox_command", "users_command", "labels_command", "instances_command"):
        if getattr(args, attr, None):
            words.append(getattr(args, attr))
    return " ".join(w for w in words if w)


def setup_logging(level: str, log_format: str = "text") -> None:
    from pacsbridge.logs import TEXT_FORMAT, formatter

    logging.basicConfig(level=level, format=TEXT_FORMAT, stream=sys.stderr, force=True)
    if log_format != "text":  # log_format = "json": one JSON object per line (pacsbridge/logs.py)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter(log_format))
    # pynetdicom is chatty at INFO (every PDU/DIMSE message); keep it for DEBUG runs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # APScheduler logs every job run at INFO (every few seconds): keep that for DEBUG runs too.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # Alembic logs each migration step and its context at INFO on every command that opens the
    # database; highdicom logs several "copy attributes" lines per SR built.  Both are library
    # detail: shown at DEBUG, their warnings always.
    for chatty in ("alembic", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # pydicom warns (and logs) about every odd value in bad input; a hostile peer could fill the journal.
    # Those go to DEBUG: the receiver logs one WARNING line per rejected instance instead.
    logging.getLogger("pydicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _WarningsToDebug) for f in warnings_logger.filters):
        warnings_logger.addFilter(_WarningsToDebug())
    # pynetdicom logs a traceback at ERROR for each malformed PDU or DIMSE message a peer sends (then aborts
    # the association): that is the peer's error, one WARNING line without the traceback (unless DEBUG).
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.addFilter(_PynetdicomOneLine())


class _PynetdicomOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and record.levelno >= logging.ERROR:
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__})", None
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _WarningsToDebug(logging.Filter):
    """Python warnings (pydicom's included) are logged at DEBUG, and only when DEBUG is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def command_settings(args: argparse.Namespace, **overrides: object) -> Settings:
    settings = load_settings(args.config, **overrides)
    setup_logging(settings.log_level, settings.log_format)
    return settings


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (SQLAlchemy appends SQL and a URL to its messages)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {text[0] if text else ''}"[:300]


def open_database(settings: Settings, mode: Mode) -> Engine:
    """The engine every command uses; raises :class:`CommandError` with the one line saying what is wrong.

    ``read`` and ``write`` need an existing database at the latest schema revision, ``inspect`` an
    existing one at any revision: none of them creates a file, a folder or a schema (run elsewhere
    without the daemon's configuration they would otherwise make an empty ./var and report nothing).
    ``migrate`` (``db upgrade``/``downgrade``) may create the database.
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)  # only reads the revision: its INFO lines are noise
    from sqlalchemy.engine import make_url

    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine

    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    if mode != "migrate":
        _require_sqlite_file(settings, url.get_backend_name(), url.database)
    try:
        engine = make_engine(settings.database_url)
    except OSError as exc:
        raise CommandError(f"data_dir {settings.data_dir.resolve()}: {exc.strerror or exc}") from None
    if mode == "migrate":
        return engine
    try:
        current, head = migrations.current_revision(engine), migrations.head_revision()
    except Exception as exc:  # noqa: BLE001 - unreachable server, unreadable file
        engine.dispose()
        raise CommandError(f"cannot read the database {shown}: {first_line(exc)}") from None
    if mode != "inspect" and current != head:
        engine.dispose()
        raise CommandError(f"the database {shown} is at schema revision {current or 'none (empty)'}, not {head}: "
                           "run `pacsbridge db upgrade` (or start `pacsbridge serve`) with the same configuration")
    return engine


def _require_sqlite_file(settings: Settings, backend: str, database: str | None) -> None:
    if backend != "sqlite" or database in (None, "", ":memory:") or Path(database).is_file():
        return
    where = (f"data_dir {settings.data_dir}, current directory {Path.cwd()}" if not settings.data_dir.is_absolute()
             else f"data_dir {settings.data_dir}")
    raise CommandError(f"no pacsbridge database at {database} ({where}); give the daemon's configuration "
                       "(--config FILE, or PACSBRIDGE_DATA_DIR / PACSBRIDGE_DATABASE_URL), or create it with "
                       "`pacsbridge db upgrade`")


@contextlib.contextmanager
def database(settings: Settings, mode: Mode, what: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on :func:`open_database`'s engine; a database fault while using them is one line, exit 1."""
    from pacsbridge.store.db import make_sessionmaker

    engine = open_database(settings, mode)
    try:
        yield make_sessionmaker(engine)
    except CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the database went away: one line, no traceback
        raise CommandError(f"cannot {'read' if mode == 'read' else 'update'} {what}: {first_line(exc)}") from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def database_session(settings: Settings, mode: Mode, what: str) -> Iterator[Session]:
    """One session of :func:`database`."""
    with database(settings, mode, what) as sessions, sessions() as session:
        yield session


@contextlib.contextmanager
def results_stream() -> Iterator[TextIO]:
    """A stream for machine-readable results.  While it is open, anything else written to file
    descriptor 1 (a chatty C library, a stray print) goes to stderr, so stdout stays pure JSON."""
    try:
        real = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # replaced stdout (tests): nothing to protect
        real = False
    if not real:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8", buffering=1)
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):
            out.close()
        os.dup2(saved, 1)
        os.close(saved)


def load_site_model(settings: Settings, model: str | None):  # noqa: ANN201 - LoadedModel
    """The model with the site calibration applied; :class:`CommandError` saying why not."""
    from pacsbridge.model.artifact import ModelError
    from pacsbridge.validation.calibration import CalibrationError
    from pacsbridge.validation.calibration import load_site_model as load

    try:
        return load(settings, Path(model) if model else None)
    except ModelError as exc:
        raise CommandError(f"cannot load the model: {exc}") from None
    except CalibrationError as exc:
        raise CommandError(f"cannot use the site calibration: {exc}") from None


def require_paths(paths: list[str]) -> None:
    """Every PATH exists, else a usage error (exit status 2)."""
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise CommandError(f"error: no such file or folder: {', '.join(missing)}", status=2)
