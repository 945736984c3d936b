"""The labels CSV of a site validation, and its join with the files found.

A header row; a ``label`` column (``pneumonia``/``normal`` or ``1``/``0``, any case) and one key
column: the first present of ``path``, ``sop_instance_uid``, ``study_instance_uid``,
``accession_number``.  A ``path`` is a file path (absolute, relative to the working directory or
to a PATH given to ``validate``) or a bare file name (which must name one file only).

Every row is either used or counted as unusable with its reason (unknown label, empty key, key
that matches no file, duplicate key, ambiguous file name); files found without a label are
counted too.  Nothing here raises for what the file contains except :class:`LabelsError` for a
file that cannot be a labels CSV at all (no header, no label or key column, unreadable).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

KEY_COLUMNS = ("path", "sop_instance_uid", "study_instance_uid", "accession_number")
LABEL_VALUES = {"pneumonia": 1, "1": 1, "normal": 0, "0": 0}
#: Limits: a labels file is a few thousand rows; a huge one is a mistake, not a site.
MAX_BYTES = 64 * 1024 * 1024
MAX_ROWS = 1_000_000


class LabelsError(Exception):
    """The labels file cannot be used at all (the message says why)."""


@dataclass
class LabelRow:
    line: int     # line number in the CSV (header = 1)
    key: str
    label: int


@dataclass
class Labels:
    key_column: str
    rows: list[LabelRow]
    #: (line, key or raw value, reason) of every row that cannot be used.
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    total_rows: int = 0


def read_csv_table(path: Path, error: type[Exception], needed: str) -> tuple[list[str], Iterator[list[str]]]:
    """The lower-cased header and a reader of the remaining rows of a UTF-8 CSV of at most
    :data:`MAX_BYTES` (comma, semicolon or tab separated).  Every problem with the file itself is
    ``error`` with one line; ``needed`` says what the header must hold."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise error(f"{path}: {size} bytes, more than the {MAX_BYTES} a labels file may have")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = next(reader)
    except StopIteration:
        raise error(f"{path} is empty (a header row with {needed} is needed)") from None
    except csv.Error as exc:
        raise error(f"{path}: not a CSV file: {exc}") from None
    return [h.strip().lower() for h in header], reader


def read_labels(path: Path) -> Labels:
    """Parse the CSV; rows with an unknown label, an empty key or a duplicate key go to ``bad``."""
    names, reader = read_csv_table(path, LabelsError, "'label' and a key column")
    if "label" not in names:
        raise LabelsError(f"{path}: no 'label' column in the header ({', '.join(names) or 'empty'})")
    key_column = next((k for k in KEY_COLUMNS if k in names), None)
    if key_column is None:
        raise LabelsError(f"{path}: no key column; the header needs one of {', '.join(KEY_COLUMNS)}")
    li, ki = names.index("label"), names.index(key_column)
    out = Labels(key_column, [])
    seen: dict[str, int] = {}
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            out.total_rows += 1
            if out.total_rows > MAX_ROWS:
                raise LabelsError(f"{path}: more than {MAX_ROWS} rows")
            line = reader.line_num
            key = row[ki].strip() if ki < len(row) else ""
            raw = row[li].strip() if li < len(row) else ""
            if not key:
                out.bad.append((line, raw, f"empty {key_column}"))
                continue
            label = LABEL_VALUES.get(raw.lower())
            if label is None:
                out.bad.append((line, key, f"unknown label {raw!r} (pneumonia, normal, 1 or 0)"))
                continue
            norm = _norm_key(key_column, key)
            if norm in seen:
                out.bad.append((line, key, f"duplicate {key_column} (first on line {seen[norm]})"))
                # the first occurrence is unusable too: which label is right is unknown
                first = next((r for r in out.rows if _norm_key(key_column, r.key) == norm), None)
                if first is not None:
                    out.rows.remove(first)
                    out.bad.append((first.line, first.key, f"duplicate {key_column} (again on line {line})"))
                continue
            seen[norm] = line
            out.rows.append(LabelRow(line, key, label))
    except csv.Error as exc:
        raise LabelsError(f"{path}: line {reader.line_num}: {exc}") from None
    return out


def _norm_key(column: str, key: str) -> str:
    return key if column == "path" else key.strip()


@dataclass
class FileIndex:
    """Files found under the PATHs, searchable by full path, path relative to a PATH, and name."""

    roots: list[Path]
    by_path: dict[str, int] = field(default_factory=dict)
    by_name: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, files: list[Path], roots: list[Path]) -> "FileIndex":
        idx = cls([r.resolve() for r in roots])
        for i, f in enumerate(files):
            idx.by_path[str(f.resolve())] = i
            idx.by_name.setdefault(f.name, []).append(i)
        return idx

    def find(self, key: str) -> tuple[int | None, str | None]:
        """(file index, None) or (None, why not)."""
        candidates = [Path(key)] if Path(key).is_absolute() else [Path(key)] + [r / key for r in self.roots]
        for c in candidates:
            got = self.by_path.get(str(c.resolve()))
            if got is not None:
                return got, None
        if "/" not in key and "\\" not in key:
            named = self.by_name.get(key, [])
            if len(named) == 1:
                return named[0], None
            if len(named) > 1:
                return None, f"file name matches {len(named)} files; give the path"
        return None, "matches no file found"
