"""``instances``: received instances and their outcome; ``instances retry``."""

from __future__ import annotations

import argparse
import json

from .common import CommandError, command_settings, database, database_session


def run(args: argparse.Namespace) -> int:
    if getattr(args, "instances_command", None) == "retry":
        return _run_retry(args)
    from pacsbridge.store.models import InstanceState
    from pacsbridge.worklist.reports import list_instances

    with database_session(command_settings(args), "read", "instances") as session:
        rows = list_instances(session, study_instance_uid=args.study, state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no instances" + (f" ({args.state})" if args.state else ""))
    else:
        print(f"{'id':>6}  {'received (UTC)':<19}  {'state':<12}  outcome (probability, or why not analysed)  study")
    for r in rows:
        outcome = (f"{r['probability']:.4f} {'POSITIVE' if r['positive'] else 'negative'} (threshold "
                   f"{r['threshold']:.4f}, {r['model_id']})" if r["probability"] is not None else (r["reason"] or ""))
        if r["state"] == InstanceState.FAILED.value:
            outcome = (f"attempt {r['attempts']}, " + (f"next at {r['next_attempt_at'][:19]}: " if r["next_attempt_at"]
                                                        else "no retry left: ") + outcome)
        print(f"{r['id']:>6}  {r['received_at'][:19]}  {r['state']:<12}  {outcome}  study {r['study_instance_uid']}")
    return 0


def _run_retry(args: argparse.Namespace) -> int:
    from pacsbridge.store import queue

    if not args.ids and not args.all_failed:
        raise CommandError("give instance IDs or --all-failed", status=2)
    with database(command_settings(args), "write", "the database") as sessions:
        try:
            moved = queue.retry(sessions, args.ids, all_failed=args.all_failed, actor="cli")
        except (queue.InstanceNotFound, queue.NotRetryable) as exc:
            raise CommandError(f"{exc}; nothing changed") from None
    print(f"{len(moved)} instance{'' if len(moved) == 1 else 's'} queued again"
          + (f": {', '.join(map(str, moved))}" if moved and len(moved) <= 20 else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pacsbridge.store.models import InstanceState

    p = sub.add_parser(
        "instances", help="received instances with their state, probability or refusal reason; retry failed ones",
        description="Print received instances, newest first: state (received, processing, predicted, "
        "not_analysed, failed), probability and positive flag, or the reason an image was not analysed (the "
        "image was refused) or failed (a fault of the system, retried automatically up to inference_max_attempts). "
        "Use it to answer 'why was this study not flagged?'. --json prints the fields of GET /api/instances. "
        "`instances retry ID...` or `instances retry --all-failed` queues failed instances again.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    p.add_argument("--state", choices=[s.value for s in InstanceState], help="only this state (e.g. failed)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100, max 1000)")
    isub = p.add_subparsers(dest="instances_command", metavar="{retry}")
    rt = isub.add_parser("retry", help="queue failed instances again (a fresh count of attempts): IDs or --all-failed")
    rt.add_argument("ids", nargs="*", type=int, metavar="ID")
    rt.add_argument("--all-failed", action="store_true", help="every failed instance")
    p.set_defaults(func=run)
