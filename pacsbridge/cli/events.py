"""``events``: the audit trail, newest first."""

from __future__ import annotations

import argparse
import json

from .common import CommandError, command_settings, database_session


def run(args: argparse.Namespace) -> int:
    from pacsbridge.store.events import MAX_LIMIT, list_events, parse_since

    if not 1 <= args.limit <= MAX_LIMIT:
        raise CommandError(f"--limit must be between 1 and {MAX_LIMIT}")
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise CommandError(f"--since: {exc}") from None
    with database_session(command_settings(args), "read", "events") as session:
        rows = list_events(session, kind=args.kind, since=since, limit=args.limit)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no events" + (f" of kind {args.kind}" if args.kind else "") + (" in that time" if since else ""))
    else:
        print(f"{'at (UTC)':<19}  {'level':<7}  {'kind':<22}  {'actor / peer':<24}  detail")
        for r in rows:
            who = r["actor"] or r["peer"] or "-"
            print(f"{r['at'][:19]}  {r['level']:<7}  {r['kind']:<22}  {who:<24.24}  {r['detail'] or ''}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "events", help="the audit trail: rejections, failures, claims, forwards (newest first)",
        description="Print recorded events, newest first: rejected associations (association_rejected, "
        "association_aborted), refused or failed C-STOREs (store_rejected, store_failed), images not analysed "
        "(not_analysed), faults while scoring (analysis_failed), worklist claims and completions, dead forwards "
        "(outbox_dead), users and tokens. "
        "Reads the database only (creates nothing). --json prints one JSON list of objects with at, kind, "
        "level, actor, detail (and peer, instance_id, worklist_item_id).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--kind", metavar="K", help="only this kind, e.g. store_rejected")
    p.add_argument("--since", metavar="T", help="only from T on: an ISO date/time (2026-12-01, "
                   "2026-12-01T20:00:00Z) or a duration back from now (90m, 24h, 7d)")
    p.add_argument("--limit", metavar="N", type=int, default=100, help="at most N events (default 100, max 1000)")
    p.set_defaults(func=run)
