"""The ``pacsbridge`` command.  Each subcommand is registered by an ``_add_<name>`` function.

Settings come from ``--config FILE`` (or PACSBRIDGE_CONFIG) plus PACSBRIDGE_* environment
variables; an invalid value stops the command with a message naming the key (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from pacsbridge import __version__
from pacsbridge.config import ConfigError, Settings, load_settings

log = logging.getLogger("pacsbridge")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # pynetdicom is chatty at INFO (every PDU/DIMSE message); keep it for DEBUG runs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # APScheduler logs every job run at INFO (every few seconds): keep that for DEBUG runs too.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    setup_logging(settings.log_level)
    return settings


# -- serve -------------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    from pacsbridge.daemon import Daemon

    settings = _settings(args)
    log.info("pacsbridge %s starting (data dir %s)", __version__, settings.data_dir.resolve())
    return Daemon(settings).run()


def _cmd_worker(args: argparse.Namespace) -> int:
    from pacsbridge.daemon import StartupError, WorkerDaemon

    settings = _settings(args)
    log.info("pacsbridge %s worker starting (data dir %s)", __version__, settings.data_dir.resolve())
    try:
        return WorkerDaemon(settings).run()
    except StartupError as exc:
        print(f"pacsbridge worker: cannot start: {exc}", file=sys.stderr)
        return 1


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="run only the inference worker (extra worker processes; no DICOM, no HTTP)",
        description="Score instances that `pacsbridge serve` stored, until SIGTERM or SIGINT (then finish the "
        "batch in hand and exit 0).  Uses the same configuration as serve: the same database and the same "
        "data_dir (spool), and the model settings.  It does not migrate: the database must already be at the "
        "latest schema.  Several workers never score one instance twice; on PostgreSQL run as many as the "
        "hardware allows, on SQLite they must share serve's host and one write lock (one is usually enough). "
        "worker_enabled only concerns serve.",
    )
    p.set_defaults(func=_cmd_worker)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the daemon (DICOM receiver and the configured stages) until SIGTERM/SIGINT",
        description="Migrate the database to the latest schema, then receive DICOM (C-ECHO, C-STORE) and run "
        "the configured stages until SIGTERM or SIGINT; then stop accepting associations, let the running "
        "ones finish and exit 0.",
    )
    p.set_defaults(func=_cmd_serve)


# -- db ----------------------------------------------------------------------------------------
def _cmd_db(args: argparse.Namespace) -> int:
    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine

    settings = _settings(args)
    engine = make_engine(settings.database_url)
    try:
        if args.db_command == "upgrade":
            migrations.upgrade(engine, args.revision)
        elif args.db_command == "downgrade":
            migrations.downgrade(engine, args.revision)
        print(f"database {engine.url.render_as_string(hide_password=True)} at revision "
              f"{migrations.current_revision(engine)} (head {migrations.head_revision()})")
    finally:
        engine.dispose()
    return 0


def _add_db(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: upgrade (to the latest), downgrade, current",
                       description="Manage the database schema with the Alembic migrations shipped in alembic/.")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="{upgrade,downgrade,current}")
    up = dbsub.add_parser("upgrade", help="apply migrations up to REVISION (default: head, the latest)")
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="revert migrations down to REVISION (e.g. base: drops every table)")
    down.add_argument("revision")
    dbsub.add_parser("current", help="print the current and latest revision")
    p.set_defaults(func=_cmd_db)


# -- status ------------------------------------------------------------------------------------
def _cmd_status(args: argparse.Namespace) -> int:
    from pacsbridge.status import collect_status
    from pacsbridge.store.db import make_engine, make_sessionmaker

    settings = _settings(args)
    engine = make_engine(settings.database_url)
    try:
        status = collect_status(settings, make_sessionmaker(engine))
    except Exception as exc:  # noqa: BLE001 - e.g. the database is down or not migrated yet
        print(f"pacsbridge: cannot read status: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(status, indent=None, sort_keys=True))
    else:
        for key, value in status.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="counts of instances by state and other facts, from the database",
                       description="Print what pacsbridge holds: instances received/pending/predicted/not_analysed, "
                       "schema revision, database.  --json prints one JSON object (stable keys).")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_status)


# -- predict -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _results_stream() -> Iterator[TextIO]:
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


def _cmd_predict(args: argparse.Namespace) -> int:
    from pacsbridge.inference.files import iter_input_files, score_files
    from pacsbridge.model.artifact import ModelError, load_model

    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:
        print(f"pacsbridge predict: error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:
        model = load_model(Path(args.model) if args.model else settings.model_path, settings.device,
                           age_gate=settings.age_gate, ood_gate=settings.ood_gate)
    except ModelError as exc:
        print(f"pacsbridge predict: cannot load the model: {exc}", file=sys.stderr)
        return 1
    results = score_files(iter_input_files(Path(p) for p in args.paths), model,
                          batch_size=args.batch_size or max(settings.inference_batch_size, 16),
                          heatmaps=Path(args.heatmaps) if args.heatmaps else None)
    try:
        with _results_stream() as out:
            for r in results:
                if args.json:
                    out.write(json.dumps(r) + "\n")
                elif r.get("skipped"):
                    out.write(f"{r['path']}\tskipped: {r['reason']}\n")
                else:
                    verdict = "POSITIVE" if r["positive"] else "negative"
                    extra = f"\theatmap {r['heatmap']}" if r.get("heatmap") else ""
                    out.write(f"{r['path']}\t{r['probability']:.4f}\t{verdict}{extra}\n")
    except BrokenPipeError:  # e.g. piped into `head`
        with contextlib.suppress(OSError):
            sys.stderr.close()
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="score DICOM files or folders with the model (no daemon, no database)",
        description="Score each DICOM file (folders are searched recursively) with the configured model. "
        "Every file gives one line: its probability and verdict, or 'skipped' with the reason (not a chest "
        "radiograph, not DICOM, unreadable, outside the model's intended use, ...). --json prints one JSON "
        "object per file: {path, sop_instance_uid, probability, positive, threshold, model, ood_score} or "
        "{path, skipped: true, reason}. "
        "Exit status 2 only for usage errors (e.g. a PATH that does not exist).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM file or folder")
    p.add_argument("--json", action="store_true", help="one JSON object per file per line")
    p.add_argument("--model", metavar="FILE", help="model artifact (.pt with its .json card); default: model_path")
    p.add_argument("--batch-size", type=int, default=0, metavar="N", help="images per model call (default 16)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a Grad-CAM overlay PNG (not for diagnostic use) "
                   "for every scored image into DIR")
    p.set_defaults(func=_cmd_predict)


# -- worklist ----------------------------------------------------------------------------------
def _cmd_worklist(args: argparse.Namespace) -> int:
    from pacsbridge.store.db import make_engine, make_sessionmaker
    from pacsbridge.worklist.items import list_worklist

    settings = _settings(args)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = list_worklist(session, include_completed=args.all)
    except Exception as exc:  # noqa: BLE001 - e.g. the database is down or not migrated yet
        print(f"pacsbridge: cannot read the worklist: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("worklist is empty")
    else:
        print(f"{'priority':>9}  {'prob':>6}  {'status':<11}  {'received_at':<25}  study_instance_uid")
        for r in rows:
            print(f"{r['priority']:9.3f}  {r['probability']:6.3f}  {r['status']:<11}  {r['received_at']:<25}  "
                  f"{r['study_instance_uid']}")
    return 0


def _add_worklist(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worklist", help="the radiologists' worklist in priority order",
        description="Print open worklist items (one per study with a positive prediction), highest priority "
        "first. --json prints one JSON list of {study_instance_uid, priority, probability, status, received_at}.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--all", action="store_true", help="include completed items")
    p.set_defaults(func=_cmd_worklist)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsbridge",
        description="AI triage bridge for chest radiographs: a DICOM Storage SCP that scores each image "
        "and keeps a prioritized worklist.",
        epilog="Settings: --config FILE (TOML) or PACSBRIDGE_CONFIG, overridden by PACSBRIDGE_<KEY> environment "
        "variables; see deploy/pacsbridge.example.toml for every key.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $PACSBRIDGE_CONFIG)")
    parser.add_argument("--version", action="version", version=f"pacsbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_worker, _add_db, _add_status, _add_predict, _add_worklist):
        add(sub)
    _accept_config_anywhere(parser)
    return parser


def _accept_config_anywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --config after the command too (`pacsbridge serve --config FILE`, `db upgrade --config F`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                                     help="TOML configuration file (default: $PACSBRIDGE_CONFIG)")
                _accept_config_anywhere(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"pacsbridge: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
