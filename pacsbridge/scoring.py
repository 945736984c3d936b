"""The one scoring path: a batch of DICOM inputs in, one outcome per input out.

The daemon's worker, ``pacsbridge predict`` and ``pacsbridge validate`` all score through
:class:`Scorer`, so a site's validation measures exactly what the daemon does.  For each input:
read, header gates, decode, preprocess; then the whole batch through the model (a batch that
raises is scored again one image at a time, so one bad image cannot fail the others); then the
out-of-distribution gate and the operating point in force (the model card's, or the site
calibration's).

Each input ends as one :class:`Outcome`:

* ``predicted``: probability (temperature-calibrated), OOD score, positive at the threshold.
* ``not_analysed``: a property of the image, with **every** reason that applies (a
  :class:`Reason` each: a short ``code`` and the human ``text``).  All header gates run (an adult
  hand is refused both for its age and for not being a chest); the image is decoded, and the OOD
  gate run, whenever the header leaves something decodable (intended-use refusals -- age, body
  part, view -- do; a CT, a colour or too-large image does not).
* ``failed``: a fault of the system (file missing or unreadable, decoder crash, MemoryError, model
  exception, non-finite score): no verdict on the image; the worker retries it.

Lives at the top of the package, not in ``model/``: it joins the imaging layer, the intended-use
gates of :mod:`pacsbridge.inference.gates` and the model, and ``model/`` imports neither stage.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from pydicom.dataset import Dataset

from .imaging import DEFAULT_MAX_DECODED_BYTES, NotAnalysable, check_decodable, check_image, read_dataset
from .imaging.decode import decode_display
from .imaging.quality import header_reasons
from .inference.faults import system_fault
from .inference.gates import AgeRange, age_refusal, ood_refusal
from .model.artifact import LoadedModel
from .model.preprocess import preprocess
from .store.models import InstanceState
from .store.reasons import Reason, code_of, join_reasons, reasons_json

__all__ = ["FAILED", "NOT_ANALYSED", "PREDICTED", "Outcome", "Reason", "Scorer", "join_reasons", "reasons_json",
           "score_paths"]

log = logging.getLogger(__name__)

PREDICTED, NOT_ANALYSED, FAILED = (InstanceState.PREDICTED.value, InstanceState.NOT_ANALYSED.value,
                                   InstanceState.FAILED.value)
#: Header refusals after which decoding is pointless or unsafe (no OOD score is computed then).
NO_DECODE = frozenset({"pixel_data", "modality", "colour", "bitmap", "too_small", "header", "too_large", "decode"})

#: An input: a file path or the bytes of a DICOM file.
Source = Union[Path, bytes]
#: Reads a source into a dataset; raises NotAnalysable for what is not DICOM (the default is
#: :func:`pacsbridge.imaging.read_dataset`).
ReadFn = Callable[[Source], Dataset]


@dataclass
class Outcome:
    """What one input became; see the module's docstring."""

    state: str
    reasons: list[Reason] = field(default_factory=list)
    probability: float | None = None
    ood_score: float | None = None
    positive: bool | None = None
    sop_instance_uid: str | None = None
    #: Read + gates + decode + preprocess, milliseconds.
    decode_ms: float = 0.0
    #: The model time of its batch divided by the batch size; None when it did not reach the model.
    inference_ms: float | None = None
    #: For a fault: whether another attempt can help.
    retry: bool = True
    #: The display-ready image, kept for scored inputs when the scorer was asked to (heatmaps).
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def reason(self) -> str | None:
        return join_reasons(self.reasons)

    @property
    def fault(self) -> bool:
        return self.state == FAILED

    @classmethod
    def failure(cls, code: str, text: str, *, retry: bool = True, sop_instance_uid: str | None = None) -> "Outcome":
        return cls(FAILED, [Reason(code, text)], retry=retry, sop_instance_uid=sop_instance_uid)


@dataclass
class _Prepared:
    outcome: Outcome
    x: torch.Tensor | None = None  # the model input, when the image decoded
    image: np.ndarray | None = None


def default_read(source: Source) -> Dataset:
    return read_dataset(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def _sop_uid(ds: Dataset) -> str | None:
    try:
        uid = ds.get("SOPInstanceUID")
        return str(uid) if uid else None
    except Exception:  # noqa: BLE001 - a malformed element is no reason to stop
        return None


def _exception_outcome(exc: BaseException, sop: str | None, during: str) -> Outcome:
    """A refusal for what the image is, or a fault of the system (see inference/faults.py)."""
    if isinstance(exc, NotAnalysable):
        fault = system_fault(exc)
        if fault is None:
            return Outcome(NOT_ANALYSED, [Reason(code_of(exc.reason), exc.reason)], sop_instance_uid=sop)
        exc = fault
    code = "memory" if isinstance(exc, MemoryError) else "read_error" if isinstance(exc, OSError) else "decoder_error"
    log.error("%s while %s: %s: %s", code, during, type(exc).__name__, exc)
    return Outcome.failure(code, f"could not decode the image ({type(exc).__name__}: {exc})", sop_instance_uid=sop)


def _file_check(path: Path) -> Outcome | None:
    """Refuse what is not a regular file; a file that cannot be opened is a fault (permissions, I/O)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return Outcome(NOT_ANALYSED, [Reason("not_regular_file", "not a regular file")])
        with open(path, "rb"):
            pass  # permission problems reported plainly, before the DICOM reader sees them
    except OSError as exc:
        return Outcome.failure("read_error", f"cannot read the file: {exc.strerror or exc}")
    return None


class Scorer:
    """Scores batches of inputs with ``model`` (its gates and operating point as configured)."""

    def __init__(self, model: LoadedModel, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                 read: ReadFn | None = None, keep_images: bool = False) -> None:
        self.model = model
        self.max_decoded_bytes = int(max_decoded_bytes)
        self._read = read or default_read
        self._keep_images = keep_images
        self._ages = AgeRange.from_card(model.card) if model.age_gate else None

    def score(self, sources: Sequence[Source]) -> list[Outcome]:
        """One outcome per source, in order; never raises for anything an input contains."""
        prepared = [self._prepare(s) for s in sources]
        ready = [p for p in prepared if p.x is not None]
        if ready:
            results, each_ms = self._infer([p.x for p in ready])  # type: ignore[misc]
            for p, (prob, ood) in zip(ready, results):
                p.x = None
                self._decide(p, prob, ood, each_ms)
        return [p.outcome for p in prepared]

    # ----------------------------------------------------------------- before the model

    def _prepare(self, source: Source) -> _Prepared:
        t0 = time.perf_counter()
        prepared = self._gate_and_decode(source)
        prepared.outcome.decode_ms = (time.perf_counter() - t0) * 1000  # all before the model
        return prepared

    def _gate_and_decode(self, source: Source) -> _Prepared:
        if not isinstance(source, (bytes, bytearray)):
            checked = _file_check(Path(source))
            if checked is not None:
                return _Prepared(checked)
        try:
            ds = self._read(source)
        except Exception as exc:  # noqa: BLE001 - classified: refusal of the image or fault of the system
            return _Prepared(_exception_outcome(exc, None, "reading"))
        sop = _sop_uid(ds)
        reasons = self._header_reasons(ds)
        if any(r.code in NO_DECODE for r in reasons):
            return _Prepared(Outcome(NOT_ANALYSED, reasons, sop_instance_uid=sop))
        try:
            image, more = self._decode(ds)
        except Exception as exc:  # noqa: BLE001 - as above
            out = _exception_outcome(exc, sop, "decoding")
            if out.fault and not reasons:
                return _Prepared(out)  # nothing but a fault of the system: retried
            # Undecodable pixel data is one more reason; a fault on an image refused anyway only
            # costs its OOD score.
            return _Prepared(Outcome(NOT_ANALYSED, reasons + ([] if out.fault else out.reasons),
                                     sop_instance_uid=sop))
        outcome = Outcome(NOT_ANALYSED if reasons or more else PREDICTED, reasons + more, sop_instance_uid=sop)
        if image is None or more:
            return _Prepared(outcome)  # too large, blank: nothing for the model to judge
        try:
            x = preprocess(image, self.model.input_size)
        except Exception as exc:  # noqa: BLE001 - after the gates passed: ours, not the image's
            return _Prepared(outcome if reasons else _exception_outcome(exc, sop, "preprocessing"))
        return _Prepared(outcome, x, image if self._keep_images and not reasons else None)

    def _header_reasons(self, ds: Dataset) -> list[Reason]:
        reasons = [Reason(code, text) for code, text in header_reasons(ds)]
        if self._ages is not None:
            text = age_refusal(ds, self._ages)
            if text:
                reasons.append(Reason("age", text))
        return reasons

    def _decode(self, ds: Dataset) -> tuple[np.ndarray | None, list[Reason]]:
        """The display-ready image, or None with the reason (size guard, codec, blank image)."""
        text = check_decodable(ds, self.max_decoded_bytes)  # decompression bombs: never decoded
        if text:
            return None, [Reason(code_of(text) if "too large" not in text else "too_large", text)]
        image = decode_display(ds, max_decoded_bytes=self.max_decoded_bytes).image
        text = check_image(image)
        return image, [Reason("blank" if "blank" in text else "quality", text)] if text else []

    # ----------------------------------------------------------------- the model

    def _infer(self, inputs: list[torch.Tensor]) -> tuple[list[tuple[float | Reason, float | None]], float]:
        """(probability or fault reason, OOD score) per input and the model time per input (ms).

        A batch that raises is scored one input at a time, so that only the input the model chokes
        on fails.
        """
        t0 = time.perf_counter()
        try:
            probs, oods = self.model.score_inputs(torch.stack(inputs))
            raw: list[float | Reason] = list(probs)
            scores: list[float | None] = list(oods)
        except Exception:  # noqa: BLE001 - isolate the bad input
            log.exception("batch of %d failed in the model; scoring one by one", len(inputs))
            raw, scores = [], []
            for x in inputs:
                try:
                    p, o = self.model.score_inputs(x.unsqueeze(0))
                    raw.extend(p)
                    scores.extend(o)
                except Exception as exc:  # noqa: BLE001
                    raw.append(Reason("model_error", f"the model failed on this image ({type(exc).__name__}: {exc})"))
                    scores.append(None)
        each_ms = (time.perf_counter() - t0) * 1000 / len(inputs)
        out: list[tuple[float | Reason, float | None]] = []
        for p, o in zip(raw, scores):
            if not isinstance(p, Reason) and not math.isfinite(p):
                p = Reason("non_finite", "the model produced a non-finite score")
            out.append((p, None if o is None else float(o)))
        return out, each_ms

    def _decide(self, p: _Prepared, prob: float | Reason, ood: float | None, each_ms: float) -> None:
        o = p.outcome
        o.ood_score, o.inference_ms = ood, each_ms
        m = self.model
        if isinstance(prob, Reason) and not o.reasons:
            p.outcome = Outcome(FAILED, [prob], ood_score=ood, sop_instance_uid=o.sop_instance_uid,
                                decode_ms=o.decode_ms, inference_ms=each_ms)
            return
        if m.is_out_of_distribution(ood):
            o.reasons.append(Reason("ood", ood_refusal(ood, m.ood.threshold) or "out of distribution"))  # type: ignore[arg-type,union-attr]
        if o.reasons:
            o.state = NOT_ANALYSED
            return
        o.probability = float(prob)  # type: ignore[arg-type]
        o.positive = m.is_positive(o.probability)
        o.image = p.image


def score_paths(paths: Iterable[Path], scorer: Scorer, batch_size: int = 16) -> Iterator[tuple[Path, Outcome]]:
    """``(path, outcome)`` for every path, in order, scored ``batch_size`` at a time."""
    chunk: list[Path] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) >= max(1, batch_size):
            yield from zip(chunk, scorer.score(chunk))
            chunk = []
    if chunk:
        yield from zip(chunk, scorer.score(chunk))

