"""Site validation: score a site's labelled files, measure, and propose the site's operating point.

Scoring goes through :class:`pacsbridge.scoring.Scorer`, the one path of ``predict`` and of the
daemon (decode, header gates, age gate, model, the active calibration).  The one difference: the
OOD gate is applied here, with the model's own method, after scoring, so that one pass gives the
result at the cut in force *and* at the proposed site cut.

Counting (as triage sees it): a labelled pneumonia that is refused is a miss; a refused normal is
not flagged.  The same rates over the scored units only are reported beside them.  With a study key
(``study_instance_uid``, ``accession_number``) a unit is a study: its score is the highest score of
its images that are in scope, and it is refused when none of them is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..inference.gates import ood_refusal
from ..model.artifact import LoadedModel
from ..scoring import Scorer, score_paths
from ..store.reasons import headline
from . import stats
from .calibration import ood_ceiling
from .labels import FileIndex, Labels

STUDY_KEYS = ("study_instance_uid", "accession_number")
OOD_REASON = "out of distribution"
THRESHOLD_RULE = ("highest threshold whose one-sided lower Wilson bound (confidence {confidence}) on sensitivity, "
                  "refused pneumonia counted as missed, is at least the target {target}")


class ValidationInputError(Exception):
    """The labels cannot be used (too many unusable rows, nothing to validate): one line, exit 2."""


@dataclass
class ImageRecord:
    path: Path
    sop_instance_uid: str | None
    probability: float | None     # None: refused before the OOD gate (reason says why)
    ood_score: float | None
    reason: str | None
    study_key: str | None = None


@dataclass
class Unit:
    key: str
    label: int
    images: list[ImageRecord] = field(default_factory=list)


@dataclass
class Options:
    target_sensitivity: float = 0.95
    ood_keep: float = 0.97
    confidence: float = 0.80
    #: Confidence of the bound on the share of the site's images kept in scope (a refused pneumonia is a
    #: miss, so this one is kept high whatever ``confidence`` is).
    ood_confidence: float = 0.95
    min_per_class: int = 50
    max_unusable_share: float = 0.1
    batch_size: int = 16


def score_for_validation(files: list[Path], model: LoadedModel, batch_size: int = 16,
                         progress: Callable[[int, int], None] | None = None,
                         max_decoded_bytes: int | None = None) -> list[ImageRecord]:
    """One record per file, through the one scoring path with the OOD decision left to the caller.

    Only scored images keep their OOD score: the site's OOD cut is set on the images that pass every
    other gate, as in the daemon (an adult hand refused by its header must not loosen it)."""
    ungated = dataclasses.replace(model, ood_gate=False)
    scorer = Scorer(ungated) if max_decoded_bytes is None else Scorer(ungated, max_decoded_bytes=max_decoded_bytes)
    out: list[ImageRecord] = []
    for path, o in score_paths(files, scorer, batch_size):
        if o.probability is None:
            out.append(ImageRecord(path, o.sop_instance_uid, None, None, o.reason or "not scored"))
        else:
            out.append(ImageRecord(path, o.sop_instance_uid, o.probability, o.ood_score, None))
        if progress is not None:
            progress(len(out), len(files))
    return out


def _study_keys(records: list[ImageRecord], column: str) -> None:
    """Study Instance UID or Accession Number of every file (header only)."""
    import pydicom

    tag = "StudyInstanceUID" if column == "study_instance_uid" else "AccessionNumber"
    for rec in records:
        try:
            ds = pydicom.dcmread(rec.path, stop_before_pixels=True, specific_tags=[tag])
            value = ds.get(tag)
            rec.study_key = str(value).strip() if value else None
        except Exception:  # noqa: BLE001 - not DICOM, unreadable: no key (the scoring result says why)
            rec.study_key = None


def join(labels: Labels, records: list[ImageRecord], roots: list[Path]) -> tuple[list[Unit], dict[str, Any]]:
    """Units (labelled images or studies) and the accounting of rows and files that could not be used."""
    bad: list[dict[str, Any]] = [{"line": line, "key": key, "reason": why} for line, key, why in labels.bad]
    units: list[Unit] = []
    used: set[int] = set()
    column = labels.key_column
    if column == "path":
        index = FileIndex.build([r.path for r in records], roots)
        claimed: dict[int, int] = {}
        for row in labels.rows:
            i, why = index.find(row.key)
            if i is None:
                bad.append({"line": row.line, "key": row.key, "reason": why})
            elif i in claimed:
                bad.append({"line": row.line, "key": row.key, "reason": f"same file as line {claimed[i]}"})
            else:
                claimed[i] = row.line
                used.add(i)
                units.append(Unit(row.key, row.label, [records[i]]))
    elif column == "sop_instance_uid":
        by_sop: dict[str, int] = {}
        for i, r in enumerate(records):
            if r.sop_instance_uid and r.sop_instance_uid not in by_sop:
                by_sop[r.sop_instance_uid] = i
        for row in labels.rows:
            i = by_sop.get(row.key)
            if i is None:
                bad.append({"line": row.line, "key": row.key, "reason": "matches no file found"})
            else:
                used.add(i)
                units.append(Unit(row.key, row.label, [records[i]]))
    else:
        _study_keys(records, column)
        by_study: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.study_key:
                by_study.setdefault(r.study_key, []).append(i)
        for row in labels.rows:
            idx = by_study.get(row.key)
            if not idx:
                bad.append({"line": row.line, "key": row.key, "reason": "matches no file found"})
            else:
                used.update(idx)
                units.append(Unit(row.key, row.label, [records[i] for i in idx]))
    unlabelled = [str(r.path) for i, r in enumerate(records) if i not in used]
    accounting = {
        "key_column": column, "rows": labels.total_rows, "rows_used": len(units), "rows_unusable": len(bad),
        "unusable": sorted(bad, key=lambda b: b["line"]), "files_found": len(records),
        "files_without_label": len(unlabelled), "files_without_label_examples": unlabelled[:50],
    }
    return units, accounting


def _refused_by_ood(model: LoadedModel, score: float | None, cut: float | None) -> bool:
    """The OOD gate's decision at ``cut`` (the model's own rule: gate on, statistics present, score over it)."""
    if cut is None or score is None or model.ood is None or not model.ood_gate:
        return False
    return not math.isfinite(score) or score > cut


def _category(reason: str) -> str:
    """Refusal reasons grouped for counting (the numbers and details of each image dropped)."""
    return headline(reason) or reason[:60]


@dataclass
class UnitOutcome:
    label: int
    score: float | None   # None: refused
    reason: str | None


def evaluate_units(units: list[Unit], model: LoadedModel, cut: float | None) -> list[UnitOutcome]:
    out = []
    for u in units:
        kept = [im.probability for im in u.images
                if im.probability is not None and not _refused_by_ood(model, im.ood_score, cut)]
        if kept:
            out.append(UnitOutcome(u.label, max(kept), None))
            continue
        first = u.images[0]
        if first.reason is not None:
            reason = first.reason
        elif first.ood_score is not None and cut is not None:
            reason = ood_refusal(first.ood_score, cut) or OOD_REASON
        else:
            reason = "not scored"
        out.append(UnitOutcome(u.label, None, reason))
    return out


def operating_point(outcomes: list[UnitOutcome], threshold: float | None, cut: float | None) -> dict[str, Any]:
    """Rates at ``threshold``: triage view (refused pneumonia = miss) and over the scored units only."""
    labels = [o.label for o in outcomes]
    flagged = [o.score is not None and threshold is not None and o.score >= threshold for o in outcomes]
    triage = stats.rates(stats.confusion(labels, flagged))
    scored = [(o.label, f) for o, f in zip(outcomes, flagged) if o.score is not None]
    only = stats.rates(stats.confusion([y for y, _ in scored], [f for _, f in scored]))
    refused = [o for o in outcomes if o.score is None]
    ood_refused = sum(1 for o in refused if o.reason and ("out-of-distribution" in o.reason or o.reason == OOD_REASON))
    return {
        "threshold": threshold, "ood_threshold": cut, **triage,
        "scored": len(scored), "refused": len(refused),
        "refusal_rate": len(refused) / len(outcomes) if outcomes else None,
        "ood_refused": ood_refused, "ood_refusal_rate": ood_refused / len(outcomes) if outcomes else None,
        "scored_only": {k: only[k] for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci",
                                             "ppv", "ppv_ci", "npv", "npv_ci", "tp", "fn", "fp", "tn")},
    }


def data_hash(units: list[Unit]) -> str:
    """SHA-256 of the sorted (image identity, label) list: which data a calibration came from."""
    lines = sorted(f"{im.sop_instance_uid or im.path.name}\t{u.label}" for u in units for im in u.images)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _check_usable(units: list[Unit], accounting: dict[str, Any], opts: Options) -> None:
    """Stop with :class:`ValidationInputError` when too many label rows are unusable or none is left."""
    rows = accounting["rows"]
    if rows and accounting["rows_unusable"] / rows > opts.max_unusable_share:
        raise ValidationInputError(
            f"{accounting['rows_unusable']} of {rows} label rows are unusable (more than "
            f"{opts.max_unusable_share:.0%}), e.g. line {accounting['unusable'][0]['line']}: "
            f"{accounting['unusable'][0]['reason']}")
    if not units:
        raise ValidationInputError("no labelled file to validate (check the key column and the PATHs)")


def _site_ood_cut(units: list[Unit], model: LoadedModel, opts: Options,
                  current_cut: float | None) -> tuple[float | None, float | None, float | None]:
    """(local cut, site cut, model ceiling).  The site's OOD cut keeps ``ood_keep`` of the site's own images
    that reached the model (with one-sided confidence ``ood_confidence``), never looser than the ceiling."""
    ceiling = ood_ceiling(model)
    site_oods = [im.ood_score for u in units for im in u.images
                 if im.ood_score is not None and math.isfinite(im.ood_score)]
    if ceiling is not None and site_oods:
        local = stats.keep_cut(site_oods, opts.ood_keep, opts.ood_confidence)
        return local, min(local, ceiling), ceiling
    return None, current_cut, ceiling


def _proposal(site: list, site_cut: float | None, local: float | None, ceiling: float | None,
              opts: Options) -> dict[str, Any]:
    """The proposed operating point: the site threshold (lower Wilson bound) at the site's OOD cut."""
    found = stats.site_threshold([o.score for o in site if o.label == 1], opts.target_sensitivity, opts.confidence)
    proposed = operating_point(site, found[0] if found else None, site_cut)
    proposed["ood_local_cut"] = local
    proposed["ood_ceiling"] = ceiling
    proposed["rule"] = THRESHOLD_RULE.format(confidence=opts.confidence, target=opts.target_sensitivity)
    if found is None:
        proposed["why_none"] = (f"no threshold reaches a lower bound of {opts.target_sensitivity} on sensitivity with "
                                f"{sum(1 for o in site if o.label == 1)} pneumonia units at confidence {opts.confidence}")
    return proposed


def _calibration_refusal(site: list, proposed: dict[str, Any], accounting: dict[str, Any],
                         opts: Options) -> str | None:
    """Why no calibration may be written from this result (too few scored per class, no threshold)."""
    pos_scored = sum(1 for o in site if o.label == 1 and o.score is not None)
    neg_scored = sum(1 for o in site if o.label == 0 and o.score is not None)
    if pos_scored < opts.min_per_class or neg_scored < opts.min_per_class:
        return (f"too few scored labelled {'studies' if accounting['key_column'] in STUDY_KEYS else 'images'}: "
                f"{pos_scored} pneumonia and {neg_scored} normal, at least {opts.min_per_class} of each are needed "
                "(validation_min_per_class)")
    if proposed["threshold"] is None:
        return proposed["why_none"]
    return None


def validate(units: list[Unit], accounting: dict[str, Any], model: LoadedModel, opts: Options) -> dict[str, Any]:
    """The full result (the ``--json`` object); raises :class:`ValidationInputError` for unusable labels."""
    _check_usable(units, accounting, opts)
    current_cut = model.ood.threshold if model.ood is not None else None
    current = evaluate_units(units, model, current_cut)
    refused_by: Counter[str] = Counter(
        OOD_REASON if o.reason and "out-of-distribution" in o.reason else _category(o.reason or "")
        for o in current if o.score is None)
    pos_scores = [o.score for o in current if o.label == 1 and o.score is not None]
    neg_scores = [o.score for o in current if o.label == 0 and o.score is not None]
    auc = stats.auc_delong(pos_scores, neg_scores)
    local, site_cut, ceiling = _site_ood_cut(units, model, opts, current_cut)
    site = evaluate_units(units, model, site_cut)
    proposed = _proposal(site, site_cut, local, ceiling, opts)
    n_pos = sum(1 for u in units if u.label == 1)
    return {
        "n": len(units), "n_pneumonia": n_pos, "n_normal": len(units) - n_pos,
        "unit": "study" if accounting["key_column"] in STUDY_KEYS else "image",
        "images": sum(len(u.images) for u in units),
        "scored": sum(1 for o in current if o.score is not None),
        "refused": dict(sorted(refused_by.items())),
        "auc": auc.auc if auc else None, "auc_ci": list(auc.ci) if auc else None,
        "auc_method": auc.method if auc else None,
        "at_current": {**operating_point(current, model.threshold, current_cut), "calibration": model.calibration_id},
        "proposed": proposed,
        "target_sensitivity": opts.target_sensitivity, "confidence": opts.confidence, "ood_keep": opts.ood_keep,
        "ood_confidence": opts.ood_confidence, "min_per_class": opts.min_per_class,
        "calibration_refused": _calibration_refusal(site, proposed, accounting, opts),
        "model": {"model_id": model.model_id, "weights_sha256": model.weights_sha256,
                  "calibration": model.calibration_id},
        "labels": accounting, "data_sha256": data_hash(units),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def calibration_content(result: dict[str, Any]) -> dict[str, Any]:
    """What ``--write-calibration`` writes, from a validation result that allows one."""
    p = result["proposed"]
    return {
        "model_id": result["model"]["model_id"], "weights_sha256": result["model"]["weights_sha256"],
        "threshold": p["threshold"], "ood_threshold": p["ood_threshold"],
        "target_sensitivity": result["target_sensitivity"], "confidence": result["confidence"],
        "ood_keep": result["ood_keep"], "rule": p["rule"],
        "validated": {k: p[k] for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "ppv",
                                        "npv", "ood_refusal_rate")} | {"auc": result["auc"], "auc_ci": result["auc_ci"]},
        "data": {"n_pneumonia": result["n_pneumonia"], "n_normal": result["n_normal"], "unit": result["unit"],
                 "images": result["images"], "key_column": result["labels"]["key_column"],
                 "sha256": result["data_sha256"], "created_at": result["created_at"],
                 "scored_under": result["model"]["calibration"]},
    }


class Progress:
    """One line on stderr every ``every_s`` seconds (and at the end) while files are scored."""

    def __init__(self, stream: Any, every_s: float = 3.0) -> None:
        self._stream, self._every = stream, every_s
        self._start = self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= self._every or done == total:
            self._last = now
            rate = done / max(now - self._start, 1e-9)
            self._stream.write(f"validate: {done}/{total} files scored ({rate:.0f}/s, {now - self._start:.0f} s)\n")
            self._stream.flush()
