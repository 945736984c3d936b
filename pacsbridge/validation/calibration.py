"""Site calibration files: what ``pacsbridge validate --write-calibration`` proposes, and applying one.

A calibration file is JSON (``format`` = :data:`FORMAT`) with the site's pneumonia threshold and
out-of-distribution cut, the target they were chosen for, what data they came from (counts, a hash
of the file list and labels, the date) and the model id and weights SHA-256 they belong to.

It is applied in one place, when the model is loaded (:func:`load_site_model`), so the worker,
``predict``, ``validate`` and the HTTP API all decide with the same operating point.  A file made
for other weights, or one that cannot be read, stops start-up (:class:`CalibrationError`).  Its
short id (:func:`calibration_id`: ``site-`` + the first 12 hex digits of the file's SHA-256) is
recorded with every prediction; ``model`` means the model card's own threshold decided.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..model.artifact import LoadedModel, load_model

log = logging.getLogger(__name__)

FORMAT = "pacsbridge-site-calibration-1"
MODEL = "model"
MAX_BYTES = 1 << 20


class CalibrationError(Exception):
    """The calibration file cannot be used; the message names the file and the reason."""


def calibration_id(raw: bytes) -> str:
    return "site-" + hashlib.sha256(raw).hexdigest()[:12]


def ood_ceiling(model: LoadedModel) -> float | None:
    """The loosest OOD cut a site may use: the artifact's ``ceiling`` when it has one, else its threshold."""
    if model.ood is None:
        return None
    ceiling = getattr(model.ood, "ceiling", None)
    return float(ceiling) if ceiling is not None else float(model.ood.threshold)


def write_calibration(path: Path, content: dict[str, Any]) -> str:
    """Write ``content`` (``format`` added) to ``path``; returns the file's calibration id."""
    raw = (json.dumps({"format": FORMAT, **content}, indent=2, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
    return calibration_id(raw)


def read_calibration(path: Path) -> tuple[dict[str, Any], str]:
    """The parsed file and its id; :class:`CalibrationError` when unreadable or malformed."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise CalibrationError(f"site_calibration {path}: larger than {MAX_BYTES} bytes, not a calibration file")
        raw = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"site_calibration {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"site_calibration {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"site_calibration {path}: not a pacsbridge site calibration (format {FORMAT!r})")
    thr = data.get("threshold")
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not (0.0 <= thr <= 1.0):
        raise CalibrationError(f"site_calibration {path}: threshold must be a number in [0, 1], not {thr!r}")
    ood = data.get("ood_threshold")
    if ood is not None and (not isinstance(ood, (int, float)) or isinstance(ood, bool) or not math.isfinite(ood)):
        raise CalibrationError(f"site_calibration {path}: ood_threshold must be a finite number or null")
    for key in ("model_id", "weights_sha256"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CalibrationError(f"site_calibration {path}: {key} is missing")
    return data, calibration_id(raw)


def apply_calibration(model: LoadedModel, calibration: dict[str, Any], cal_id: str,
                      source: Path | str = "calibration") -> LoadedModel:
    """A copy of ``model`` deciding with the calibration's threshold and OOD cut.

    Refused (:class:`CalibrationError`) when the file was made for other weights, or its OOD cut is
    looser than the model's ceiling (a site may refuse more than the model, never less).
    """
    if calibration["weights_sha256"] != model.weights_sha256:
        raise CalibrationError(
            f"site_calibration {source}: made for model {calibration['model_id']} (weights sha256 "
            f"{calibration['weights_sha256'][:12]}...), not for the loaded {model.model_id} "
            f"({model.weights_sha256[:12]}...); validate again with this model")
    ood = model.ood
    cut = calibration.get("ood_threshold")
    if cut is not None and ood is not None:
        ceiling = ood_ceiling(model)
        if ceiling is not None and float(cut) > ceiling + 1e-12:
            raise CalibrationError(f"site_calibration {source}: ood_threshold {cut:.4g} is looser than the "
                                   f"model's ceiling {ceiling:.4g}")
        ood = dataclasses.replace(ood, threshold=float(cut))
    return dataclasses.replace(model, threshold=float(calibration["threshold"]), ood=ood, calibration_id=cal_id)


def load_site_model(settings: Any, model_path: Path | str | None = None, *, device: str | None = None) -> LoadedModel:
    """The configured model with the configured site calibration applied (the one place it is applied).

    Raises ``ModelError`` (the model) or :class:`CalibrationError` (the calibration file).
    """
    model = load_model(model_path or settings.model_path, device or settings.device,
                       age_gate=settings.age_gate, ood_gate=settings.ood_gate)
    path = settings.site_calibration
    if path is None:
        return model
    data, cal_id = read_calibration(Path(path))
    return apply_calibration(model, data, cal_id, source=path)


def calibration_summary(settings: Any) -> dict[str, Any]:
    """For ``pacsbridge status``: the active calibration, read from the file (no model loaded)."""
    path = settings.site_calibration
    if path is None:
        return {"id": MODEL, "file": None}
    try:
        data, cal_id = read_calibration(Path(path))
    except CalibrationError as exc:
        return {"id": None, "file": str(path), "error": str(exc)}
    card_sha = None
    try:
        card_sha = json.loads(Path(settings.model_path).with_suffix(".json").read_text()).get("weights_sha256")
    except (OSError, ValueError):
        pass
    return {"id": cal_id, "file": str(path), "threshold": data["threshold"], "ood_threshold": data.get("ood_threshold"),
            "model_id": data["model_id"], "target_sensitivity": data.get("target_sensitivity"),
            "created_at": (data.get("data") or {}).get("created_at"), "matches_model": card_sha == data["weights_sha256"]}


def record_calibration(sessions: Any, model: LoadedModel, source: Path | str | None) -> bool:
    """Record a ``calibration_changed`` event when the calibration in force differs from the last one
    recorded (or none was recorded yet); True when one was written."""
    from sqlalchemy import select

    from ..store.models import Event

    with sessions.begin() as session:
        last = session.scalars(select(Event.detail).where(Event.kind == "calibration_changed")
                               .order_by(Event.id.desc()).limit(1)).first()
        previous = last.split(" ", 1)[0] if last else None
        if previous == model.calibration_id:
            return False
        ood = model.ood.threshold if model.ood is not None else None
        where = f"file {source}" if source else "the model card"
        session.add(Event(kind="calibration_changed", level="warning" if previous else "info", detail=(
            f"{model.calibration_id} (was {previous or 'not recorded'}; {where}; model {model.model_id}; "
            f"threshold {model.threshold:.6g}; OOD cut {'none' if ood is None else f'{ood:.6g}'})")[:2000]))
    log.info("calibration in force: %s (was %s)", model.calibration_id, previous or "not recorded")
    return True
