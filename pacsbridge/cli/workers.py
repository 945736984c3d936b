"""``workers``: the inference workers of every node sharing this database."""

from __future__ import annotations

import argparse
import json

from .common import command_settings, database_session


def run(args: argparse.Namespace) -> int:
    from pacsbridge.store.workers import list_workers

    settings = command_settings(args)
    with database_session(settings, "read", "workers") as session:
        rows = list_workers(session, settings.heartbeat_s, include_gone=args.all)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no live workers" if not args.all else "no workers recorded")
        return 0
    print(f"{'state':<8} {'kind':<6} {'host':<24} {'pid':>7} {'batch':>5} {'claims':>6}  "
          f"{'last heartbeat (UTC), age':<28} id")
    for r in rows:
        beat = f"{r['last_heartbeat'][:19]} ({r['heartbeat_age_s']:.0f} s)"
        print(f"{r['state']:<8} {r['kind']:<6} {r['host'][:24]:<24} {r['pid']:>7} {r['batch_size']:>5} "
              f"{r['claims']:>6}  {beat:<28} {r['id']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "workers", help="inference workers of every node: host, pid, batch, last heartbeat, claims held",
        description="List the live inference workers (serve's and `pacsbridge worker` processes on every node "
        "sharing this database): a worker is live while its heartbeat is within 3 x heartbeat_s.  --all adds "
        "stopped ones and lost ones (killed, frozen, host down: their claims return when their lease ends). "
        "Reads the database only.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--all", action="store_true", help="also stopped and lost workers (kept a week)")
    p.set_defaults(func=run)
