"""The inference worker: claim stored instances, decode, score in batches, record the results.

The loop only: the instance queue (:mod:`pacsbridge.store.queue`) owns the states, claims, stale
claim recovery and every state move.  A claimed instance ends ``predicted`` (with a Prediction
row), ``not_analysed`` (the image was refused: final) or ``failed`` (a fault of the system: retried
with backoff up to ``max_attempts``), each with ``state_reason`` and an event, in one transaction.

Which outcome each cause gives (a fault of the system is never a verdict on the image):

================================================  ==============  =========================
cause                                             state           retried
================================================  ==============  =========================
spool file missing, or its path leaves the spool  failed          yes
spool file deleted by retention (row re-queued)   failed          no: the file is gone
decoder: OS error with an errno (EIO, EACCES...)  failed          yes
decoder: MemoryError                              failed          yes
decoder: any exception but ``NotAnalysable``      failed          yes
model: exception on the image (batch and alone)   failed          yes
model: non-finite probability                     failed          yes
not a DICOM file, unparsable or truncated data    not_analysed    never
  (pydicom's errors, an OSError without errno)
pixel data the codecs cannot decode               not_analysed    never
out of scope (modality, body part, view, colour)  not_analysed    never
decoded size over ``max_decoded_bytes``           not_analysed    never
quality gate (blank, too small, ...)              not_analysed    never
patient age outside the card's intended use       not_analysed    never
out-of-distribution score over the threshold      not_analysed    never
================================================  ==============  =========================

Crash safety: a claim left by a dead worker (this host, pid gone) or older than ``stale_after_s``
goes back to ``received``.  Recording only succeeds while our claim still holds and
``predictions.instance_id`` is unique, so an instance is never scored twice.

``inference_ms`` on a Prediction is the model time of its batch divided by the batch size.

Waking: an idle worker waits on a :class:`~pacsbridge.store.notifier.StoreNotifier` that the
receiver of the same process notifies after each stored instance, with ``idle_poll_s`` as the
timeout, so instances stored by other processes (and retries falling due) are still found by polling.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..model.artifact import LoadedModel
from ..model.preprocess import preprocess
from ..store import queue
from ..store.models import Prediction, utcnow
from ..store.notifier import StoreNotifier
from ..store.spool import OutsideSpool, contained_path
from ..store.queue import Claimed, RetryPolicy
from ..worklist.items import as_utc
from .faults import system_fault
from .gates import ood_refusal
from .metrics import PipelineMetrics

log = logging.getLogger(__name__)

#: A decode function: spool file -> object with ``.image`` (2-D float in [0, 1]); raises the
#: imaging layer's refusal exception (any exception whose class is in ``refusals``) to say no.
DecodeFn = Callable[[Path], Any]


def default_decoder(model: LoadedModel | None = None,
                    **decode_kwargs: Any) -> tuple[DecodeFn, tuple[type[BaseException], ...]]:
    """The imaging layer's entry point and the exception it raises for images it will not score.

    With ``model``, the intended-use age gate of its card runs first (when the card has an age
    range and ``model.age_gate`` is on).  ``decode_kwargs`` (e.g. ``max_decoded_bytes``) go to
    :func:`pacsbridge.imaging.load_for_model`.
    """
    import functools

    from ..imaging import NotAnalysable
    from .gates import AgeRange, load_gated

    ages = AgeRange.from_card(model.card) if model is not None and model.age_gate else None
    return functools.partial(load_gated, age_range=ages, **decode_kwargs), (NotAnalysable,)


def default_worker_id() -> str:
    """``host:pid``: lets a restarted worker on the same host recognise its predecessor's claims."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


@dataclass
class BatchOutcome:
    """What one batch did; returned by :meth:`InferenceWorker.run_once` (tests and benchmarks read it)."""

    predicted: int = 0
    not_analysed: int = 0
    failed: int = 0
    lost_claims: int = 0
    positive_studies: set[int] = field(default_factory=set)

    @property
    def processed(self) -> int:
        return self.predicted + self.not_analysed + self.failed + self.lost_claims

    def add(self, other: "BatchOutcome") -> None:
        self.predicted += other.predicted
        self.not_analysed += other.not_analysed
        self.failed += other.failed
        self.lost_claims += other.lost_claims
        self.positive_studies |= other.positive_studies


@dataclass
class _Scored:
    inst: Claimed
    probability: float
    decode_ms: float
    inference_ms: float
    ood_score: float | None = None


@dataclass
class _Refused:
    inst: Claimed
    reason: str
    level: str  # "info" for a refusal of the image, "error" for a fault of the system
    fault: bool = False  # a fault of the system: the instance becomes ``failed`` (see the module's table)
    retry: bool = True  # for a fault: whether another attempt can help


class InferenceWorker:
    """Scores stored instances.  ``start()``/``stop()`` run it as a thread; ``run_once()``/``drain()`` for tests."""

    name = "inference worker"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        model: LoadedModel,
        spool_dir: Path,
        *,
        batch_size: int = 8,
        max_wait_ms: int = 20,
        decode: DecodeFn | None = None,
        refusals: tuple[type[BaseException], ...] | None = None,
        on_recorded: Callable[[set[int]], None] | None = None,
        metrics: PipelineMetrics | None = None,
        worker_id: str | None = None,
        stale_after_s: float = 600.0,
        idle_poll_s: float = 0.25,
        notifier: StoreNotifier | None = None,
        outbox: Any | None = None,
        retry_policy: RetryPolicy | None = None,
        shadow: bool = False,
    ) -> None:
        if decode is None:
            decode, default_refusals = default_decoder(model)
            refusals = refusals if refusals is not None else default_refusals
        self._sessions = sessions
        self._model = model
        self._spool = Path(spool_dir).resolve()
        self._batch_size = max(1, int(batch_size))
        self._max_wait_s = max(0, int(max_wait_ms)) / 1000.0
        self._decode = decode
        self._refusals = refusals or ()
        self._on_recorded = on_recorded
        self._metrics = metrics
        self.worker_id = (worker_id or default_worker_id())[:64]
        self._stale_after = timedelta(seconds=stale_after_s)
        self._retry = retry_policy or RetryPolicy()
        self._idle_poll_s = idle_poll_s
        self._stop = threading.Event()
        self._notifier = notifier or StoreNotifier()
        self._thread: threading.Thread | None = None
        # pacsbridge.forward.outbox.Outbox: forwarding entries are written in the recording transaction.
        self._outbox = outbox
        # Shadow mode: predictions are recorded (marked shadow) but never queued for reading or forwarding.
        self.shadow = bool(shadow)
        self._last_recovery = 0.0
        self.last_error: str | None = None
        #: time.monotonic() when the loop last went round (the daemon's watchdog checks it advances).
        self.last_beat = time.monotonic()
        #: Idle waits ended by a notification rather than by the poll timeout (tests, debugging).
        self.wakeups = 0

    # ----------------------------------------------------------------- claims

    def recover_stale_claims(self, now: datetime | None = None) -> int:
        """Take back instances claimed by a dead or stuck worker (a failed attempt each); returns how many.

        Runs only between batches (at start and from the worker's own loop), so a claim under this
        worker's own id is a leftover too (a batch that failed to record, e.g. the database went away).
        """
        return queue.recover_stale_claims(self._sessions, self.worker_id, self._stale_after, now,
                                           self._retry)

    def claim(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` due instances (received, or failed and due for a retry) in arrival order."""
        return queue.claim(self._sessions, self.worker_id, limit)

    # ----------------------------------------------------------------- one batch

    def run_once(self, wait: bool = True) -> BatchOutcome:
        """Claim one batch (waiting up to ``max_wait_ms`` to fill it), score it, record it."""
        seen = self._notifier.count
        batch = self.claim(self._batch_size)
        if not batch:
            return BatchOutcome()
        if wait and self._max_wait_s > 0:
            # Top the batch up as more instances arrive (a notification), until it is full or time is up.
            deadline = time.monotonic() + self._max_wait_s
            while len(batch) < self._batch_size and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                now_seen = self._notifier.wait(seen, left)
                if now_seen == seen:
                    break  # timed out
                seen = now_seen
                batch.extend(self.claim(self._batch_size - len(batch)))
        scored, refused = self._score(batch)
        outcome = self._record(scored, refused)
        if outcome.positive_studies and self._on_recorded is not None:
            try:
                self._on_recorded(outcome.positive_studies)
            except Exception:  # noqa: BLE001 - the scheduler job will catch up
                log.exception("worklist update after a batch failed; the scheduler will retry")
        return outcome

    def drain(self, max_batches: int | None = None) -> BatchOutcome:
        """Run batches until nothing is left in ``received`` (tests, the bench); returns the totals."""
        total = BatchOutcome()
        n = 0
        while max_batches is None or n < max_batches:
            out = self.run_once(wait=False)
            if out.processed == 0:
                break
            total.add(out)
            n += 1
        return total

    def _spool_path(self, rel: str) -> Path:
        try:
            path = contained_path(self._spool, rel)
        except OutsideSpool as exc:
            raise FileNotFoundError(str(exc)) from None
        if not path.is_file():
            raise FileNotFoundError(f"{rel} is not in the spool")
        return path

    def _score(self, batch: list[Claimed]) -> tuple[list[_Scored], list[_Refused]]:
        ready: list[tuple[Claimed, torch.Tensor, float]] = []
        refused: list[_Refused] = []
        for inst in batch:
            t0 = time.perf_counter()
            if inst.spool_deleted_at is not None:
                when = as_utc(inst.spool_deleted_at).isoformat(timespec="seconds")
                refused.append(_Refused(inst, f"the stored file was deleted by retention at {when}", "error",
                                        fault=True, retry=False))
                continue
            try:
                path = self._spool_path(inst.file_path)  # before decoding: a lost file is our error, not the image's
                result = self._decode(path)
                x = preprocess(np.asarray(result.image), self._model.input_size)
            except self._refusals as exc:
                fault = system_fault(exc)
                if fault is None:
                    refused.append(_Refused(inst, _reason(exc), "info"))
                else:
                    log.error("instance %d: %s while decoding: %s", inst.id, type(fault).__name__, fault)
                    refused.append(_Refused(inst, f"could not decode the image ({type(fault).__name__}: {fault})",
                                            "error", fault=True))
                continue
            except FileNotFoundError as exc:
                log.error("instance %d: spool file missing: %s", inst.id, exc)
                refused.append(_Refused(inst, "the stored file is missing from the spool", "error", fault=True))
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the worker
                log.exception("instance %d: unexpected error while decoding", inst.id)
                refused.append(_Refused(inst, f"could not decode the image ({type(exc).__name__}: {exc})", "error",
                                        fault=True))
                continue
            decode_ms = (time.perf_counter() - t0) * 1000  # read + decode + preprocess: all before the model
            ready.append((inst, x, decode_ms))
            if self._metrics is not None:
                self._metrics.decode_ms.observe(decode_ms)
        if not ready:
            return [], refused
        probs, oods, each_ms = self._infer([x for _, x, _ in ready])
        scored: list[_Scored] = []
        for (inst, _, decode_ms), p, ood in zip(ready, probs, oods):
            if isinstance(p, str):
                refused.append(_Refused(inst, p, "error", fault=True))
            elif self._model.is_out_of_distribution(ood):
                refused.append(_Refused(inst, ood_refusal(ood, self._model.ood.threshold) or "out of distribution", "info"))
            else:
                scored.append(_Scored(inst, p, decode_ms, each_ms, ood))
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(ready))
            for _ in scored:
                self._metrics.inference_ms.observe(each_ms)
        return scored, refused

    def _infer(self, inputs: list[torch.Tensor]) -> tuple[list[float | str], list[float | None], float]:
        """Probabilities and OOD scores for a batch; a failing batch is retried one by one to
        isolate the bad input.

        A probability is a string (the reason) where the model failed or gave a non-finite score.
        """
        t0 = time.perf_counter()
        try:
            raw: list[Any]
            raw, oods = self._model.score_inputs(torch.stack(inputs))
        except Exception:  # noqa: BLE001
            log.exception("batch of %d failed in the model; retrying one by one", len(inputs))
            raw, oods = [], []
            for x in inputs:
                try:
                    p, o = self._model.score_inputs(x.unsqueeze(0))
                    raw.extend(p)
                    oods.extend(o)
                except Exception as exc:  # noqa: BLE001
                    raw.append(f"the model failed on this image ({type(exc).__name__}: {exc})")
                    oods.append(None)
        each_ms = (time.perf_counter() - t0) * 1000 / len(inputs)
        out: list[float | str] = []
        for p in raw:
            if isinstance(p, str) or math.isfinite(p):
                out.append(p)
            else:
                out.append("the model produced a non-finite score")
        return out, oods, each_ms

    def _record(self, scored: list[_Scored], refused: list[_Refused]) -> BatchOutcome:
        try:
            return self._record_in(scored, refused)
        except IntegrityError:
            # Should not happen (our claim guards it); isolate the offending row instead of looping.
            log.exception("recording a batch hit a constraint; recording one by one")
            total = BatchOutcome()
            for s in scored:
                try:
                    out = self._record_in([s], [])
                except IntegrityError:
                    out = self._record_in([], [], already_predicted=[s.inst])
                total.add(out)
            total.add(self._record_in([], refused))
            return total

    def _record_in(
        self, scored: list[_Scored], refused: list[_Refused], already_predicted: Iterable[Claimed] = (),
    ) -> BatchOutcome:
        out = BatchOutcome()
        now = utcnow()
        m = self._model
        with self._sessions.begin() as session:
            for s in scored:
                if not queue.mark_predicted(session, s.inst, self.worker_id, now):
                    out.lost_claims += 1
                    continue
                positive = m.is_positive(s.probability)
                prediction = Prediction(
                    instance_id=s.inst.id, probability=float(s.probability), positive=positive,
                    threshold=m.threshold, model_id=m.model_id, weights_sha256=m.weights_sha256,
                    decode_ms=round(s.decode_ms, 3), inference_ms=round(s.inference_ms, 3), created_at=now,
                    ood_score=None if s.ood_score is None else float(s.ood_score),
                    calibration=m.calibration_id, shadow=self.shadow,
                )
                session.add(prediction)
                if self._outbox is not None and not self.shadow:
                    session.flush()  # the prediction's id, for its outbox entries
                    self._outbox.enqueue(session, prediction.id, positive, now)
                out.predicted += 1
                # One line per image: the spool name (a hash, no patient data), the result.
                log.info("predicted %s: probability %.4f %s (model %s%s)", Path(s.inst.file_path).stem[:12],
                         s.probability, "POSITIVE" if positive else "negative", m.model_id,
                         ", shadow mode" if self.shadow else "")
                if positive and not self.shadow:
                    out.positive_studies.add(s.inst.study_id)
            for r in refused:
                if r.fault:
                    self._record_fault(session, r, now, out)
                elif queue.mark_not_analysed(session, r.inst, self.worker_id, r.reason, r.level, now):
                    out.not_analysed += 1
                    # The bracketed part names header values (e.g. a birth date): kept in the database, not the log.
                    log.info("not_analysed %s: %s", Path(r.inst.file_path).stem[:12], r.reason.split(" [", 1)[0])
                else:
                    out.lost_claims += 1
            for inst in already_predicted:
                queue.mark_predicted(session, inst, self.worker_id, now)
        if out.lost_claims:
            log.warning("worker %s: %d claims were taken back before recording", self.worker_id, out.lost_claims)
        return out

    def _record_fault(self, session: Session, r: _Refused, now: datetime, out: BatchOutcome) -> None:
        when = queue.mark_failed(session, r.inst, self.worker_id, r.reason, self._retry, now, retry=r.retry)
        if when is False:
            out.lost_claims += 1
            return
        out.failed += 1
        name = Path(r.inst.file_path).stem[:12]
        if when is None:
            log.error("failed %s (attempt %d, no retry left): %s", name, r.inst.attempts + 1, r.reason)
        else:
            log.warning("failed %s (attempt %d of %d, retry at %s): %s", name, r.inst.attempts + 1,
                        self._retry.max_attempts, when.isoformat(timespec="seconds"), r.reason)

    # ----------------------------------------------------------------- thread

    def wake(self) -> None:
        """Tell an idle worker that something arrived (the receiver does it through the shared notifier)."""
        self._notifier.notify()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self.recover_stale_claims()
        self._last_recovery = time.monotonic()
        self._stop.clear()
        self.last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._thread.start()
        log.info(
            "inference worker %s started (model %s on %s, batch %d)",
            self.worker_id, self._model.model_id, self._model.device, self._batch_size,
        )

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in hand and stop; unfinished claims are released at the next start."""
        self._stop.set()
        self._notifier.notify()  # end an idle wait now
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("inference worker did not stop within %s s", timeout)
            else:
                self._thread = None

    def healthy(self) -> bool:
        """The thread is alive (it keeps retrying through database outages; see ``last_error``)."""
        return self._thread is not None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds since the loop last went round (one batch, or one idle wait of at most idle_poll_s)."""
        return time.monotonic() - self.last_beat

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            try:
                if time.monotonic() - self._last_recovery > 60:
                    self._last_recovery = time.monotonic()
                    self.recover_stale_claims()
                seen = self._notifier.count  # before claiming: a store after this point ends the wait below
                out = self.run_once()
                self.last_error = None
                backoff = 0.5
                if out.processed == 0 and not self._stop.is_set():
                    if self._notifier.wait(seen, self._idle_poll_s) != seen and not self._stop.is_set():
                        self.wakeups += 1
            except Exception as exc:  # noqa: BLE001 - e.g. the database is unreachable: wait, retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("inference worker error; retrying in %.1f s", backoff)
                self._last_recovery = 0.0  # give back the failed batch's claims on the next round
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        log.info("inference worker %s stopped", self.worker_id)


def _reason(exc: BaseException) -> str:
    """Readable reason from a refusal exception (``NotAnalysable.reason`` when it has one)."""
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return str(reason)
