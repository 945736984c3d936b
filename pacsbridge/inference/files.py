"""Score DICOM files directly (``pacsbridge predict``): no daemon, no database.

Every input file gives exactly one result, in input order: a score, or ``skipped`` with a reason.
Nothing a file contains can stop the run: unreadable, non-DICOM, truncated, non-chest, exotic
codecs and special files (FIFOs, devices) are all skipped with a reason.  The intended-use gates
(age, out-of-distribution; see :mod:`.gates`) refuse the same way, as the daemon's worker does.
With ``heatmaps`` a Grad-CAM overlay PNG is written for every scored image.

A skipped file is either refused for what it is, or hit a fault of the system (``"failed": true``
in its result; run it again once the fault is fixed), as the daemon's worker classifies them
(``not_analysed`` / ``failed``, see :mod:`pacsbridge.inference.worker`):

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
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..imaging import NotAnalysable, read_dataset
from ..model.artifact import LoadedModel
from ..model.preprocess import preprocess
from .faults import system_fault
from .gates import AgeRange, load_gated, ood_refusal

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


@dataclass
class _Pending:
    path: Path
    sop_instance_uid: str | None
    x: torch.Tensor | None = None
    reason: str | None = None
    probability: float | None = None
    ood_score: float | None = None
    image: np.ndarray | None = None  # kept only when a heatmap is wanted
    heatmap: str | None = None
    fault: bool = False  # ``reason`` is a fault of the system, not a property of the file


def _sop_uid(ds: Any) -> str | None:
    try:
        uid = ds.get("SOPInstanceUID")
        return str(uid) if uid else None
    except Exception:  # noqa: BLE001 - a malformed element is not our problem here
        return None


def _prepare(path: Path, input_size: int, ages: AgeRange | None = None, keep_image: bool = False) -> _Pending:
    """Read, gate, decode and preprocess one file; never raises for anything the file contains."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            return _Pending(path, None, reason="not a regular file")
        with open(path, "rb"):
            pass  # permission problems reported plainly, before the DICOM reader sees them
    except OSError as exc:
        return _Pending(path, None, reason=f"cannot read the file: {exc.strerror or exc}", fault=True)
    sop = None
    try:
        ds = read_dataset(path)
        sop = _sop_uid(ds)
        result = load_gated(ds, ages)
        return _Pending(path, sop, x=preprocess(result.image, input_size),
                        image=result.image if keep_image else None)
    except NotAnalysable as exc:
        return _Pending(path, sop, reason=exc.reason, fault=system_fault(exc) is not None)
    except MemoryError:
        return _Pending(path, sop, reason="image too large for memory", fault=True)
    except Exception as exc:  # noqa: BLE001 - robust to every input: report, continue
        log.debug("unexpected error on %s", path, exc_info=True)
        return _Pending(path, sop, reason=f"unexpected error: {type(exc).__name__}: {exc}", fault=True)


def _infer(model: LoadedModel, items: list[_Pending]) -> None:
    """Fill in ``probability`` (or a ``reason``) for the items that have a model input, in one batch."""
    ready = [p for p in items if p.x is not None]
    if not ready:
        return
    probs: list[float | str]
    oods: list[float | None]
    try:
        got, oods = model.score_inputs(torch.stack([p.x for p in ready]))
        probs = list(got)
    except Exception:  # noqa: BLE001 - isolate the input the model chokes on
        log.warning("batch failed in the model; retrying one by one", exc_info=True)
        probs, oods = [], []
        for p in ready:
            try:
                got, ood = model.score_inputs(p.x.unsqueeze(0))
                probs.extend(got)
                oods.extend(ood)
            except Exception as exc:  # noqa: BLE001
                probs.append(f"the model failed on this image: {type(exc).__name__}: {exc}")
                oods.append(None)
    for p, prob, ood in zip(ready, probs, oods):
        p.x = None
        p.ood_score = None if ood is None else float(ood)
        if isinstance(prob, str):
            p.reason, p.fault = prob, True
        elif not math.isfinite(prob):
            p.reason, p.fault = "the model produced a non-finite score", True
        elif model.is_out_of_distribution(ood):
            p.reason = ood_refusal(float(ood), model.ood.threshold)  # type: ignore[arg-type,union-attr]
        else:
            p.probability = float(prob)


def _safe_stem(path: Path) -> str:
    """A file-name-safe stem derived from an input path (never trusted as a path itself)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "image"
    return stem[:80]


def _write_heatmaps(model: LoadedModel, items: list[_Pending], out_dir: Path, start: int) -> None:
    from PIL import Image

    from ..model.heatmap import grad_cam, overlay_rgb

    for n, p in enumerate(items, start):
        if p.image is None or p.probability is None:
            p.image = None
            continue
        try:
            heat = grad_cam(model, p.image)
            target = out_dir / f"{n:05d}-{_safe_stem(p.path)}.png"
            Image.fromarray(overlay_rgb(p.image, heat)).save(target)
            p.heatmap = str(target)
        except Exception:  # noqa: BLE001 - an explanation that fails must not lose the score
            log.warning("heatmap for %s failed", p.path, exc_info=True)
        p.image = None


def score_files(files: Iterable[Path], model: LoadedModel, batch_size: int = 16,
                heatmaps: Path | None = None) -> Iterator[dict[str, Any]]:
    """One result dict per file, in order (batches of up to ``batch_size`` files go through the model
    together).  Keys: ``path, sop_instance_uid, probability, positive, threshold, model, calibration, ood_score``
    (``ood_score`` None when the model has no OOD statistics; ``heatmap``: the PNG written into
    ``heatmaps`` when given) or ``path, skipped, reason`` (plus ``failed: True`` for a fault of the
    system, ``sop_instance_uid`` when the file had one, ``ood_score`` when the model scored it before
    refusing it)."""
    ages = AgeRange.from_card(model.card) if model.age_gate else None
    if heatmaps is not None:
        Path(heatmaps).mkdir(parents=True, exist_ok=True)
    chunk: list[_Pending] = []
    done = 0
    for path in files:
        chunk.append(_prepare(path, model.input_size, ages, keep_image=heatmaps is not None))
        if len(chunk) >= batch_size:
            yield from _finish(model, chunk, heatmaps, done)
            done += len(chunk)
            chunk = []
    if chunk:
        yield from _finish(model, chunk, heatmaps, done)


def _finish(model: LoadedModel, chunk: list[_Pending], heatmaps: Path | None, start: int) -> Iterator[dict[str, Any]]:
    _infer(model, chunk)
    if heatmaps is not None:
        _write_heatmaps(model, chunk, Path(heatmaps), start)
    for p in chunk:
        if p.reason is not None:
            out: dict[str, Any] = {"path": str(p.path), "skipped": True, "reason": p.reason}
            if p.fault:
                out["failed"] = True
            if p.sop_instance_uid:
                out["sop_instance_uid"] = p.sop_instance_uid
            if p.ood_score is not None:
                out["ood_score"] = p.ood_score
            yield out
        else:
            prob = float(p.probability)  # type: ignore[arg-type]
            out = {
                "path": str(p.path), "sop_instance_uid": p.sop_instance_uid, "probability": prob,
                "positive": model.is_positive(prob), "threshold": model.threshold, "model": model.model_id,
                "calibration": model.calibration_id, "ood_score": p.ood_score,
            }
            if p.heatmap is not None:
                out["heatmap"] = p.heatmap
            yield out
