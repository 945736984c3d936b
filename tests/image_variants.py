"""Real radiographs (pydicom-data) changed one way each: the inputs of the scoring path's
refusal and fault cases (tests/test_scoring.py, tests/test_reason_codes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pipeline_support import sample_file


def variant(tmp: Path, name: str, source: str = "RG1_UNCR.dcm", **changes: object) -> Path:
    """``source`` with header changes (None deletes); 4 years old at the study (2004) unless changed,
    inside a 1-5 y intended use."""
    ds = pydicom.dcmread(sample_file(source))
    ds.PatientBirthDate = "20000301"
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp / f"{name}.dcm"
    ds.save_as(path)
    return path


def blank(tmp: Path) -> Path:
    """One grey level everywhere, no window in the header."""
    ds = pydicom.dcmread(variant(tmp, "blank0"))
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=np.uint16).tobytes()
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    path = tmp / "blank.dcm"
    ds.save_as(path)
    return path


def truncated(tmp: Path) -> Path:
    """The first 4,000 bytes of a real file: a readable header, no complete pixel data."""
    path = tmp / "truncated.dcm"
    path.write_bytes(sample_file("RG1_UNCR.dcm").read_bytes()[:4000])
    return path


def text_file(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("not an image\n")
    return path
