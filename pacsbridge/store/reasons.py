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


def code_of(text: str) -> str:
    """A reason code for a reason text made elsewhere (the imaging layer's NotAnalysable, old rows)."""
    low = text.lower()
    for needle, code in (("out-of-distribution", "ood"), ("patient age", "age"), ("body part", "body_part"), ("not a chest", "body_part"),
                         ("view", "view"), ("too large", "too_large"), ("colour", "colour"), ("modality", "modality"),
                         ("blank image", "blank"), ("not a dicom", "not_dicom"), ("could not be parsed", "not_dicom"),
                         ("pixel data", "decode"), ("codestream", "decode"), ("unreadable image header", "header")):
        if needle in low:
            return code
    return "other"
