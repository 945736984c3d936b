"""``status``: counts of instances by state and other facts, from the database."""

from __future__ import annotations

import argparse
import json

from .common import command_settings, database


def run(args: argparse.Namespace) -> int:
    from pacsbridge.status import collect_status

    settings = command_settings(args)
    with database(settings, "read", "status") as sessions:
        status = collect_status(settings, sessions)
    if args.json:
        print(json.dumps(status, indent=None, sort_keys=True))
    else:
        for key, value in status.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="counts of instances by state and other facts, from the database",
                       description="Print what pacsbridge holds: instances received/pending/predicted/not_analysed, "
                       "schema revision, database.  --json prints one JSON object (stable keys).")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
