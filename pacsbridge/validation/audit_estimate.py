"""Sensitivity estimated from blinded audit reads of negatives (pure functions, no database).

The estimator (studies, one model and calibration, one window):

* ``F`` studies flagged, of which ``m_f`` were read, ``k_f`` of them pneumonia: PPV ``p = k_f / m_f``;
  estimated true positives ``TP = F * p`` (``= k_f`` when every flag was read).
* ``N`` studies scored negative, of which ``m_a`` had an audit read, ``k_a`` of them pneumonia: miss
  rate among negatives ``r = k_a / m_a``; estimated missed pneumonias ``FN = N * r``.  This is
  "audit pneumonias divided by the sampling fraction" with the *effective* fraction ``m_a / N``
  (equal to ``audit_fraction`` when every drawn negative was read and the day's cap was never hit).
* sensitivity ``= TP / (TP + FN)``.

Interval: sensitivity rises with ``p`` and falls with ``r``; each gets a Wilson interval at 97.5 %
(two-sided), and the ends combine the worst and best cases, so that the joint coverage is at least
95 % (Bonferroni).  It is conservative, and wide when few audit reads exist: with 2 % sampling, one
audit pneumonia stands for about 50 missed ones.  It assumes the audited negatives are a random
sample of the negatives (the hash of the UID is unrelated to the image) and that the audit reader is
right; it says nothing about studies that were refused (they are not scored negative).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

from .stats import wilson_interval

#: Each of the two proportions gets this two-sided confidence: together at least 95 % (Bonferroni).
EACH_CONFIDENCE = 0.975
Z_EACH = NormalDist().inv_cdf(1 - (1 - EACH_CONFIDENCE) / 2)
METHOD = "audit_estimate"
ESTIMATOR = ("estimated: missed pneumonias = audit pneumonias / effective sampling fraction (audit reads / negative "
             "studies); sensitivity = TP / (TP + estimated FN); interval: Wilson 97.5 % on the PPV of flags and on "
             "the audit miss rate, combined worst/best case (joint coverage >= 95 %)")


def audit_sensitivity(flagged: int, flag_reads: int, flag_pneumonia: int, negatives: int, audit_reads: int,
                      audit_pneumonia: int) -> dict[str, Any] | None:
    """``{"value", "ci", "n", "method", "estimator", "estimated_missed", "estimated_true_positive"}``,
    or None when it cannot be estimated (no audit read, or no flag read while studies were flagged)."""
    if audit_reads <= 0 or negatives <= 0 or (flagged > 0 and flag_reads <= 0):
        return None
    r = audit_pneumonia / audit_reads
    r_lo, r_hi = wilson_interval(audit_pneumonia, audit_reads, Z_EACH)  # type: ignore[misc]
    if flagged > 0:
        p = flag_pneumonia / flag_reads
        p_lo, p_hi = wilson_interval(flag_pneumonia, flag_reads, Z_EACH)  # type: ignore[misc]
    else:
        p = p_lo = p_hi = 0.0
    tp, fn = flagged * p, negatives * r

    def sens(tp_: float, fn_: float) -> float | None:
        return tp_ / (tp_ + fn_) if tp_ + fn_ > 0 else None

    value = sens(tp, fn)
    lo, hi = sens(flagged * p_lo, negatives * r_hi), sens(flagged * p_hi, negatives * r_lo)
    return {
        "value": None if value is None else round(value, 4),
        "ci": None if lo is None or hi is None else [round(lo, 4), round(hi, 4)],
        "n": audit_reads + flag_reads, "method": METHOD, "estimator": ESTIMATOR,
        "estimated_missed": round(fn, 2), "estimated_true_positive": round(tp, 2),
    }
