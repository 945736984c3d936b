"""Score DICOM files directly (``pacsbridge predict``): no daemon, no database.

Every input file gives exactly one result, in input order: a score, or ``skipped`` with a reason.
Nothing a file contains can stop the run: unreadable, non-DICOM, truncated, non-chest, exotic
codecs and special files (FIFOs, devices) are all skipped with a reason.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..imaging import NotAnalysable, load_for_model, read_dataset
from ..model.artifact import LoadedModel
from ..model.preprocess import preprocess

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


def _sop_uid(ds: Any) -> str | None:
    try:
        uid = ds.get("SOPInstanceUID")
        return str(uid) if uid else None
    except Exception:  # noqa: BLE001 - a malformed element is not our problem here
        return None


def _prepare(path: Path, input_size: int) -> _Pending:
    """Read, gate, decode and preprocess one file; never raises for anything the file contains."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            return _Pending(path, None, reason="not a regular file")
        with open(path, "rb"):
            pass  # permission problems reported plainly, before the DICOM reader sees them
    except OSError as exc:
        return _Pending(path, None, reason=f"cannot read the file: {exc.strerror or exc}")
    sop = None
    try:
        ds = read_dataset(path)
        sop = _sop_uid(ds)
        result = load_for_model(ds)
        return _Pending(path, sop, x=preprocess(result.image, input_size))
    except NotAnalysable as exc:
        return _Pending(path, sop, reason=exc.reason)
    except MemoryError:
        return _Pending(path, sop, reason="image too large for memory")
    except Exception as exc:  # noqa: BLE001 - robust to every input: report, continue
        log.debug("unexpected error on %s", path, exc_info=True)
        return _Pending(path, sop, reason=f"unexpected error: {type(exc).__name__}: {exc}")


def _infer(model: LoadedModel, items: list[_Pending]) -> None:
    """Fill in ``probability`` (or a ``reason``) for the items that have a model input, in one batch."""
    ready = [p for p in items if p.x is not None]
    if not ready:
        return
    try:
        probs: list[float | str] = list(model.probabilities_from_inputs(torch.stack([p.x for p in ready])))
    except Exception:  # noqa: BLE001 - isolate the input the model chokes on
        log.warning("batch failed in the model; retrying one by one", exc_info=True)
        probs = []
        for p in ready:
            try:
                probs.extend(model.probabilities_from_inputs(p.x.unsqueeze(0)))
            except Exception as exc:  # noqa: BLE001
                probs.append(f"the model failed on this image: {type(exc).__name__}: {exc}")
    for p, prob in zip(ready, probs):
        p.x = None
        if isinstance(prob, str):
            p.reason = prob
        elif not math.isfinite(prob):
            p.reason = "the model produced a non-finite score"
        else:
            p.probability = float(prob)


def score_files(files: Iterable[Path], model: LoadedModel, batch_size: int = 16) -> Iterator[dict[str, Any]]:
    """One result dict per file, in order (batches of up to ``batch_size`` files go through the model
    together).  Keys: ``path, sop_instance_uid, probability, positive, threshold, model`` or
    ``path, skipped, reason`` (plus ``sop_instance_uid`` when the file had one)."""
    chunk: list[_Pending] = []
    for path in files:
        chunk.append(_prepare(path, model.input_size))
        if len(chunk) >= batch_size:
            yield from _finish(model, chunk)
            chunk = []
    if chunk:
        yield from _finish(model, chunk)


def _finish(model: LoadedModel, chunk: list[_Pending]) -> Iterator[dict[str, Any]]:
    _infer(model, chunk)
    for p in chunk:
        if p.reason is not None:
            out: dict[str, Any] = {"path": str(p.path), "skipped": True, "reason": p.reason}
            if p.sop_instance_uid:
                out["sop_instance_uid"] = p.sop_instance_uid
            yield out
        else:
            prob = float(p.probability)  # type: ignore[arg-type]
            yield {
                "path": str(p.path), "sop_instance_uid": p.sop_instance_uid, "probability": prob,
                "positive": model.is_positive(prob), "threshold": model.threshold, "model": model.model_id,
            }
