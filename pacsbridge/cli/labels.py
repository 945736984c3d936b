"""``labels import``: ground truth from the RIS."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CommandError, command_settings, database_session


def run(args: argparse.Namespace) -> int:
    from pacsbridge.validation.ris_labels import LabelsImportError, import_labels

    path = Path(args.file)
    with database_session(command_settings(args), "write", "labels") as session:
        try:
            result = import_labels(session, path, source=args.source)
        except LabelsImportError as exc:
            raise CommandError(f"{exc}; nothing imported") from None
        session.commit()
    out = result.as_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['source']}: {out['rows']} rows: {out['added']} added, {out['updated']} updated, "
              f"{out['unchanged']} unchanged, {len(out['bad'])} not usable; {out['matched']} labels of this "
              "source match a received study (the others are matched when their study arrives)")
    for b in out["bad"]:
        print(f"pacsbridge: labels import: line {b['line']}: {b['key'] or '(no key)'}: {b['reason']}", file=sys.stderr)
    return 1 if out["bad"] else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="ground truth from the RIS: import final report findings (CSV)",
                       description="Labels are the final findings of studies, used for live sensitivity, NPV and "
                       "site validation from the database.")
    lsub = p.add_subparsers(dest="labels_command", required=True, metavar="{import}")
    imp = lsub.add_parser(
        "import", help="import a CSV of findings (idempotent)",
        description="FILE.csv: a header row; a 'finding' column (pneumonia, no_pneumonia or other); a study key "
        "column 'study_instance_uid' or 'accession_number'; optional 'reported_at' (ISO 8601). Each row is kept "
        "with its source (the file name, or --source); importing the same file again changes nothing. A label for "
        "a study not received yet is kept and matched when it arrives. Rows that cannot be used are named one "
        "line each on stderr; the others are imported. Exit status 0 when every row was used, 1 when some rows "
        "(or the whole file, then nothing is imported) could not be.")
    imp.add_argument("file", metavar="FILE.csv")
    imp.add_argument("--source", metavar="NAME", help="record the rows under this source (default: the file name)")
    imp.add_argument("--json", action="store_true", help="print one JSON object: source, rows, added, updated, "
                     "unchanged, matched, bad [{line, key, reason}]")
    imp.set_defaults(func=run)
