"""The worklist priority policy: a pure function, so it can be read, tested and tuned in one place.

A higher number is read first.  The score is built from three bands:

* ``probability`` (0..1): the model's calibrated probability of pneumonia for the study
  (the highest over the study's images).
* urgency from the order (0..1): STAT adds 1.0 and HIGH adds 0.5, so a STAT order outranks any
  routine study on probability alone.
* waiting (0..1, then +OVERDUE_BONUS): a linear ramp over ``max_wait_minutes`` so that older studies
  drift up; once a study has waited ``max_wait_minutes`` it gets a jump that puts it above every
  item that has not (a fresh item scores at most 2.0, a not-yet-overdue one below 3.0, an overdue
  one at least 3.0 + 1.0).  Among overdue items, probability and urgency still order them.

Scores only ever go up with time; the store keeps ``max(old, new)`` so that a re-computation can
never push an item down the list.
"""

from __future__ import annotations

import math

#: Added for the order's requested priority (DICOM RequestedProcedurePriority/Priority values).
URGENCY_BOOST: dict[str, float] = {"STAT": 1.0, "HIGH": 0.5}
#: Most the waiting ramp adds before a study becomes overdue.
AGING_WEIGHT = 1.0
#: Added once a study has waited ``max_wait_minutes``: larger than any score a non-overdue item can reach.
OVERDUE_BONUS = 3.0


def urgency_boost(requested_priority: str | None) -> float:
    """Boost for the order's requested priority; unknown or missing values add nothing."""
    if not requested_priority:
        return 0.0
    return URGENCY_BOOST.get(requested_priority.strip().upper(), 0.0)


def priority_score(
    probability: float, waited_minutes: float, requested_priority: str | None, max_wait_minutes: float
) -> float:
    """Priority of a worklist item (higher = read sooner).

    ``probability`` is clamped to [0, 1] and ``waited_minutes`` to >= 0 (clock skew between the
    receiver and the scheduler must not make a study look younger than fresh).
    """
    if max_wait_minutes <= 0:
        raise ValueError("max_wait_minutes must be positive")
    if not math.isfinite(probability):
        raise ValueError(f"probability must be finite, got {probability!r}")
    p = min(max(float(probability), 0.0), 1.0)
    waited = max(float(waited_minutes), 0.0)
    score = p + urgency_boost(requested_priority) + AGING_WEIGHT * min(waited / max_wait_minutes, 1.0)
    if waited >= max_wait_minutes:
        score += OVERDUE_BONUS
    return score


#: Audit items (blinded reads of negatives) score in [AUDIT_BASE, AUDIT_BASE + AGING_WEIGHT]: below 0,
#: so below every flag (a flag scores at least its probability, >= 0), whatever either has waited.
AUDIT_BASE = -2.0


def audit_priority_score(waited_minutes: float, max_wait_minutes: float) -> float:
    """Priority of an audit item: the waiting ramp only (no probability: the read is blinded, and
    no order urgency or overdue jump, which would lift it among the flags)."""
    if max_wait_minutes <= 0:
        raise ValueError("max_wait_minutes must be positive")
    waited = max(float(waited_minutes), 0.0)
    return AUDIT_BASE + AGING_WEIGHT * min(waited / max_wait_minutes, 1.0)
