"""The ``pacsbridge`` command.  Each command group is one module of this package with
``add_parser(sub)`` and its ``run`` functions; :data:`COMMANDS` lists them in help order, so adding a
command is one new module and one line here.

Settings come from ``--config FILE`` (or PACSBRIDGE_CONFIG, else /etc/pacsbridge/pacsbridge.toml when
it exists) plus PACSBRIDGE_* environment variables; an invalid value stops the command with a message
naming the key (exit status 2).  Every expected failure is one line ``pacsbridge <command>: <what>``
on stderr and exit status 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pacsbridge import __version__
from pacsbridge.config import ConfigError

from . import (
    daemon,
    db,
    doctor,
    events,
    instances,
    labels,
    outbox,
    predict,
    stats,
    status,
    users,
    validate,
    workers,
    worklist,
)
from .common import CommandError, command_name, setup_logging

__all__ = ["COMMANDS", "build_parser", "main", "setup_logging"]

#: The command groups, in the order `pacsbridge --help` lists them.
COMMANDS = (daemon, db, status, predict, validate, worklist, instances, events, users, outbox, labels, stats, doctor,
            workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsbridge",
        description="AI triage bridge for chest radiographs: a DICOM Storage SCP that scores each image "
        "and keeps a prioritized worklist.",
        epilog="Settings: --config FILE (TOML) or PACSBRIDGE_CONFIG, overridden by PACSBRIDGE_<KEY> environment "
        "variables; see deploy/pacsbridge.example.toml for every key.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $PACSBRIDGE_CONFIG, "
                        "else /etc/pacsbridge/pacsbridge.toml when it exists)")
    parser.add_argument("--version", action="version", version=f"pacsbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMANDS:
        group.add_parser(sub)
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
    name = command_name(args)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"pacsbridge {name}: configuration error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"pacsbridge {name}: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:  # a file or folder named by the operator: its name and why, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pacsbridge {name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
