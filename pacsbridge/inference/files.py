"""Score DICOM files directly (``pacsbridge predict``): no daemon, no database.

Every input file gives exactly one result, in input order: a score, or ``skipped`` with a reason.
Nothing a file contains can stop the run: unreadable, non-DICOM, truncated, non-chest, exotic
codecs and special files (FIFOs, devices) are all skipped with a reason.  The intended-use gates
(age, out-of-distribution; see :mod:`.gates`) refuse the same way, as the daemon's worker does.
With ``heatmaps`` a Grad-CAM overlay PNG is written for every scored image.

A skipped file is either refused for what it is, or hit a fault of the system (``"failed": true``
in its result; run it again once the fault is fixed), as the daemon's worker classifies them
(``not_analysed`` / ``failed``, see :mod:`pacsbridge.inference.worker`).  Scoring is the daemon's
own path (:class:`pacsbridge.scoring.Scorer`); every result carries ``state`` and ``reasons`` (all
the reasons a file was refused, each ``{"code", "text"}``; ``reason`` joins their texts):

==============================================================  ================
cause                                                           result
==============================================================  ================
not a regular file (FIFO, device, folder link)                  skipped
not DICOM, unparsable, truncated, undecodable pixel data        skipped
out of scope, too large, quality gate, age, out of distribution skipped
cannot read the file (an OS error: permissions, I/O, gone)      skipped, failed
MemoryError or an OS error with an errno while decoding         skipped, failed
any other exception while decoding (a bug)                      skipped, failed
the model raised on the image, or gave a non-finite score       skipped, failed
==============================================================  ================
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..imaging import DEFAULT_MAX_DECODED_BYTES
from ..model.artifact import LoadedModel
from ..scoring import Outcome, Scorer, score_paths

log = logging.getLogger(__name__)


def iter_input_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file under named folders (recursively, sorted, links to
    folders not followed so a link loop cannot trap us)."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path, onerror=lambda e: log.warning("cannot list %s", e.filename)):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def _safe_stem(path: Path) -> str:
    """A file-name-safe stem derived from an input path (never trusted as a path itself)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "image"
    return stem[:80]


def _write_heatmap(model: LoadedModel, path: Path, outcome: Outcome, out_dir: Path, n: int) -> str | None:
    from PIL import Image

    from ..model.heatmap import grad_cam, overlay_rgb

    image, outcome.image = outcome.image, None
    if image is None:
        return None
    try:
        heat = grad_cam(model, image)
        target = out_dir / f"{n:05d}-{_safe_stem(path)}.png"
        Image.fromarray(overlay_rgb(image, heat)).save(target)
        return str(target)
    except Exception:  # noqa: BLE001 - an explanation that fails must not lose the score
        log.warning("heatmap for %s failed", path, exc_info=True)
        return None


def result_row(path: Path, outcome: Outcome, model: LoadedModel) -> dict[str, Any]:
    """The ``predict --json`` object of one file."""
    reasons = [r.as_dict() for r in outcome.reasons]
    if outcome.probability is None:
        out: dict[str, Any] = {"path": str(path), "skipped": True, "reason": outcome.reason}
        if outcome.fault:
            out["failed"] = True
        if outcome.sop_instance_uid:
            out["sop_instance_uid"] = outcome.sop_instance_uid
        if outcome.ood_score is not None:
            out["ood_score"] = outcome.ood_score
        out.update(state=outcome.state, reasons=reasons)
        return out
    return {
        "path": str(path), "sop_instance_uid": outcome.sop_instance_uid, "probability": outcome.probability,
        "positive": outcome.positive, "threshold": model.threshold, "model": model.model_id,
        "calibration": model.calibration_id, "ood_score": outcome.ood_score, "state": outcome.state,
        "reasons": reasons,
    }


def score_files(files: Iterable[Path], model: LoadedModel, batch_size: int = 16,
                heatmaps: Path | None = None,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Iterator[dict[str, Any]]:
    """One result dict per file, in order (batches of up to ``batch_size`` files go through the model
    together).  Keys: ``path, sop_instance_uid, probability, positive, threshold, model, calibration, ood_score,
    state, reasons`` (``ood_score`` None when the model has no OOD statistics; ``heatmap``: the PNG written
    into ``heatmaps`` when given) or ``path, skipped, reason, state, reasons`` (plus ``failed: True`` for a
    fault of the system, ``sop_instance_uid`` when the file had one, ``ood_score`` when the model scored it
    before refusing it)."""
    if heatmaps is not None:
        Path(heatmaps).mkdir(parents=True, exist_ok=True)
    scorer = Scorer(model, max_decoded_bytes=max_decoded_bytes, keep_images=heatmaps is not None)
    for n, (path, outcome) in enumerate(score_paths(files, scorer, batch_size)):
        row = result_row(path, outcome, model)
        if heatmaps is not None:
            made = _write_heatmap(model, path, outcome, Path(heatmaps), n)
            if made is not None:
                row["heatmap"] = made
        yield row
