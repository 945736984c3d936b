"""``serve`` (the daemon) and ``worker`` (extra inference workers)."""

from __future__ import annotations

import argparse
import sys

from pacsbridge import __version__

from .common import command_settings, log


def run_serve(args: argparse.Namespace) -> int:
    from pacsbridge.config import parse_roles
    from pacsbridge.daemon import Daemon

    try:  # --roles overrides the config's roles
        overrides = {"roles": parse_roles(args.roles)} if args.roles is not None else {}
    except ValueError as exc:
        print(f"pacsbridge serve: --roles: {exc}", file=sys.stderr)
        return 1
    return _run(args, Daemon, "serve", "", **overrides)


def run_worker(args: argparse.Namespace) -> int:
    from pacsbridge.daemon import WorkerDaemon

    return _run(args, WorkerDaemon, "worker", " worker")


def _run(args: argparse.Namespace, kind: type, command: str, what: str, **overrides: object) -> int:
    """Run a daemon until it stops; a start-up failure is one line (JSON when log_format is json)."""
    from pacsbridge.daemon import StartupError
    from pacsbridge.logs import operator_line

    settings = command_settings(args, **overrides)
    log.info("pacsbridge %s%s starting (data dir %s)", __version__, what, settings.data_dir.resolve())
    try:
        return kind(settings).run()
    except StartupError as exc:
        print(operator_line(f"pacsbridge {command}: cannot start: {exc}", settings.log_format), file=sys.stderr)
        return 1


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the daemon (DICOM receiver and the configured stages) until SIGTERM/SIGINT",
        description="Migrate the database to the latest schema, then receive DICOM (C-ECHO, C-STORE) and run "
        "the configured stages until SIGTERM or SIGINT; then stop accepting associations, let the running "
        "ones finish and exit 0.",
    )
    p.add_argument("--roles", metavar="ROLES", help="comma-separated parts to run on this node: receiver, worker, "
                   "scheduler, api (default: the config's roles, all four)")
    p.set_defaults(func=run_serve)


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
    p.set_defaults(func=run_worker)


def add_parser(sub: argparse._SubParsersAction) -> None:
    _add_serve(sub)
    _add_worker(sub)
