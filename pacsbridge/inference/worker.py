"""The inference worker: claim stored instances, score them in batches, record the results.

Scoring (read, gates, decode, model, every refusal reason) is :class:`pacsbridge.scoring.Scorer`,
the one path shared with ``predict`` and ``validate``; this module is the loop and the recording: the instance queue (:mod:`pacsbridge.store.queue`) owns the states, claims, stale
claim recovery and every state move.  A claimed instance ends ``predicted`` (with a Prediction
row), ``not_analysed`` (the image was refused: final) or ``failed`` (a fault of the system: retried
with backoff up to ``max_attempts``), each with ``state_reason`` (all reasons, joined; a refusal's
list in ``state_reasons``) and an event, in one transaction.

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

Crash safety: a claim is leased for ``lease_s``; a heartbeat thread
(:class:`~pacsbridge.store.workers.Heartbeat`) renews this worker's leases every ``heartbeat_s`` and
returns other workers' expired ones to the queue.  Recording only succeeds while our claim still
holds and ``predictions.instance_id`` is unique, so an instance is never scored twice.

``inference_ms`` on a Prediction is the model time of its batch divided by the batch size.

Waking: an idle worker waits on a :class:`~pacsbridge.store.notifier.StoreNotifier` that the
receiver of the same process notifies after each stored instance, with ``idle_poll_s`` as the
timeout, so instances stored by other processes (and retries falling due) are still found by polling.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..model.artifact import LoadedModel
from ..scoring import PREDICTED, Outcome, Scorer
from ..store import queue
from ..store import workers as registry
from ..store.notifier import StoreNotifier
from ..store.spool import OutsideSpool, contained_path
from ..store.queue import Claimed, RetryPolicy
from .metrics import PipelineMetrics
from .recording import BatchOutcome, BatchRecording, ScoredInstance

log = logging.getLogger(__name__)

def default_worker_id() -> str:
    """``host:pid:<8 hex>``: unique across containers that share a hostname or reuse pids."""
    return registry.new_worker_id()


class InferenceWorker(BatchRecording):
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
        scorer: Scorer | None = None,
        on_recorded: Callable[[set[int]], None] | None = None,
        metrics: PipelineMetrics | None = None,
        worker_id: str | None = None,
        stale_after_s: float = 600.0,
        idle_poll_s: float = 0.25,
        notifier: StoreNotifier | None = None,
        outbox: Any | None = None,
        retry_policy: RetryPolicy | None = None,
        shadow: bool = False,
        lease_s: float = 60.0,
        heartbeat_s: float = 10.0,
        kind: str = "worker",
        stall_s: float = 300.0,
    ) -> None:
        self._sessions = sessions
        self._model = model
        self._spool = Path(spool_dir).resolve()
        self._batch_size = max(1, int(batch_size))
        self._max_wait_s = max(0, int(max_wait_ms)) / 1000.0
        # The one scoring path (shared with `predict` and `validate`); the daemon passes its limits.
        self._scorer = scorer or Scorer(model)
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
        # Claims are leased; the heartbeat (started with the thread) renews them and registers this worker.
        self._lease_s, self._heartbeat_s, self.kind = float(lease_s), float(heartbeat_s), kind
        self._stall_s = float(stall_s)  # a loop stuck this long stops heartbeating (loop_stall_s)
        self._heartbeat: registry.Heartbeat | None = None
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
                                           self._retry, lock_timeout_s=self._lease_s, gone=self._gone())

    def recover_expired_leases(self) -> int:
        """Other workers' claims whose lease ran out (the heartbeat calls it, also while a batch is in hand)."""
        return queue.recover_stale_claims(self._sessions, self.worker_id, self._stale_after, None, self._retry,
                                          include_own=False, lock_timeout_s=self._lease_s, gone=self._gone())

    def _gone(self) -> set[str]:
        """Workers on this machine whose process died (a restart after a crash, a killed sibling): their
        claims come back now, not when their lease runs out."""
        try:
            with self._sessions() as session:
                return registry.gone_on_this_machine(session, self.worker_id)
        except SQLAlchemyError:
            return set()  # the recovery that follows reports the outage

    def claim(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` due instances (received, or failed and due for a retry) in arrival order."""
        return queue.claim(self._sessions, self.worker_id, limit, lease_s=self._lease_s)

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
        outcome = self._record(self._score(batch))
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

    def _score(self, batch: list[Claimed]) -> list[ScoredInstance]:
        """Each claimed instance with its outcome; the spool's own faults are found before scoring."""
        results: dict[int, Outcome] = {}
        paths: list[tuple[Claimed, Path]] = []
        for inst in batch:
            if inst.spool_deleted_at is not None:
                when = inst.spool_deleted_at.isoformat(timespec="seconds")
                results[inst.id] = Outcome.failure("file_deleted", f"the stored file was deleted by retention at {when}",
                                                   retry=False)
                continue
            try:
                paths.append((inst, self._spool_path(inst.file_path)))  # a lost file is our error, not the image's
            except FileNotFoundError as exc:
                log.error("instance %d: spool file missing: %s", inst.id, exc)
                results[inst.id] = Outcome.failure("missing_file", "the stored file is missing from the spool")
        if paths:
            for (inst, _), out in zip(paths, self._scorer.score([p for _, p in paths])):
                results[inst.id] = out
        if self._metrics is not None:
            modelled = [o for o in results.values() if o.inference_ms is not None]  # decoded, went to the model
            for o in modelled:
                self._metrics.decode_ms.observe(o.decode_ms)
            if modelled:
                self._metrics.batch_size.observe(len(modelled))
            for o in modelled:
                if o.state == PREDICTED:
                    self._metrics.inference_ms.observe(o.inference_ms)
        return [(inst, results[inst.id]) for inst in batch]

    # ----------------------------------------------------------------- thread

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self.recover_stale_claims()
        self._start_heartbeat()
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
        """Finish the batch in hand and stop: claims left (a batch that failed to record) go back to the
        queue and the worker is marked stopped; if the batch does not finish in time, its leases expire."""
        self._stop.set()
        self._notifier.notify()  # end an idle wait now
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("inference worker did not stop within %s s", timeout)
                stopped = False
            else:
                self._thread = None
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
            if stopped:
                self._sign_off()

    def _start_heartbeat(self) -> None:
        info = registry.WorkerInfo(self.worker_id, self.kind, self._batch_size)
        try:
            registry.register(self._sessions, info)
        except Exception as exc:  # noqa: BLE001 - the first heartbeat that reaches the database registers it
            log.warning("worker %s: could not register (%s); the heartbeat will", self.worker_id,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._heartbeat = registry.Heartbeat(self._sessions, info, lease_s=self._lease_s,
                                            interval_s=self._heartbeat_s, recover=self.recover_expired_leases,
                                            working=lambda: self.stalled_for() < self._stall_s)
        self._heartbeat.start()

    def _sign_off(self) -> None:
        try:
            if queue.release_claims(self._sessions, self.worker_id):
                log.info("worker %s: returned its unfinished claims to the queue", self.worker_id)
            registry.mark_stopped(self._sessions, self.worker_id)
        except Exception as exc:  # noqa: BLE001 - the database is away: the leases expire, the row reads "lost"
            log.warning("worker %s: could not sign off (%s); its claims expire with their lease", self.worker_id,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def healthy(self) -> bool:
        """The loop and the heartbeat threads are alive (both retry through database outages)."""
        return (self._thread is not None and self._thread.is_alive()
                and (self._heartbeat is None or self._heartbeat.alive()))

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

