"""The forwarding stage: an APScheduler job that sends due outbox entries to their destinations.

Each run reads the due entries, groups them by destination and sends each destination's entries
in a thread of its own (destinations never wait for each other), in batches of
``max_per_association`` over one association/connection at a time.  A run never overlaps the
previous one (``max_instances=1``), and entries are claimed with a lease (outbox.claim_due) that
no other node takes while it lives, so there is at most one association per destination across
the nodes.  Leases are renewed before each association, and during one every third of the lease.  Each outcome is committed as soon as the
peer answered, by the lease holder only (see outbox.py for the states).  With ``gate`` (the scheduler
leader's check) the periodic job only runs on the leading node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from ..config import Destination
from . import outbox
from .outbox import DueEntry, RetryPolicy
from .senders import SENDERS, ForwardContext, Outcome, Sender
from .sending import PERMANENT, SENT, TRANSIENT

log = logging.getLogger(__name__)


class OutboxCollector(Collector):
    """``pacsbridge_outbox_entries{state=...}`` read from the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator:  # prometheus_client Collector protocol
        try:
            with self._sessions() as session:
                counts = outbox.state_counts(session)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB is down
            log.warning("metrics: cannot read outbox counts: %s", type(exc).__name__)
            return
        g = GaugeMetricFamily("pacsbridge_outbox_entries", "Outbox entries by state.", labels=["state"])
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g


class ForwardMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, sessions: sessionmaker[Session] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.outcomes = Counter("pacsbridge_forward_outcomes", "Send attempts by destination and outcome.",
                                ["destination", "outcome"], registry=self.registry)
        # outcome: sent | retry (a transient failure, tried again later) | dead (given up).
        self.forwards = Counter("pacsbridge_forwards", "Results forwarded, by destination and outcome.",
                                ["destination", "outcome"], registry=self.registry)
        self.batch_seconds = Histogram("pacsbridge_forward_batch_seconds", "Time to send one batch to a destination.",
                                       ["destination"], registry=self.registry)
        if sessions is not None:
            self.registry.register(OutboxCollector(sessions))


class Forwarder:
    """Component of ``pacsbridge serve``: ``start``/``stop``/``healthy``; ``run_once`` for tests/benchmarks."""

    name = "forwarder"

    def __init__(
        self, sessions: sessionmaker[Session], destinations: Iterable[Destination], ctx: ForwardContext, *,
        policy: RetryPolicy | None = None, interval_s: float = 1.0, batch_limit: int = 500,
        metrics: ForwardMetrics | None = None, senders: dict[str, Sender] | None = None,
        node: str | None = None, lease_s: float = 120.0, gate: Callable[[], bool] | None = None,
    ) -> None:
        from ..store.leader import new_node_name

        self.node = node or new_node_name()  # the claimer name of this process's leases
        self._lease_s = lease_s
        self._gate = gate
        self._sessions = sessions
        self.destinations = {d.name: d for d in destinations}
        self._policy = policy or RetryPolicy()
        self._interval_s = interval_s
        self._batch_limit = batch_limit
        self._metrics = metrics
        self._senders = senders or {kind: make(ctx) for kind, make in SENDERS.items()}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.destinations)), thread_name_prefix="forward")
        self._run_lock = threading.Lock()  # runs never overlap: at most one association per destination
        self._again = False
        self._scheduler: BackgroundScheduler | None = None
        self.last_error: str | None = None

    # one run -----------------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Send everything due now; returns counts of outcomes ({"sent": N, "transient": N, "permanent": N})."""
        with self._run_lock:
            return self._run(now)

    def _run(self, now: datetime | None = None) -> dict[str, int]:
        if not self.destinations:
            return {}
        due = outbox.claim_due(self._sessions, self.node, self._lease_s, now, self._batch_limit,
                               destinations=self.destinations)
        if not due:
            return {}
        by_dest: dict[str, list[DueEntry]] = defaultdict(list)
        for e in due:
            by_dest[e.destination].append(e)
        totals: dict[str, int] = defaultdict(int)
        lock = threading.Lock()
        futures = [self._pool.submit(self._send_destination, self.destinations[name], entries, totals, lock)
                   for name, entries in by_dest.items()]
        for f in futures:
            f.result()
        return dict(totals)

    def _send_destination(self, dest: Destination, entries: list[DueEntry], totals: dict[str, int],
                          lock: threading.Lock) -> None:
        sender = self._senders[dest.kind]
        objects = {e.id: e.object for e in entries}
        unreported = set(objects)
        renewed = [time.monotonic()]

        def report(o: Outcome) -> None:
            self._record(dest, o, objects.get(o.entry_id, "result"))
            unreported.discard(o.entry_id)
            with lock:
                totals[o.state] += 1
            if time.monotonic() - renewed[0] > self._lease_s / 3 and unreported:
                # A slow association: keep the rest of the claim alive (a peer answering each object
                # slowly must not let the leases lapse and another node send the same objects).
                renewed[0] = time.monotonic()
                outbox.renew(self._sessions, unreported, self.node, self._lease_s)

        size = dest.max_per_association
        for start in range(0, len(entries), size):
            chunk = entries[start:start + size]
            if start:  # the claim's lease covers the first association; renew it for each further one
                held = outbox.renew(self._sessions, [e.id for e in entries[start:]], self.node, self._lease_s)
                renewed[0] = time.monotonic()
                if len(held) < len(entries) - start:
                    log.warning("forwarding to %s: %d claim(s) lapsed; another node sends them",
                                dest.name, len(entries) - start - len(held))
                chunk = [e for e in chunk if e.id in held]
                if not chunk:
                    continue
            t0 = time.perf_counter()
            try:
                sender.send(dest, chunk, report)
            except Exception as exc:  # noqa: BLE001 - a sender bug must not stall the other destinations
                log.exception("forwarding to %s failed", dest.name)
                for e in chunk:
                    report(Outcome(e.id, TRANSIENT, f"sender error: {type(exc).__name__}: {exc}"))
            if self._metrics is not None:
                self._metrics.batch_seconds.labels(dest.name).observe(time.perf_counter() - t0)

    def _record(self, dest: Destination, o: Outcome, what: str = "result") -> None:
        new: str | None = outbox.SENT
        if o.state == SENT:
            if not outbox.mark_sent(self._sessions, o.entry_id, o.object_uid, claimer=self.node):
                new = None
                log.warning("outbox %d to %s: acknowledged, but this node's claim had lapsed", o.entry_id, dest.name)
            else:
                # One line per result delivered: no patient data, only the outbox id, object and peer.
                log.info("forwarded %s (outbox %d) to %s (%s)", what, o.entry_id,
                         dest.name, dest.kind)
        else:
            new = outbox.mark_failed(self._sessions, o.entry_id, o.detail, permanent=o.state == PERMANENT,
                                     policy=self._policy, object_uid=o.object_uid, claimer=self.node)
            level = logging.ERROR if new == outbox.DEAD else logging.WARNING
            log.log(level, "outbox %d to %s: %s (%s)", o.entry_id, dest.name, o.detail,
                    "dead" if new == outbox.DEAD else "will retry")
        if self._metrics is not None:
            self._metrics.outcomes.labels(dest.name, o.state).inc()
            if new is not None:
                self._metrics.forwards.labels(dest.name, {outbox.PENDING: "retry"}.get(new, new)).inc()

    # component -------------------------------------------------------------------------------
    def _job(self) -> None:
        # A tick (or a wake) while a run is busy only asks that run to go round once more, so ticks
        # never pile up and APScheduler never has to skip one (max_instances=2 below).
        if self._gate is not None and not self._gate():
            return  # not the scheduler leader: the leading node forwards
        if not self._run_lock.acquire(blocking=False):
            self._again = True
            return
        try:
            while True:
                self._again = False
                self._run()
                if not self._again:
                    break
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - e.g. the database is down: the next run retries
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("forwarding run failed; will retry at the next run")
        finally:
            self._run_lock.release()

    def wake(self, *_: object) -> None:
        """Run now (e.g. right after the worker recorded results) instead of at the next tick."""
        sched = self._scheduler
        if sched is not None and sched.running:
            try:
                sched.modify_job("outbox", next_run_time=datetime.now(timezone.utc))
            except Exception:  # noqa: BLE001 - shutting down
                pass

    def start(self) -> None:
        self._scheduler = BackgroundScheduler(
            timezone="UTC", job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None})
        self._scheduler.add_job(self._job, "interval", seconds=self._interval_s, id="outbox", name="outbox send",
                                next_run_time=datetime.now(timezone.utc))
        self._scheduler.start()
        log.info("forwarder started (%d destination(s): %s)", len(self.destinations),
                 ", ".join(f"{d.name} ({d.kind})" for d in self.destinations.values()))

    def healthy(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.running)

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._pool.shutdown(wait=True)
