"""Classification metrics, temperature and threshold selection (numpy only, no scikit-learn)."""

from __future__ import annotations

import math

import numpy as np


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (descending), like sklearn's."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(t)[distinct]
    fps = (distinct + 1) - tps
    P, N = max(t.sum(), 1), max((~t).sum(), 1)
    return np.r_[0.0, fps / N], np.r_[0.0, tps / P], np.r_[np.inf, s[distinct]]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half), via the rank-sum statistic."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def nll(y: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    p = np.clip(sigmoid(np.asarray(logits) / temperature), 1e-12, 1 - 1e-12)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(y: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimizing the NLL of ``sigmoid(logit / T)`` (golden-section on log T)."""
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(y, logits, math.exp(a)), nll(y, logits, math.exp(b))
    for _ in range(100):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(y, logits, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(y, logits, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width bins: the mean |accuracy - confidence| weighted by bin size."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - prob[m].mean())
    return float(ece)


def threshold_for_sensitivity(y: np.ndarray, prob: np.ndarray, min_sensitivity: float) -> float:
    """The highest threshold ``t`` with sensitivity of ``prob >= t`` at least ``min_sensitivity``.

    The highest such threshold keeps the most specificity for the sensitivity asked.
    """
    y = np.asarray(y, dtype=bool)
    pos = np.sort(np.asarray(prob, dtype=np.float64)[y])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive examples to choose a threshold from")
    k = int(math.ceil(min_sensitivity * len(pos)))  # positives that must be at or above t
    return float(pos[max(k, 1) - 1])


def confusion(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion matrix and the rates derived from it at ``prob >= threshold``."""
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(prob) >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    sens = tp / max(tp + fn, 1)
    spec = tn / max(tn + fp, 1)
    return {
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "sensitivity": sens, "specificity": spec,
        "accuracy": (tp + tn) / max(len(y), 1), "false_negative_rate": 1 - sens,
    }
