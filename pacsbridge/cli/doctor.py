"""``doctor``: check the installation (changes nothing)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pacsbridge.config import ConfigError, load_settings


def run(args: argparse.Namespace) -> int:
    from pacsbridge.doctor import run_checks
    from pacsbridge.health import Check

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a failed echo is a check line, not a log line
    from pacsbridge.config import config_path

    source = config_path(args.config)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        checks = [Check("config", False, str(exc))]
    else:
        checks = run_checks(settings, f"config file {source}" if source else "no config file (defaults and "
                            "PACSBRIDGE_* environment)")
    if args.json:
        print(json.dumps([{**c.as_dict(), "status": c.word.lower()} for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{c.word:<4} {c.name}: {c.detail}")
    return 0 if all(c.ok for c in checks) else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check the installation: config, database, spool, model, ports, destinations, certificates",
        description="One line per check (ok, warn or FAIL, and why); exit status 1 when a check fails.  "
                    "Changes nothing.")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, ok, detail, status}")
    p.set_defaults(func=run)
