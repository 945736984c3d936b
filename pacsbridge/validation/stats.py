"""Statistics of a site validation: Wilson intervals, AUC with a DeLong interval, the site threshold rule.

Pure functions on plain numbers and numpy arrays; nothing here knows DICOM or the model.

The site threshold rule (:func:`site_threshold`): the highest threshold at which the one-sided
lower Wilson bound (confidence ``confidence``; `validate` uses 0.80 unless told otherwise) on the sensitivity is still at least
the target.  Why: the sensitivity measured on a site's few hundred positives is itself an
estimate.  Choosing the threshold where the *measured* sensitivity just reaches the target (the
plain empirical quantile) gives a threshold whose true sensitivity is below the target about half
the time.  Requiring the lower confidence bound to reach the target means that, if the site's
future patients are like the validated ones, the true sensitivity is at least the target with
that confidence.  The price is a lower threshold (more flagged normals) the fewer positives there
are; with more positives the margin shrinks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

#: Two-sided 95 % normal quantile.
Z95 = NormalDist().inv_cdf(0.975)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for ``successes`` out of ``n`` (None when n == 0)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower Wilson bound at ``confidence`` (0.0 when n == 0)."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    return wilson_interval(successes, n, z)[0]  # type: ignore[index]


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


@dataclass(frozen=True)
class AucResult:
    auc: float
    ci: tuple[float, float]
    se: float
    method: str = "DeLong (1988), normal approximation, 95 %"


def auc_delong(positives: Sequence[float], negatives: Sequence[float]) -> AucResult | None:
    """AUC (ties count one half) with DeLong's variance and a 95 % normal interval clipped to [0, 1].

    None when either class is empty.  With one sample in a class the variance term of that class is 0.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None
    all_ranks = _midranks(np.concatenate([pos, neg]))
    # Placement values (DeLong et al. 1988; fast form of Sun & Xu 2014).
    v10 = (all_ranks[:m] - _midranks(pos)) / n          # per positive: share of negatives below it
    v01 = 1.0 - (all_ranks[m:] - _midranks(neg)) / m    # per negative: share of positives above it
    auc = float(v10.mean())
    s10 = float(v10.var(ddof=1)) if m > 1 else 0.0
    s01 = float(v01.var(ddof=1)) if n > 1 else 0.0
    se = math.sqrt(max(0.0, s10 / m + s01 / n))
    return AucResult(auc, (max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)), se)


def confusion(labels: Sequence[int], flagged: Sequence[bool]) -> dict[str, int]:
    tp = sum(1 for y, f in zip(labels, flagged) if y and f)
    fn = sum(1 for y, f in zip(labels, flagged) if y and not f)
    fp = sum(1 for y, f in zip(labels, flagged) if not y and f)
    tn = sum(1 for y, f in zip(labels, flagged) if not y and not f)
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn}


def rates(c: dict[str, int]) -> dict[str, object]:
    """Sensitivity, specificity, PPV, NPV with 95 % Wilson intervals (None where undefined)."""
    def ratio(k: int, n: int) -> float | None:
        return k / n if n else None

    def ci(k: int, n: int) -> list[float] | None:
        got = wilson_interval(k, n)
        return list(got) if got else None

    tp, fn, fp, tn = c["tp"], c["fn"], c["fp"], c["tn"]
    return {
        "sensitivity": ratio(tp, tp + fn), "sensitivity_ci": ci(tp, tp + fn),
        "specificity": ratio(tn, tn + fp), "specificity_ci": ci(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "ppv_ci": ci(tp, tp + fp),
        "npv": ratio(tn, tn + fn), "npv_ci": ci(tn, tn + fn),
        **c,
    }


def site_threshold(positive_scores: Sequence[float | None], target: float,
                   confidence: float = 0.95) -> tuple[float, int] | None:
    """The highest threshold whose one-sided lower Wilson bound on sensitivity is >= ``target``.

    ``positive_scores``: one entry per labelled positive; None for one that is not scored (refused),
    which counts as a miss at every threshold.  A positive is detected when its score >= threshold.
    Returns ``(threshold, detected)``, or None when even flagging every scored positive does not
    meet the bound (too few positives, or too many refused).
    """
    n = len(positive_scores)
    scored = sorted((s for s in positive_scores if s is not None), reverse=True)
    # Lowering the threshold to the k-th highest positive score detects k positives (ties: all of them).
    best: tuple[float, int] | None = None
    for k in range(1, len(scored) + 1):
        t = scored[k - 1]
        if k < len(scored) and scored[k] == t:
            continue  # ties: the threshold t detects all of them; judge at the last one
        if wilson_lower(k, n, confidence) >= target:
            best = (float(t), k)
            break
    return best


def reliability(probabilities: Sequence[float], labels: Sequence[int], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins of predicted probability: count, mean prediction, observed pneumonia share."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for i in range(bins):
        sel = (p >= edges[i]) & ((p < edges[i + 1]) if i < bins - 1 else (p <= edges[i + 1]))
        if sel.any():
            out.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": int(sel.sum()),
                        "mean_predicted": float(p[sel].mean()), "observed": float(y[sel].mean())})
    return out


def roc_points(positives: Sequence[float], negatives: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (for plotting), from (0,0) to (1,1)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = [0.0] + [float((pos >= t).mean()) if len(pos) else 0.0 for t in thresholds]
    fpr = [0.0] + [float((neg >= t).mean()) if len(neg) else 0.0 for t in thresholds]
    return np.asarray(fpr + [1.0]), np.asarray(tpr + [1.0])


def keep_cut(values: Sequence[float], keep: float, confidence: float = 0.95) -> float:
    """The smallest cut (one of ``values``) at which the one-sided lower Wilson bound on the share of
    values <= cut is at least ``keep``: the site's future images stay in scope at that share with that
    confidence, where a plain quantile keeps it only about half the time.  The largest value when no
    cut meets the bound (too few values)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    for k in range(max(1, math.ceil(keep * n)), n + 1):
        if k < n and v[k] == v[k - 1]:
            continue  # ties: a cut at this value keeps all of them
        if wilson_lower(k, n, confidence) >= keep:
            return float(v[k - 1])
    return float(v[-1])

