"""Benchmark: GET /api/worklist latency with 5,000 worklist items, on SQLite and PostgreSQL, idle
and while the receiver ingests RG1-size images; plus the cost of one scheduler refresh.

For each database it fills a fresh schema with ``--items`` items (default 5,000: 70 % completed,
5 % canceled, 20 % scheduled, 5 % in progress; one study, series, instance and positive prediction
each), starts ``pacsbridge serve`` (receiver + HTTP API + scheduler; the inference worker is off so
that the two CPUs measure the API and the receiver, not torch), and times ``--requests`` sequential
authenticated GETs:

* ``/api/worklist`` (the open items, first 200) and ``/api/worklist?status=all&limit=200``,
  idle, then while a pynetdicom client sends RG1_UNCR (about 7 MB each) as fast as it can;
* reference: the same query as a plain function call in this process (no HTTP), so the ratio
  shows what HTTP, auth and JSON add.

It also times ``WorklistUpdater.refresh()`` on that history: the first (full) run and a later
incremental run (new predictions only + ageing of scheduled items), which must not grow with the
number of completed items.

    .venv/bin/python bench/worklist_api.py                    # both databases, 5,000 items
    .venv/bin/python bench/worklist_api.py --db sqlite --requests 100

Goal (issue 7): p95 < 100 ms.  This is a benchmark, not a test: the box is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import create_engine, insert, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacsbridge.auth.users import create_user  # noqa: E402
from pacsbridge.store import migrations  # noqa: E402
from pacsbridge.store.db import make_engine, make_sessionmaker  # noqa: E402
from pacsbridge.store.models import Instance, Prediction, Series, Study, WorklistItem, utcnow  # noqa: E402
from pacsbridge.worklist.items import WorklistUpdater, list_worklist  # noqa: E402

PG_URL = os.environ.get("PACSBRIDGE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def fill(url: str, n: int) -> None:
    """Migrate and insert ``n`` items (bulk Core inserts)."""
    engine = make_engine(url)
    migrations.upgrade(engine)
    rng = random.Random(7)
    now = utcnow()
    studies, series, instances, preds, items = [], [], [], [], []
    for i in range(1, n + 1):
        at = now - timedelta(minutes=rng.uniform(1, 60 * 24 * 30))
        p = rng.uniform(0.5, 1.0)
        studies.append(dict(id=i, study_instance_uid=f"1.2.826.0.1.55.{i}", patient_id=f"BENCH{i:06d}",
                            patient_name=f"Bench^Patient{i}", accession_number=f"B{i:07d}", study_date="20260101",
                            study_description="CHEST PA", patient_age="050Y", created_at=at))
        series.append(dict(id=i, study_id=i, series_instance_uid=f"1.2.826.0.1.55.{i}.1", modality="CR",
                           created_at=at))
        instances.append(dict(id=i, series_id=i, sop_instance_uid=f"1.2.826.0.1.55.{i}.1.1", sop_class_uid="1.2",
                              transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"bench/{i}.dcm", file_size=1,
                              state="predicted", received_at=at, updated_at=at))
        preds.append(dict(id=i, instance_id=i, probability=p, positive=True, threshold=0.5, model_id="bench",
                          weights_sha256="0" * 64, created_at=at))
        r = rng.random()
        status = "completed" if r < 0.70 else "canceled" if r < 0.75 else "scheduled" if r < 0.95 else "in_progress"
        done = at + timedelta(minutes=rng.uniform(5, 600))
        items.append(dict(
            id=i, study_id=i, open_study_id=i if status in ("scheduled", "in_progress") else None,
            ups_uid=f"1.2.826.0.1.56.{i}", priority=p + rng.random(), probability=p, status=status,
            first_positive_at=at, created_at=at, updated_at=at,
            claimed_by="bench" if status == "in_progress" else None,
            claim_expires_at=now + timedelta(hours=8) if status == "in_progress" else None,
            finding="pneumonia" if status == "completed" else None,
            completed_at=done if status in ("completed", "canceled") else None))
    with engine.begin() as conn:
        for table, rows in ((Study, studies), (Series, series), (Instance, instances), (Prediction, preds),
                            (WorklistItem, items)):
            for k in range(0, len(rows), 1000):
                conn.execute(insert(table.__table__), rows[k:k + 1000])
        if engine.dialect.name == "postgresql":  # explicit ids: move the sequences past them
            for t in ("studies", "series", "instances", "predictions", "worklist_items"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), {n})"))
    engine.dispose()


class Serve:
    def __init__(self, data: Path, url: str) -> None:
        self.port, self.http = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        env.update(PACSBRIDGE_DATA_DIR=str(data), PACSBRIDGE_DATABASE_URL=url, PACSBRIDGE_DICOM_PORT=str(self.port),
                   PACSBRIDGE_HTTP_PORT=str(self.http), PACSBRIDGE_BIND_ADDRESS="127.0.0.1",
                   PACSBRIDGE_WORKER_ENABLED="false", PACSBRIDGE_LOG_LEVEL="WARNING", PACSBRIDGE_FSYNC="false")
        self.log = open(data / "serve.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pacsbridge", "serve"], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.http}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited: {(data / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("serve did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


class Ingest(threading.Thread):
    """Sends RG1_UNCR with fresh UIDs over one association until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.sent, self.stop_flag = port, 0, threading.Event()
        self.ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))

    def run(self) -> None:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(ComputedRadiographyImageStorage, [self.ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSBRIDGE")
        try:
            while not self.stop_flag.is_set() and assoc.is_established:
                self.ds.SOPInstanceUID = self.ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                self.ds.StudyInstanceUID, self.ds.SeriesInstanceUID = generate_uid(), generate_uid()
                if getattr(assoc.send_c_store(self.ds), "Status", None) == 0:
                    self.sent += 1
        finally:
            if assoc.is_established:
                assoc.release()


def time_gets(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"GET {path}: {r.status_code} {r.text[:200]}")
    return out


def run(db: str, n_items: int, n_req: int) -> None:
    with tempfile.TemporaryDirectory(prefix="pb-wl-bench-") as tmp:
        data = Path(tmp)
        schema = None
        if db == "sqlite":
            url = f"sqlite:///{data / 'pacsbridge.db'}"
        else:
            schema = f"pbbench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(PG_URL)
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        try:
            t0 = time.perf_counter()
            fill(url, n_items)
            engine = make_engine(url)
            sessions = make_sessionmaker(engine)
            with sessions.begin() as s:
                token = create_user(s, "bench", "radiologist")[1]
            print(f"\n[{db}] {n_items} items filled in {time.perf_counter() - t0:.1f} s")

            # Reference: the query in-process, no HTTP.
            ref = []
            for _ in range(n_req):
                t1 = time.perf_counter()
                with sessions() as s:
                    rows = list_worklist(s, limit=200)
                ref.append((time.perf_counter() - t1) * 1000)
            print(f"  reference list_worklist() in-process ({len(rows)} rows): p50 {pct(ref)[0]:6.1f} ms, "
                  f"p95 {pct(ref)[1]:6.1f} ms")

            # The scheduler's refresh on this history: first run scans everything, later runs are incremental.
            up = WorklistUpdater(sessions, 240)
            t1 = time.perf_counter()
            up.refresh()
            full = (time.perf_counter() - t1) * 1000
            incr = []
            for _ in range(5):
                t1 = time.perf_counter()
                up.refresh()
                incr.append((time.perf_counter() - t1) * 1000)
            with sessions() as s:
                scheduled = s.scalar(text("SELECT count(*) FROM worklist_items WHERE status = 'scheduled'"))
            print(f"  scheduler refresh: first (full) {full:7.1f} ms; incremental p50 {pct(incr)[0]:6.1f} ms "
                  f"(new predictions + ageing of the {scheduled} scheduled items)")
            engine.dispose()

            serve = Serve(data, url)
            try:
                headers = {"Authorization": f"Bearer {token}"}
                with httpx.Client(base_url=serve.base, headers=headers, timeout=30) as client:
                    time_gets(client, "/api/worklist", 5)  # warm-up
                    idle = time_gets(client, "/api/worklist", n_req)
                    idle_all = time_gets(client, "/api/worklist?status=all&limit=200", n_req)
                    ingest = Ingest(serve.port)
                    ingest.start()
                    time.sleep(1.0)
                    t1 = time.perf_counter()
                    busy = time_gets(client, "/api/worklist", n_req)
                    busy_all = time_gets(client, "/api/worklist?status=all&limit=200", n_req)
                    elapsed = time.perf_counter() - t1
                    ingest.stop_flag.set()
                    ingest.join(60)
            finally:
                serve.stop()
            rate = ingest.sent / max(elapsed + 1.0, 1e-9)
            for label, vals in (("idle  GET /api/worklist", idle), ("idle  ?status=all&limit=200", idle_all),
                                ("ingest GET /api/worklist", busy), ("ingest ?status=all&limit=200", busy_all)):
                p50, p95 = pct(vals)
                print(f"  {label:30s} p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  (x{p50 / pct(ref)[0]:.1f} of reference p50)"
                      f"  {'MET' if p95 < 100 else 'NOT MET'} p95<100ms")
            print(f"  receiver stored {ingest.sent} RG1_UNCR images during the loaded runs (~{rate:.1f} img/s)")
        finally:
            if schema:
                with admin.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    print(f"GET /api/worklist benchmark: {args.items} items, {args.requests} sequential requests per case; "
          f"{os.cpu_count()} CPUs")
    for db in (("sqlite", "postgresql") if args.db == "both" else (args.db,)):
        run(db, args.items, args.requests)


if __name__ == "__main__":
    main()
