"""``outbox list|retry``: results waiting to be forwarded, sent or dead."""

from __future__ import annotations

import argparse
import json

from pacsbridge.config import Settings

from .common import CommandError, command_settings, database, database_session


def run(args: argparse.Namespace) -> int:
    settings = command_settings(args)
    if args.outbox_command == "list":
        return _list(args, settings)
    return _retry(args, settings)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from pacsbridge.forward import outbox

    with database_session(settings, "read", "the outbox") as session:
        rows = outbox.list_entries(session, state=args.state, limit=args.limit or None)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("outbox is empty" + (f" (state {args.state})" if args.state else ""))
    else:
        print(f"{'id':>6}  {'state':<7}  {'tries':>5}  {'destination':<16}  {'object':<7}  sop_instance_uid / last error")
        for r in rows:
            print(f"{r['id']:>6}  {r['state']:<7}  {r['attempts']:>5}  {r['destination']:<16}  {r['object']:<7}  "
                  f"{r['sop_instance_uid']}" + (f"  {r['last_error']}" if r["last_error"] else ""))
    return 0


def _retry(args: argparse.Namespace, settings: Settings) -> int:
    from pacsbridge.forward import outbox

    if not args.ids and not args.all_dead:
        raise CommandError("give entry IDs or --all-dead", status=2)
    with database(settings, "write", "the outbox") as sessions:
        moved = outbox.retry(sessions, args.ids, all_dead=args.all_dead)
    not_dead = sorted(set(args.ids) - set(moved))
    print(f"{len(moved)} entr{'y' if len(moved) == 1 else 'ies'} queued again"
          + (f"; not dead (left as they are): {not_dead}" if not_dead else ""))
    return 0 if moved or args.all_dead else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "outbox", help="results waiting to be forwarded, sent or dead; retry dead ones",
        description="Each result makes one outbox entry per destination and object (sr, heatmap, images, oru). "
        "Entries are pending until the destination acknowledged them (sent) or failed permanently or for too "
        "long (dead, with the reason).  `retry` queues dead entries again (after fixing the configuration).",
    )
    from pacsbridge.store.models import OutboxState

    osub = p.add_subparsers(dest="outbox_command", required=True, metavar="{list,retry}")
    ls = osub.add_parser("list", help="list entries, newest first")
    ls.add_argument("--json", action="store_true", help="one JSON list of {id, destination, object, state, attempts, "
                    "last_error, object_uid, study_instance_uid, sop_instance_uid, positive, probability, created_at, "
                    "next_attempt_at, sent_at}")
    ls.add_argument("--state", choices=[s.value for s in OutboxState], help="only entries in this state")
    ls.add_argument("--limit", type=int, default=0, metavar="N", help="at most N entries")
    rt = osub.add_parser("retry", help="queue dead entries again: IDs, or --all-dead")
    rt.add_argument("ids", nargs="*", type=int, metavar="ID")
    rt.add_argument("--all-dead", action="store_true", help="every dead entry")
    p.set_defaults(func=run)
