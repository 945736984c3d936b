"""Ground truth from the RIS: ``pacsbridge labels import FILE.csv`` and the ``labels`` table it owns.

The CSV has a header row, a ``finding`` column (``pneumonia``, ``no_pneumonia`` or ``other``, any
case) and a study key: ``study_instance_uid`` or ``accession_number`` (when both columns are there,
a row's UID is used when it has one, else its accession number); ``reported_at`` (ISO 8601 date or
date and time; UTC when no offset is given) is optional.

Each usable row becomes one ``labels`` row keyed by (source file name, study key), so importing
the same file twice changes nothing and a corrected file of the same name updates its findings.
A label for a study pacsbridge has not received yet is kept; :func:`match_labels` (at import and
from the monitoring job) links it once the study arrives.  Rows that cannot be used are counted
and named one line each (line number, key, why); they change nothing.

Worklist completions are labels too (source ``reader``) but are not copied here: they are read
from the completed items where they are (:func:`label_counts`).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from .labels import read_csv_table
from ..store.models import Finding, Label, Study, WorklistItem, WorklistStatus, utcnow

KEY_COLUMNS = ("study_instance_uid", "accession_number")
FINDINGS = tuple(f.value for f in Finding)
#: Limits: a RIS export is thousands of rows, not millions; a huge file is a mistake.
MAX_ROWS = 1_000_000
MAX_SOURCE = 200
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class LabelsImportError(Exception):
    """The file cannot be a labels file at all (the message says why); nothing was imported."""


@dataclass
class ParsedRow:
    line: int
    key: str          # uid:<uid> or acc:<accession>
    study_instance_uid: str | None
    accession_number: str | None
    finding: str
    reported_at: datetime | None


@dataclass
class ImportResult:
    source: str
    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    matched: int = 0            # labels of this source linked to a received study
    bad: list[dict[str, Any]] = field(default_factory=list)  # {"line", "key", "reason"}

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "added": self.added, "updated": self.updated,
                "unchanged": self.unchanged, "matched": self.matched, "bad": self.bad}


def _parse_time(raw: str) -> datetime:
    text = raw.strip().replace("Z", "+00:00")
    if re.fullmatch(r"\d{8}", text):  # DICOM DA
        text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    dt = datetime.fromisoformat(text)
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def parse_labels(path: Path) -> tuple[list[ParsedRow], list[dict[str, Any]], int]:
    """(usable rows, bad rows, rows read).  Raises :class:`LabelsImportError` for an unusable file."""
    names, reader = read_csv_table(path, LabelsImportError, "'finding' and a study key")
    keys, col = _columns(path, names)
    rows: list[ParsedRow] = []
    bad: list[dict[str, Any]] = []
    first: dict[str, ParsedRow] = {}
    conflicted: set[str] = set()
    total = 0
    try:
        for row in reader:
            if not any(c.strip() for c in row):
                continue  # blank line
            total += 1
            if total > MAX_ROWS:
                raise LabelsImportError(f"{path}: more than {MAX_ROWS} rows")
            cells = {name: row[i].strip() if i < len(row) else "" for name, i in col.items()}
            parsed = _parse_row(cells, reader.line_num, keys)
            if isinstance(parsed, dict):
                bad.append(parsed)
                continue
            prior = first.get(parsed.key)
            if prior is None:
                first[parsed.key] = parsed
                rows.append(parsed)
            elif prior.finding != parsed.finding:
                # Which report is right is unknown: neither is used.
                bad.append({"line": parsed.line, "key": parsed.study_instance_uid or parsed.accession_number,
                            "reason": f"finding differs from line {prior.line}"})
                conflicted.add(parsed.key)
            # the same study and finding again: harmless, used once
    except csv.Error as exc:
        raise LabelsImportError(f"{path}: line {reader.line_num}: {exc}") from None
    for key in conflicted:
        prior = first[key]
        rows.remove(prior)
        bad.append({"line": prior.line, "key": prior.study_instance_uid or prior.accession_number,
                    "reason": "finding differs on a later line"})
    bad.sort(key=lambda b: b["line"])
    return rows, bad, total


def _columns(path: Path, names: list[str]) -> tuple[list[str], dict[str, int]]:
    """The study key columns present and the index of every column read; raises for a header without them."""
    if "finding" not in names:
        raise LabelsImportError(f"{path}: no 'finding' column in the header ({', '.join(names) or 'empty'})")
    keys = [k for k in KEY_COLUMNS if k in names]
    if not keys:
        raise LabelsImportError(f"{path}: no study key column; the header needs {' or '.join(KEY_COLUMNS)}")
    return keys, {n: names.index(n) for n in ("finding", "reported_at", *KEY_COLUMNS) if n in names}


def _parse_row(cells: dict[str, str], line: int, keys: list[str]) -> ParsedRow | dict[str, Any]:
    """One row as a :class:`ParsedRow`, or the bad-row entry (line, key, why) when it cannot be used."""
    uid, acc = cells.get("study_instance_uid", ""), cells.get("accession_number", "")
    shown = uid or acc
    if uid:
        if len(uid) > 64 or not _UID_RE.match(uid):
            return {"line": line, "key": uid[:64], "reason": "study_instance_uid is not a valid UID"}
        key = f"uid:{uid}"
    elif acc:
        if len(acc) > 16:
            return {"line": line, "key": acc[:16], "reason": "accession_number longer than 16 characters"}
        key = f"acc:{acc}"
    else:
        return {"line": line, "key": "", "reason": f"no {' or '.join(keys)}"}
    raw_finding = cells["finding"]
    finding = raw_finding.lower()
    if finding not in FINDINGS:
        return {"line": line, "key": shown, "reason": f"unknown finding {raw_finding[:40]!r} ({', '.join(FINDINGS)})"}
    reported: datetime | None = None
    if cells.get("reported_at"):
        try:
            reported = _parse_time(cells["reported_at"])
        except ValueError:
            return {"line": line, "key": shown,
                    "reason": f"reported_at {cells['reported_at'][:40]!r} is not an ISO 8601 date"}
    return ParsedRow(line, key, uid or None, None if uid else acc, finding, reported)


def import_labels(session: Session, path: Path, source: str | None = None) -> ImportResult:
    """Parse ``path`` and upsert its usable rows under ``source`` (default: the file name)."""
    source = (source or path.name)[:MAX_SOURCE]
    rows, bad, total = parse_labels(path)
    result = ImportResult(source, rows=total, bad=bad)
    now = utcnow()
    existing = {lab.study_key: lab for lab in session.scalars(select(Label).where(Label.source == source))}
    for r in rows:
        lab = existing.get(r.key)
        if lab is None:
            session.add(Label(source=source, study_key=r.key, study_instance_uid=r.study_instance_uid,
                              accession_number=r.accession_number, finding=r.finding, reported_at=r.reported_at,
                              imported_at=now))
            result.added += 1
        elif lab.finding != r.finding or _same_time(lab.reported_at, r.reported_at) is False:
            lab.finding, lab.reported_at, lab.imported_at = r.finding, r.reported_at, now
            result.updated += 1
        else:
            result.unchanged += 1
    session.flush()
    match_labels(session)
    result.matched = int(session.scalar(select(func.count()).select_from(Label).where(
        Label.source == source, Label.study_id.is_not(None))) or 0)
    return result


def _same_time(a: datetime | None, b: datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    a = a if a.tzinfo else a.replace(tzinfo=timezone.utc)
    return a == b


def match_labels(session: Session) -> int:
    """Link labels to studies received since they were imported; returns how many were linked.

    Cost: the unmatched labels only (each one index lookup).  An accession number shared by
    several studies is ambiguous and stays unmatched."""
    by_uid = (select(Study.id).where(Study.study_instance_uid == Label.study_instance_uid)
              .correlate(Label).scalar_subquery())
    n = session.execute(
        update(Label).where(Label.study_id.is_(None), Label.study_instance_uid.is_not(None),
                            select(Study.id).where(Study.study_instance_uid == Label.study_instance_uid)
                            .correlate(Label).exists())
        .values(study_id=by_uid).execution_options(synchronize_session=False)).rowcount or 0
    one_acc = (select(func.min(Study.id)).where(Study.accession_number == Label.accession_number)
               .correlate(Label).group_by(Study.accession_number).having(func.count() == 1).scalar_subquery())
    n += session.execute(
        update(Label).where(Label.study_id.is_(None), Label.accession_number.is_not(None),
                            one_acc.is_not(None))
        .values(study_id=one_acc).execution_options(synchronize_session=False)).rowcount or 0
    return int(n)


def label_counts(session: Session) -> dict[str, int]:
    """RIS labels (matched to a received study or not), reader labels (completed items), and the
    studies where a RIS label and a reader finding disagree on pneumonia (both are kept; ``other``
    and ``no_pneumonia`` agree: neither is pneumonia)."""
    ris = int(session.scalar(select(func.count()).select_from(Label)) or 0)
    matched = int(session.scalar(select(func.count()).select_from(Label).where(Label.study_id.is_not(None))) or 0)
    done = and_(WorklistItem.status == WorklistStatus.COMPLETED.value, WorklistItem.finding.is_not(None))
    reader = int(session.scalar(select(func.count()).select_from(WorklistItem).where(done)) or 0)
    disagree = int(session.scalar(
        select(func.count(func.distinct(Label.study_id))).select_from(Label)
        .join(WorklistItem, WorklistItem.study_id == Label.study_id)
        .where(done, (WorklistItem.finding == Finding.PNEUMONIA.value) != (Label.finding == Finding.PNEUMONIA.value)))
        or 0)
    return {"ris": ris, "ris_matched": matched, "ris_unmatched": ris - matched, "reader": reader,
            "disagreements": disagree}
