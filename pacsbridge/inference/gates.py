"""Intended-use gates: refuse images the model was not made for, before and after the model runs.

* **Age gate** (header): the patient's age from Patient's Age (0010,1010), else from Patient's
  Birth Date (0010,0030) and the Study/Acquisition/Series/Content Date; outside the age range of
  the model card's ``intended_use`` -> not analysed.  A missing or malformed age is no reason to
  refuse (many sites strip it); the image-based OOD gate still applies.
* **OOD gate** (pixels): the model's out-of-distribution score above the artifact's threshold ->
  not analysed (see :mod:`pacsbridge.model.ood`).

Both apply only when the artifact carries the information (a card with an age range, an
artifact with OOD statistics) and are switched off by the ``age_gate`` / ``ood_gate`` settings.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from ..imaging import ImageResult, NotAnalysable, load_for_model, read_dataset

_DAYS_PER_YEAR = 365.2425
#: Patient's Age (VR AS): three digits and a unit; we also accept 1-3 digits (seen in the wild).
_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / _DAYS_PER_YEAR, "W": 7 / _DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}
#: Nobody is older; a larger value is a typo, not an age.
_MAX_AGE_YEARS = 130.0


@dataclass(frozen=True)
class PatientAge:
    """An age in years and where it came from (for the refusal reason)."""

    years: float
    source: str  # e.g. "Patient's Age 064Y", "Birth Date 19600101 and Study Date 20240101"

    def describe(self) -> str:
        """'64 y', '3.5 y', '11 months', '20 days'."""
        if self.years >= 2:
            whole = math.floor(self.years + 1e-9)
            return f"{whole} y"
        if self.years >= 1:
            return f"{self.years:.1f} y"
        months = self.years * 12
        if months >= 1:
            return f"{math.floor(months + 1e-9)} months"
        return f"{round(self.years * _DAYS_PER_YEAR)} days"


@dataclass(frozen=True)
class AgeRange:
    """The intended-use age range: ``min_years <= age < max_years``.

    The card says "1-5 y" meaning whole years 1 to 5, i.e. up to (not including) the sixth birthday.
    """

    min_years: float
    max_years: float  # exclusive
    label: str        # as the card states it, e.g. "1-5 y"

    def contains(self, years: float) -> bool:
        return self.min_years <= years < self.max_years

    @classmethod
    def from_card(cls, card: dict) -> "AgeRange | None":
        """The range in ``card['intended_use']['age_years']`` (``{"min", "max_exclusive"}``), or None."""
        use = card.get("intended_use")
        if not isinstance(use, dict):
            return None
        age = use.get("age_years")
        if not isinstance(age, dict):
            return None
        lo, hi = float(age["min"]), float(age["max_exclusive"])
        if not (0 <= lo < hi):
            raise ValueError(f"bad intended-use age range {age}")
        label = str(age.get("label") or f"{lo:g}-{hi:g} y")
        return cls(lo, hi, label)


def _parse_as(value: object) -> float | None:
    m = _AGE_RE.match(str(value or ""))
    if not m:
        return None
    years = int(m.group(1)) * _UNIT_YEARS[m.group(2).upper()]
    return years if years <= _MAX_AGE_YEARS else None


def _parse_da(value: object) -> date | None:
    text = str(value or "").strip().replace(".", "")  # ACR-NEMA style 1960.01.01 too
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _get(ds: Dataset, keyword: str) -> object:
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element reads as missing
        return None


def patient_age(ds: Dataset) -> PatientAge | None:
    """The patient's age at the time of the image, or None when the header does not say (or says
    nonsense: malformed Patient's Age, a birth date after the study, an age over 130 years)."""
    raw = _get(ds, "PatientAge")
    years = _parse_as(raw)
    if years is not None:
        return PatientAge(years, f"Patient's Age {str(raw).strip()}")
    birth = _parse_da(_get(ds, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword, label in (("StudyDate", "Study Date"), ("AcquisitionDate", "Acquisition Date"),
                           ("SeriesDate", "Series Date"), ("ContentDate", "Content Date")):
        when = _parse_da(_get(ds, keyword))
        if when is None:
            continue
        years = _calendar_years(birth, when)
        if years is None or years > _MAX_AGE_YEARS:
            return None  # inconsistent dates: no age rather than a wrong one
        return PatientAge(years, f"Birth Date {birth:%Y%m%d} and {label} {when:%Y%m%d}")
    return None


def _birthday(birth: date, year: int) -> date:
    try:
        return birth.replace(year=year)
    except ValueError:  # born on 29 February: the birthday is 1 March in other years
        return date(year, 3, 1)


def _calendar_years(birth: date, when: date) -> float | None:
    """Age in years on ``when``: whole years by the calendar (so the 6th birthday is exactly 6.0)
    plus the fraction of the year since the last birthday.  None when ``when`` is before ``birth``."""
    if when < birth:
        return None
    whole = when.year - birth.year - (1 if when < _birthday(birth, when.year) else 0)
    last = _birthday(birth, birth.year + whole)
    following = _birthday(birth, birth.year + whole + 1)
    return whole + (when - last).days / max((following - last).days, 1)


def age_refusal(ds: Dataset, allowed: AgeRange) -> str | None:
    """None when the age is inside ``allowed`` or unknown; else the reason to refuse."""
    age = patient_age(ds)
    if age is None or allowed.contains(age.years):
        return None
    return (f"patient age {age.describe()} is outside this model's intended use ({allowed.label}) "
            f"[{age.source}]")


def load_gated(source: str | os.PathLike | BinaryIO | Dataset, age_range: AgeRange | None = None,
               **decode_kwargs: Any) -> ImageResult:
    """:func:`pacsbridge.imaging.load_for_model` with the age gate first (cheap: header only).

    One image, the first refusal only; scoring (worker, ``predict``, ``validate``) goes through
    :class:`pacsbridge.scoring.Scorer`, which collects every reason.

    Raises :class:`~pacsbridge.imaging.NotAnalysable` for an age outside ``age_range`` (when
    given) and for everything the imaging layer refuses.  ``decode_kwargs`` go to ``load_for_model``
    (e.g. ``max_decoded_bytes``).
    """
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    if age_range is not None:
        reason = age_refusal(ds, age_range)
        if reason:
            raise NotAnalysable(reason)
    return load_for_model(ds, **decode_kwargs)


def ood_refusal(score: float, threshold: float) -> str | None:
    """None when ``score`` is within the threshold; else the reason (with both numbers)."""
    if not math.isfinite(score):
        return "out-of-distribution score is not finite: image unlike anything the model was trained on"
    if score <= threshold:
        return None
    return (f"image unlike this model's training data (out-of-distribution score {score:.2f} > "
            f"threshold {threshold:.2f}): outside its intended use")
