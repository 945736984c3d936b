"""``db upgrade|downgrade|current``: the database schema."""

from __future__ import annotations

import argparse

from .common import CommandError, command_settings, first_line, open_database


def run(args: argparse.Namespace) -> int:
    from pacsbridge.store import migrations

    settings = command_settings(args)
    # current only reads: it never creates a database to report on it.
    engine = open_database(settings, "inspect" if args.db_command == "current" else "migrate")
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if args.db_command == "upgrade":
            migrations.upgrade(engine, args.revision)
        elif args.db_command == "downgrade":
            migrations.downgrade(engine, args.revision)
        print(f"database {shown} at revision {migrations.current_revision(engine)} (head {migrations.head_revision()})")
    except Exception as exc:  # noqa: BLE001 - unreachable server, unknown revision...: one line, no traceback
        raise CommandError(f"database {shown}: {first_line(exc)}") from None
    finally:
        engine.dispose()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: upgrade (to the latest), downgrade, current",
                       description="Manage the database schema with the Alembic migrations shipped in the package.")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="{upgrade,downgrade,current}")
    up = dbsub.add_parser("upgrade", help="apply migrations up to REVISION (default: head, the latest)")
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="revert migrations down to REVISION (e.g. base: drops every table)")
    down.add_argument("revision")
    dbsub.add_parser("current", help="print the current and latest revision")
    p.set_defaults(func=run)
