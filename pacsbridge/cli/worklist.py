"""``worklist``: the radiologists' worklist in priority order."""

from __future__ import annotations

import argparse
import json

from .common import command_settings, database_session


def run(args: argparse.Namespace) -> int:
    from pacsbridge.worklist.items import list_worklist
    from pacsbridge.worklist.viewer import viewer_link

    settings = command_settings(args)
    with database_session(settings, "read", "the worklist") as session:
        rows = list_worklist(session, status="all" if args.all else None)
    for r in rows:  # the same link as GET /api/worklist gives
        r["viewer_url"] = viewer_link(settings.viewer_url, r["study_instance_uid"], r["accession_number"])
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("worklist is empty")
    else:
        # The reader's view at a terminal: who (patient, age), which order (accession), how urgent.
        print(f"{'id':>5}  {'priority':>8}  {'prob':>5}  {'status':<11}  {'waiting':>8}  {'patient':<24}  "
              f"{'age':>4}  {'accession':<16}  {'req':<7}  {'claimed_by':<12}  {'finding':<12}  study_instance_uid")
        for r in rows:
            prob = "audit" if r["probability"] is None else f"{r['probability']:5.3f}"  # audit: blinded read
            print(f"{r['id']:>5}  {r['priority']:8.3f}  {prob:>5}  {r['status']:<11}  "
                  f"{_age(r['waiting_s']):>8}  {_person(r['patient_name']):<24.24}  {_years(r['patient_age']):>4}  "
                  f"{r['accession_number'] or '-':<16}  {r['requested_priority'] or '-':<7}  "
                  f"{r['claimed_by'] or '-':<12}  {r['finding'] or '-':<12}  {r['study_instance_uid']}")
    return 0


def _person(name: str | None) -> str:
    """DICOM PN ``Doe^Jane`` as ``Doe Jane``; ``-`` when absent."""
    return " ".join(p for p in (name or "").split("^") if p) or "-"


def _years(age: str | None) -> str:
    """DICOM AS ``045Y`` as ``45y`` (``8mo``, ``3wk``, ``10d``); ``-`` when absent."""
    if not age or len(age) != 4 or not age[:3].isdigit():
        return age or "-"
    return f"{int(age[:3])}{ {'Y': 'y', 'M': 'mo', 'W': 'wk', 'D': 'd'}.get(age[3].upper(), age[3])}"


def _age(seconds: float) -> str:
    m = int(seconds // 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worklist", help="the radiologists' worklist in priority order",
        description="Print open (scheduled and in_progress) worklist items, highest priority first; --all adds "
        "completed and canceled ones. --json prints one JSON list with the fields of GET /api/worklist "
        "(id, status, priority, probability, study_instance_uid, accession_number, patient_name, patient_id, "
        "patient_age, study_date, study_description, modality, received_at, waiting_s, claimed_by, "
        "claim_expires_at, finding, viewer_url, kind (flag or audit), blinded, ...). An audit item (a study scored "
        "negative, sampled for a blinded quality read) shows no probability until it is completed.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--all", action="store_true", help="every state (also completed and canceled)")
    p.set_defaults(func=run)
