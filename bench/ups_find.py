"""Benchmark: DICOM UPS pull against a worklist of N items (SQLite, and PostgreSQL when it answers).

Fills a fresh database with N studies (one image and one positive prediction each; the
WorklistUpdater opens their items), starts the receiver with UPS on a loopback port and times, over
one association of a pynetdicom SCU: C-ECHO (the reference round trip), C-FIND of every SCHEDULED
item (returns the first ``max_find_matches``, 1000, then 0xA700), C-FIND by Patient ID (one match),
N-GET of one item, and a claim / N-SET / complete cycle (of items found by one earlier C-FIND).
Prints p50 / p95 in ms and the ratio of each p50 to the C-ECHO p50.

    .venv/bin/python bench/ups_find.py [--items 5000] [--repeats 20] [--backend sqlite|postgresql|both]

Timings depend on the machine's load; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import UnifiedProcedureStepPull, UnifiedProcedureStepPush, Verification

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_support import PG_BASE_URL, postgres_schema_url, postgres_unavailable_reason  # noqa: E402

from pacsbridge.auth.users import bind_ae, create_user  # noqa: E402
from pacsbridge.dicom.storage_scp import StorageSCP  # noqa: E402
from pacsbridge.dicom.ups_scp import UpsContext  # noqa: E402
from pacsbridge.store import migrations  # noqa: E402
from pacsbridge.store.db import make_engine, make_sessionmaker  # noqa: E402
from pacsbridge.store.models import Instance, InstanceState, Prediction, Series, Study, WorklistItem  # noqa: E402
from pacsbridge.store.spool import Spool  # noqa: E402
from pacsbridge.worklist.items import WorklistUpdater  # noqa: E402


def fill(sessions, n: int) -> None:  # noqa: ANN001
    now = datetime.now(timezone.utc)
    with sessions.begin() as s:
        for i in range(n):
            study = Study(study_instance_uid=generate_uid(), patient_id=f"P{i:06d}", patient_name=f"Bench^{i}",
                          accession_number=f"A{i}", requested_priority=("STAT", "HIGH", "ROUTINE")[i % 3])
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_instance_uid=generate_uid(), modality="CR")
            s.add(series)
            s.flush()
            inst = Instance(series_id=series.id, sop_instance_uid=generate_uid(),
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            file_path=f"bench/{i}.dcm", file_size=1, state=InstanceState.PREDICTED.value)
            s.add(inst)
            s.flush()
            s.add(Prediction(instance_id=inst.id, probability=0.5 + (i % 500) / 1000, positive=True, threshold=0.5,
                             model_id="bench", weights_sha256="0" * 64, created_at=now))
    WorklistUpdater(sessions, 240).refresh(now=now)


def timed(fn, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    runs.sort()
    return statistics.median(runs), runs[min(len(runs) - 1, int(round(0.95 * (len(runs) - 1))))]


def run(url: str, items: int, repeats: int, label: str) -> None:
    engine = make_engine(url)
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    started = time.perf_counter()
    fill(sessions, items)
    with sessions.begin() as s:  # only a bound AE title may use UPS
        create_user(s, "bench", "radiologist")
        bind_ae(s, "bench", "BENCH")
    print(f"[{label}] {items} worklist items written in {time.perf_counter() - started:.1f} s")
    with sessions() as s:
        some = s.query(WorklistItem.ups_uid, Study.patient_id).join(Study).limit(1).one()
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool", fsync=False)
        spool.prepare()
        scp = StorageSCP(ae_title="PACSBRIDGE", bind_address="127.0.0.1", port=0, spool=spool, sessions=sessions,
                         ups=UpsContext(sessions=sessions))
        scp.start()
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(UnifiedProcedureStepPull)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSBRIDGE")
        assert assoc.is_established
        try:
            def find(**keys) -> int:  # noqa: ANN003
                q = Dataset()
                q.ProcedureStepState = keys.get("state", "SCHEDULED")
                q.PatientID = keys.get("patient_id", "")
                q.PatientName = q.StudyInstanceUID = q.ScheduledProcedureStepPriority = q.ProcedureStepLabel = ""
                q.InputInformationSequence = Sequence()
                return sum(1 for st, _ in assoc.send_c_find(q, UnifiedProcedureStepPull) if st.Status == 0xFF00)

            def cycle() -> None:
                txn = generate_uid()
                info = Dataset()
                info.ProcedureStepState, info.TransactionUID = "IN PROGRESS", txn
                uid = scheduled.pop()
                assert assoc.send_n_action(info, 1, UnifiedProcedureStepPush, uid)[0].Status == 0
                mods = _finding(txn)
                assert assoc.send_n_set(mods, UnifiedProcedureStepPush, uid)[0].Status == 0
                info.ProcedureStepState = "COMPLETED"
                assert assoc.send_n_action(info, 1, UnifiedProcedureStepPush, uid)[0].Status == 0

            n_all = find()
            scheduled = [ds.SOPInstanceUID for st, ds in assoc.send_c_find(_one_scheduled(), UnifiedProcedureStepPull)
                         if st.Status == 0xFF00]
            cases = [
                ("C-ECHO (reference)", lambda: assoc.send_c_echo()),
                (f"C-FIND SCHEDULED ({n_all} returned)", find),
                ("C-FIND by Patient ID (1 match)", lambda: find(patient_id=some.patient_id, state="")),
                ("N-GET one item", lambda: assoc.send_n_get([], UnifiedProcedureStepPush, some.ups_uid)),
                ("claim + N-SET + complete", cycle),
            ]
            ref = None
            for name, fn in cases:
                p50, p95 = timed(fn, repeats)
                ref = ref or p50
                print(f"[{label}] {name:42s} p50 {p50:8.1f} ms  p95 {p95:8.1f} ms  x{p50 / ref:7.1f} C-ECHO")
        finally:
            assoc.release()
            scp.stop()
    engine.dispose()


def _one_scheduled() -> Dataset:
    q = Dataset()
    q.ProcedureStepState = "SCHEDULED"
    q.SOPInstanceUID = ""
    return q


def _finding(txn: str) -> Dataset:
    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    content = Dataset()
    content.ValueType = "CODE"
    content.ConceptNameCodeSequence = Sequence([code("121071", "DCM", "Finding")])
    content.ConceptCodeSequence = Sequence([code("pneumonia", "99PACSBRIDGE", "Pneumonia")])
    performed = Dataset()
    performed.PerformedProcessingParametersSequence = Sequence([content])
    mods = Dataset()
    mods.TransactionUID = txn
    mods.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return mods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{tmp}/bench.db", args.items, args.repeats, "sqlite")
    if args.backend in ("postgresql", "both"):
        reason = postgres_unavailable_reason()
        if reason:
            print(f"[postgresql] skipped: {reason}")
            return
        with postgres_schema_url(PG_BASE_URL) as url, contextlib.suppress(KeyboardInterrupt):
            run(url, args.items, args.repeats, "postgresql")


if __name__ == "__main__":
    main()
