"""Benchmark: one /metrics scrape when the audit trail is large.

The counters pacsbridge_associations_rejected_total, pacsbridge_stores_rejected_total and
pacsbridge_refusals_total are counted from the database at scrape time (pacsbridge.store.events),
so a scrape's cost grows with the events table.  This fills a fresh SQLite database with N events
(a quarter each: association_rejected with distinct AE titles, store_rejected, worklist_claim,
not_analysed) and times ``generate_latest`` of the pipeline registry: the first scrape of a process
(which counts every event) and later ones (which add the events recorded since, here 100 new ones
before each).

    .venv/bin/python bench/metrics_scrape.py [--events 100000] [--repeats 5]

Timings depend on the machine's load; the median is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest
from sqlalchemy import insert

from pacsbridge.inference.metrics import PipelineMetrics
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Event, utcnow

KINDS = ("association_rejected", "store_rejected", "worklist_claim", "not_analysed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        migrations.upgrade(engine)
        now = utcnow()
        rows = [{"at": now, "kind": KINDS[i % 4], "level": "warning",
                 "detail": f"called AE title 'X{i}' is not ours ('PACSBRIDGE')" if i % 4 == 0
                 else f"status 0xA900: data set {i} does not match"} for i in range(args.events)]
        with engine.begin() as conn:
            conn.execute(insert(Event), rows)
        registry = PipelineMetrics(make_sessionmaker(engine)).registry
        t0 = time.perf_counter()
        generate_latest(registry)
        first = (time.perf_counter() - t0) * 1000
        times = []
        for r in range(args.repeats):
            with engine.begin() as conn:
                conn.execute(insert(Event), rows[:100])
            t0 = time.perf_counter()
            generate_latest(registry)
            times.append((time.perf_counter() - t0) * 1000)
        engine.dispose()
    print(f"{args.events} events: first /metrics scrape {first:.1f} ms, later scrapes median "
          f"{statistics.median(times):.1f} ms (min {min(times):.1f}, {args.repeats} runs; "
          f"load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
