"""The ``pacsbridge`` command.  Each subcommand is registered by an ``_add_<name>`` function.

Settings come from ``--config FILE`` (or PACSBRIDGE_CONFIG) plus PACSBRIDGE_* environment
variables; an invalid value stops the command with a message naming the key (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pacsbridge import __version__
from pacsbridge.config import ConfigError, Settings, load_settings

log = logging.getLogger("pacsbridge")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # pynetdicom is chatty at INFO (every PDU/DIMSE message); keep it for DEBUG runs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


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
    for add in (_add_serve, _add_db, _add_status):
        add(sub)
    return parser


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
