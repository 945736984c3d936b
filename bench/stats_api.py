"""Benchmark: GET /api/stats latency with 100,000 predictions and 5,000 RIS labels, SQLite and PostgreSQL.

Fills a fresh database (one study, series, instance and prediction per image; 20 % flagged, of
which 70 % have a completed worklist item; 5,000 RIS labels on random studies; 2 % refused), serves
the real API (create_app + HttpServer on loopback, with the drift monitor) and times ``--requests``
sequential authenticated GETs of /api/stats.

    .venv/bin/python bench/stats_api.py                 # both databases
    .venv/bin/python bench/stats_api.py --db sqlite --requests 20

Each is timed twice: with the cache off (``stats_cache_s=0``: every request aggregates the whole
history) and with the default 10 s cache (a dashboard polling; at most one request in 10 s pays the
aggregate), then ``GET /api/stats/weekly?weeks=12`` (never cached).  Each p50 is also printed as a
multiple of one full scan of ``predictions`` timed first, so runs on a loaded box compare.  Goal
(issue 17): p95 < 200 ms.  A benchmark, not a test: the box is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import insert, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacsbridge.api.app import create_app  # noqa: E402
from pacsbridge.api.server import HttpServer  # noqa: E402
from pacsbridge.auth.users import create_user  # noqa: E402
from pacsbridge.store import migrations, study_scores  # noqa: E402
from pacsbridge.store.db import make_engine, make_sessionmaker  # noqa: E402
from pacsbridge.store.models import Instance, Label, Prediction, Series, Study, WorklistItem, utcnow  # noqa: E402
from pacsbridge.validation.drift import DriftMonitor, Reference  # noqa: E402

PG_URL = os.environ.get("PACSBRIDGE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def fill(engine, n: int, n_labels: int) -> None:  # noqa: ANN001
    migrations.upgrade(engine)
    rng = random.Random(17)
    now = utcnow()
    rows: dict[type, list[dict]] = {Study: [], Series: [], Instance: [], Prediction: [], WorklistItem: [], Label: []}
    for i in range(1, n + 1):
        at = now - timedelta(minutes=rng.uniform(1, 60 * 24 * 90))
        refused = rng.random() < 0.02
        rows[Study].append(dict(id=i, study_instance_uid=f"1.2.826.0.1.57.{i}", accession_number=f"S{i:07d}",
                                created_at=at))
        rows[Series].append(dict(id=i, study_id=i, series_instance_uid=f"1.2.826.0.1.57.{i}.1", modality="CR",
                                 created_at=at))
        rows[Instance].append(dict(id=i, series_id=i, sop_instance_uid=f"1.2.826.0.1.57.{i}.1.1", sop_class_uid="1.2",
                                   transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"b/{i}.dcm", file_size=1,
                                   state="not_analysed" if refused else "predicted",
                                   state_reason="not a chest image (BodyPartExamined HAND)" if refused else None,
                                   received_at=at, updated_at=at))
        if refused:
            continue
        p = rng.random()
        positive = p > 0.8
        rows[Prediction].append(dict(id=i, instance_id=i, probability=p, positive=positive, threshold=0.8,
                                     model_id="bench", weights_sha256="0" * 64, created_at=at, ood_score=1.0))
        if positive and rng.random() < 0.7:
            rows[WorklistItem].append(dict(
                id=i, study_id=i, ups_uid=f"1.2.826.0.1.58.{i}", priority=1.0, probability=p, status="completed",
                first_positive_at=at, created_at=at, updated_at=at, completed_at=at + timedelta(minutes=30),
                finding="pneumonia" if rng.random() < 0.6 else "no_pneumonia", completed_by="bench"))
    # Audit reads (audit_fraction 0.02): 2 % of the studies scored negative, read, 5 % pneumonia.
    negatives = [r["instance_id"] for r in rows[Prediction] if not r["positive"]]
    for j, sid in enumerate(rng.sample(negatives, len(negatives) // 50), start=n + 1):
        rows[WorklistItem].append(dict(
            id=j, study_id=sid, ups_uid=f"1.2.826.0.1.59.{sid}", priority=0.1, probability=0.1, status="completed",
            kind="audit", first_positive_at=now, created_at=now, updated_at=now, completed_at=now,
            finding="pneumonia" if rng.random() < 0.05 else "no_pneumonia", completed_by="bench"))
    for j, sid in enumerate(rng.sample(range(1, n + 1), n_labels), start=1):
        rows[Label].append(dict(id=j, source="ris.csv", study_key=f"uid:1.2.826.0.1.57.{sid}",
                                study_instance_uid=f"1.2.826.0.1.57.{sid}", finding=rng.choice(
                                    ["pneumonia", "no_pneumonia", "no_pneumonia", "other"]),
                                study_id=sid, imported_at=now))
    with engine.begin() as conn:
        for table, batch in rows.items():
            for k in range(0, len(batch), 2000):
                conn.execute(insert(table.__table__), batch[k:k + 2000])
        study_scores.rebuild(conn)  # bulk inserts bypass the ORM event that keeps it
    # As a site's database is after weeks of running, not straight after one bulk load: the WAL
    # checkpointed (SQLite); statistics and the visibility map up to date, as autovacuum keeps them (PostgreSQL).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("VACUUM ANALYZE"))
        else:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))


def run(url: str, n: int, n_labels: int, requests: int, connect_args: dict | None = None) -> None:
    engine = make_engine(url, connect_args=connect_args or {})
    t0 = time.perf_counter()
    fill(engine, n, n_labels)
    print(f"  filled {n} images, {n_labels} labels in {time.perf_counter() - t0:.0f} s", flush=True)
    sessions = make_sessionmaker(engine)
    drift = DriftMonitor(sessions, Reference("bench", 0.01, 0.01, 0.2))
    scan = _reference_scan(sessions)
    print(f"  reference: one full scan of predictions (count and sum), median {scan:.1f} ms", flush=True)
    for cache_s, label, path in ((0.0, "uncached (every request aggregates)", "/api/stats"),
                                 (10.0, "with the default 10 s cache", "/api/stats"),
                                 (0.0, "(12 ISO weeks, never cached)", "/api/stats/weekly?weeks=12")):
        p50, p95 = _time(sessions, drift, cache_s, requests, path)
        print(f"  GET {path} {label}: p50 {p50:.0f} ms, p95 {p95:.0f} ms over {requests} requests; "
              f"p50 = {p50 / scan:.1f} x the reference scan; p95 / 200 ms goal = {p95 / 200:.2f}", flush=True)
    engine.dispose()


def _reference_scan(sessions, runs: int = 15) -> float:  # noqa: ANN001
    """Median time of the cheapest whole-history aggregate (one pass over predictions): the ratio to
    it says how much more than one table scan a request costs, on this box at this load."""
    times = []
    with sessions() as s:
        for _ in range(runs):
            t = time.perf_counter()
            s.execute(text("SELECT count(*), sum(CASE WHEN positive THEN 1 ELSE 0 END) FROM predictions")).all()
            times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def _time(sessions, drift, cache_s: float, requests: int, path: str = "/api/stats") -> tuple[float, float]:  # noqa: ANN001
    with sessions.begin() as s:
        token = create_user(s, f"bench{uuid.uuid4().hex[:6]}", "monitor")[1]
    server = HttpServer(create_app(sessions, drift=drift, stats_cache_s=cache_s), "127.0.0.1", 0)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get(path).status_code == 200  # warm up
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
        if path != "/api/stats":
            return _percentiles(times)
        m = r.json()["models"][0]
        print(f"  scored {m['scored']}, flagged {m['flagged']}, ppv {m['ppv']}, sensitivity {m['sensitivity']['value']}"
              f" (n {m['sensitivity']['n']})")
    finally:
        server.stop()
    return _percentiles(times)


def _percentiles(times: list[float]) -> tuple[float, float]:
    a = np.asarray(times)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--labels", type=int, default=5_000)
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as d:
            print("sqlite:", flush=True)
            run(f"sqlite:///{Path(d) / 'bench.db'}", args.images, args.labels, args.requests)
    if args.db in ("postgresql", "both"):
        schema = f"pb_bench_{uuid.uuid4().hex[:8]}"
        admin = make_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            print("postgresql:", flush=True)
            run(PG_URL, args.images, args.labels, args.requests, {"options": f"-csearch_path={schema}"})
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
