"""``stats``: live performance per model and calibration."""

from __future__ import annotations

import argparse
import json
import sys

from .common import CommandError, command_settings, database_session


def _fmt_rate(r: dict | None, value_key: str = "value") -> str:
    if not r or r.get(value_key) is None:
        return "-"
    ci = r.get("ci")
    return f"{r[value_key]:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "") + f" n={r.get('n', 0)}"


def run(args: argparse.Namespace) -> int:
    from pacsbridge.store.events import parse_since
    from pacsbridge.validation.live import live_stats

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:  # this line's form predates `pacsbridge <command>:` and scripts match it
        print(f"pacsbridge: stats: --since: {exc}", file=sys.stderr)
        return 1
    settings = command_settings(args)
    if args.weekly:
        return _weekly(args, settings)
    with database_session(settings, "read", "stats") as session:
        out = {**live_stats(session, since), "mode": settings.mode}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"mode: {out['mode']}" + ("  (shadow mode: nothing goes on the worklist or to the destinations)"
                                    if out["mode"] == "shadow" else ""))
    print(f"window: since {out['window']['since'][:19]} UTC")
    if not out["models"]:
        print("no predictions recorded yet")
    for m in out["models"]:
        for label, e in (("total", m), ("window", m["window"])):
            ppv = {"value": e["ppv"], "ci": e["ppv_ci"], "n": e["completed_total"]}
            t = e["receipt_to_completion_s"]
            print(f"{m['model_id']} ({m['calibration']}) {label}: {e['scored']} images scored, {e['flagged']} flagged; "
                  f"PPV {_fmt_rate(ppv)}; "
                  f"sensitivity {_fmt_rate(e['sensitivity'])} ({e['sensitivity']['method']}); "
                  f"NPV {_fmt_rate(e['npv'])}; receipt to read p50 {t['p50'] if t['p50'] is not None else '-'} s; "
                  f"audits {e['audit']['sampled']} sampled, {e['audit']['completed']} read, "
                  f"{e['audit']['pneumonia']} pneumonia")
    refused = out["refused"]["window"]
    print("refused in the window: " + (", ".join(f"{k}: {v}" for k, v in refused.items()) or "none"))
    lab = out["labels"]
    print(f"labels: {lab['ris']} from the RIS ({lab['ris_unmatched']} not matched to a received study yet), "
          f"{lab['reader']} reader findings, {lab['disagreements']} studies where they disagree")
    return 0


def _weekly(args: argparse.Namespace, settings: object) -> int:
    from pacsbridge.validation.weekly import MAX_WEEKS, week_rows, weekly_figures

    if not 1 <= args.weeks <= MAX_WEEKS:
        raise CommandError(f"--weeks must be 1 to {MAX_WEEKS}, got {args.weeks}")
    with database_session(settings, "read", "stats") as session:
        out = weekly_figures(session, args.weeks)
    print(json.dumps(out) if args.json else "\n".join(week_rows(out)))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="live performance per model and calibration: PPV, sensitivity, NPV, refusals",
        description="Per model and calibration, in total and over a window: images and studies scored and flagged, "
        "PPV of flags read by radiologists (Wilson 95 %% interval), sensitivity from RIS labels "
        "(pacsbridge labels import) or estimated from blinded audit reads of negatives, NPV from RIS labels, "
        "receipt-to-read time, refusals by reason, label counts. Reads the database "
        "only. --json prints the object GET /api/stats serves.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--since", metavar="T", help="start of the window: an ISO date/time or a duration back from now "
                   "(90m, 24h, 7d); default the last 30 days")
    p.add_argument("--weekly", action="store_true", help="per ISO week (UTC) instead: scored, flag rate, refusal "
                   "rate, PPV and sensitivity with 95 %% intervals (--json: the object GET /api/stats/weekly serves)")
    p.add_argument("--weeks", type=int, default=12, metavar="N", help="with --weekly: the last N weeks (default 12)")
    p.set_defaults(func=run)
