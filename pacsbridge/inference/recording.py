"""Recording a scored batch: each claimed instance's move out of ``processing`` (through
:mod:`pacsbridge.store.queue`), its Prediction row and its outbox entries, in one transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..model.artifact import LoadedModel
from ..scoring import PREDICTED, Outcome, reasons_json
from ..store import queue
from ..store.models import Prediction, utcnow
from ..store.queue import Claimed, RetryPolicy

log = logging.getLogger("pacsbridge.inference.worker")


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


#: A claimed instance and what scoring made of it.
ScoredInstance = tuple[Claimed, Outcome]


class BatchRecording:
    """The recording half of :class:`~pacsbridge.inference.worker.InferenceWorker` (a mixin: it reads
    the worker's sessions, model, id, retry policy, outbox and shadow flag)."""

    _sessions: sessionmaker[Session]
    _model: LoadedModel
    _retry: RetryPolicy
    _outbox: Any | None
    worker_id: str
    shadow: bool

    def _record(self, results: list[ScoredInstance]) -> BatchOutcome:
        try:
            return self._record_in(results)
        except IntegrityError:
            # Should not happen (our claim guards it); isolate the offending row instead of looping.
            log.exception("recording a batch hit a constraint; recording one by one")
            total = BatchOutcome()
            for r in results:
                try:
                    out = self._record_in([r])
                except IntegrityError:
                    out = self._record_in([], already_predicted=[r[0]])
                total.add(out)
            return total

    def _record_in(self, results: list[ScoredInstance], already_predicted: Iterable[Claimed] = ()) -> BatchOutcome:
        out = BatchOutcome()
        now = utcnow()
        with self._sessions.begin() as session:
            # In study order: each prediction moves its study's study_scores row forward (a row lock
            # until commit on PostgreSQL), and workers that take those locks in one order never deadlock.
            for inst, o in sorted(results, key=lambda r: (r[0].study_id, r[0].id)):
                if o.state == PREDICTED:
                    self._record_prediction(session, inst, o, now, out)
                elif o.fault:
                    self._record_fault(session, inst, o, now, out)
                elif queue.mark_not_analysed(session, inst, self.worker_id, o.reason or "not analysed", "info", now,
                                             reasons=reasons_json(o.reasons)):
                    out.not_analysed += 1
                    # The bracketed parts name header values (e.g. a birth date): kept in the database, not the log.
                    log.info("not_analysed %s: %s", Path(inst.file_path).stem[:12],
                             "; ".join(r.text.split(" [", 1)[0] for r in o.reasons))
                else:
                    out.lost_claims += 1
            for inst in already_predicted:
                queue.mark_predicted(session, inst, self.worker_id, now)
        if out.lost_claims:
            log.warning("worker %s: %d claims were taken back before recording", self.worker_id, out.lost_claims)
        return out

    def _record_prediction(self, session: Session, inst: Claimed, o: Outcome, now: datetime,
                           out: BatchOutcome) -> None:
        if not queue.mark_predicted(session, inst, self.worker_id, now):
            out.lost_claims += 1
            return
        m = self._model
        prediction = Prediction(
            instance_id=inst.id, probability=float(o.probability), positive=bool(o.positive),  # type: ignore[arg-type]
            threshold=m.threshold, model_id=m.model_id, weights_sha256=m.weights_sha256,
            decode_ms=round(o.decode_ms, 3), inference_ms=round(o.inference_ms or 0.0, 3), created_at=now,
            ood_score=o.ood_score, calibration=m.calibration_id, shadow=self.shadow,
        )
        session.add(prediction)
        if self._outbox is not None and not self.shadow:
            session.flush()  # the prediction's id, for its outbox entries
            self._outbox.enqueue(session, prediction.id, bool(o.positive), now)
        out.predicted += 1
        # One line per image: the spool name (a hash, no patient data), the result.
        log.info("predicted %s: probability %.4f %s (model %s%s)", Path(inst.file_path).stem[:12],
                 o.probability, "POSITIVE" if o.positive else "negative", m.model_id,
                 ", shadow mode" if self.shadow else "")
        if o.positive and not self.shadow:
            out.positive_studies.add(inst.study_id)

    def _record_fault(self, session: Session, inst: Claimed, o: Outcome, now: datetime, out: BatchOutcome) -> None:
        reason = o.reason or "fault of the system"
        when = queue.mark_failed(session, inst, self.worker_id, reason, self._retry, now, retry=o.retry)
        if when is False:
            out.lost_claims += 1
            return
        out.failed += 1
        name = Path(inst.file_path).stem[:12]
        if when is None:
            log.error("failed %s (attempt %d, no retry left): %s", name, inst.attempts + 1, reason)
        else:
            log.warning("failed %s (attempt %d of %d, retry at %s): %s", name, inst.attempts + 1,
                        self._retry.max_attempts, when.isoformat(timespec="seconds"), reason)
