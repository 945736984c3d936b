"""Refusal reasons as stored: ``instances.state_reason`` (the joined text) and ``state_reasons`` (JSON).

Light on purpose (no model, no imaging): the CLI and the HTTP API read reasons through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Reason:
    """One reason an image was refused or failed: ``code`` (``age``, ``body_part``, ``ood``...) and text."""

    code: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "text": self.text}


def join_reasons(reasons: Sequence[Reason]) -> str | None:
    """The human text of all reasons, headline first (what ``state_reason`` holds)."""
    return "; ".join(r.text for r in reasons) if reasons else None


def reasons_json(reasons: Sequence[Reason]) -> str | None:
    """The reasons as stored in ``instances.state_reasons``."""
    return json.dumps([r.as_dict() for r in reasons]) if reasons else None


def reasons_from_row(state_reason: str | None, stored: str | None) -> list[dict[str, str]]:
    """The structured reasons of a stored instance: the recorded list when it belongs to the current
    ``state_reason`` (rows from before the list was recorded, and moves that only set the text, get
    one reason with a code guessed from the text)."""
    if not state_reason:
        return []
    if stored:
        try:
            items = json.loads(stored)
            if join_reasons([Reason(i["code"], i["text"]) for i in items]) == state_reason:
                return [{"code": str(i["code"]), "text": str(i["text"])} for i in items]
        except (ValueError, TypeError, KeyError):
            pass
    return [{"code": code_of(state_reason), "text": state_reason}]


#: Reason codes by a needle of their text, checked in this order.  Texts that wrap a message from
#: elsewhere (a parser's, a codec's exception) come first, so that words inside that message (a
#: "view", a "modality") decide nothing.  Each needle is a phrase the gates really write (imaging/,
#: inference/gates.py, scoring.py); tests/test_reason_codes.py holds code_of to the scoring path's codes.
_CODE_NEEDLES: tuple[tuple[str, str], ...] = (
    ("unreadable image header", "header"),
    ("could not be parsed", "not_dicom"), ("not a dicom", "not_dicom"),
    ("no pixel data", "pixel_data"),
    ("too large", "too_large"),
    ("pixel data could not be decoded", "decode"), ("refused without decoding", "decode"),
    ("could not be decoded", "decode"), ("codestream", "decode"), ("pixel data", "decode"),
    ("out-of-distribution", "ood"), ("out of distribution", "ood"), ("image unlike this model", "ood"),
    ("patient age", "age"),
    ("body part", "body_part"), ("not chest", "body_part"), ("not a chest", "body_part"),
    ("limb or breast", "body_part"), ("description names", "body_part"),
    ("view", "view"),
    ("modality", "modality"),
    ("colour", "colour"),
    ("1-bit image", "bitmap"),
    ("too small", "too_small"),
    ("not a 2-d image", "quality"),
    ("blank image", "blank"),
    ("not a regular file", "not_regular_file"),
    ("file not found", "read_error"), ("cannot read the file", "read_error"),
    ("the model failed", "model_error"), ("non-finite score", "non_finite"),
)


#: Every reason code (what ``state_reasons`` and ``pacsbridge_refusals_total`` use).
CODES: tuple[str, ...] = tuple(sorted({code for _, code in _CODE_NEEDLES} | {"other"}))


def code_of(text: str) -> str:
    """A reason code for a reason text made elsewhere (the imaging layer's NotAnalysable, old rows,
    the audit trail's ``not_analysed`` events); ``other`` for a text no needle names."""
    low = text.lower()
    return next((code for needle, code in _CODE_NEEDLES if needle in low), "other")


def headline(joined: str | None) -> str:
    """The first reason up to its first ";", ":" or "(", e.g. "not a chest image (BodyPartExamined
    HAND)" -> "not a chest image": what refusals are counted under when shown to people."""
    return (joined or "").split(";", 1)[0].split(":", 1)[0].split("(", 1)[0].strip()


def split_reasons(joined: str | None) -> list[str]:
    """The reason texts of a joined ``state_reason`` (or a ``not_analysed`` event's detail).

    Some reasons hold "; " themselves ("lateral view (View Position LL); the model reads frontal
    views"): a part that names no reason of its own, or that only says what the model reads, is
    kept with the reason before it.
    """
    out: list[str] = []
    for part in (joined or "").split("; "):
        if out and (code_of(part) == "other" or part.startswith("the model reads")):
            out[-1] = f"{out[-1]}; {part}"
        elif part:
            out.append(part)
    return out
