"""Forwarding benchmark: C-STORE -> pacsbridge serve -> prediction -> outbox -> DICOM SR in Orthanc.

Runs a real Orthanc (Debian's ``orthanc``, throw-away configuration on free loopback ports) as the
reading PACS and ``pacsbridge serve`` as a subprocess (SQLite, default settings, one destination:
that Orthanc, objects = ["sr"]), sends RG1-sized chest radiographs (copies of pydicom-data's
RG1_UNCR, each a new study) over one association, and reports:

* end to end: instance received (``instances.received_at``, the C-STORE receipt) -> SR acknowledged
  by Orthanc (``outbox.sent_at``: Orthanc answered success, so the SR is stored there), p50/p95,
  for a paced stream (--rate images/s) and a full-speed burst;
* results/s to Orthanc over the burst (first receipt to last SR acknowledged);
* the forwarding stage alone: the burst's outbox entries are queued again and sent by an in-process
  Forwarder (build SR from the spooled header + C-STORE + commit; Orthanc de-duplicates), against a
  reference in the same process: the same SRs, built beforehand, C-STOREd with plain pynetdicom over
  one association (no database, no building).  The ratio is what the outbox costs per result.

The model is a random-weight small-resnet-v1 with threshold 0 (every image positive: this measures
speed, not accuracy; the compute is that of the shipped architecture).

    .venv/bin/python bench/forward.py                   # 100 studies full speed + 30 paced at 2/s
    .venv/bin/python bench/forward.py --burst 100 --paced 0
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select, update

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from forward_support import ORTHANC, OrthancServer  # noqa: E402
from pacsbridge.config import Destination  # noqa: E402
from pacsbridge.forward.forwarder import Forwarder  # noqa: E402
from pacsbridge.forward.outbox import due_entries  # noqa: E402
from pacsbridge.forward.senders import ForwardContext  # noqa: E402
from pacsbridge.forward.sr import build_sr  # noqa: E402
from pacsbridge.store.db import make_engine, make_sessionmaker  # noqa: E402
from pacsbridge.store.models import Instance, OutboxEntry, Prediction  # noqa: E402
from pipeline_support import export_model, free_port  # noqa: E402


def pct(values: list[float]) -> str:
    a = np.asarray(values)
    return f"p50 {np.percentile(a, 50):7.0f} ms, p95 {np.percentile(a, 95):7.0f} ms, max {a.max():7.0f} ms"


def ts(dt) -> float:  # noqa: ANN001
    return dt.replace(tzinfo=timezone.utc).timestamp() if dt.tzinfo is None else dt.timestamp()


class Serve:
    def __init__(self, data: Path, model: Path, orthanc_port: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        env.update(PACSBRIDGE_DATA_DIR=str(data), PACSBRIDGE_DICOM_PORT=str(self.port), PACSBRIDGE_HTTP_PORT="0",
                   PACSBRIDGE_BIND_ADDRESS="127.0.0.1", PACSBRIDGE_MODEL_PATH=str(model),
                   PACSBRIDGE_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO),
                   PACSBRIDGE_DESTINATIONS=json.dumps([{"name": "orthanc", "kind": "dicom", "host": "127.0.0.1",
                                                        "port": orthanc_port, "ae_title": "ORTHANC"}]))
        self.log = open(data / "serve.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pacsbridge", "serve"], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        from dicom_support import wait_for_port

        wait_for_port(self.port, 120, self.proc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


def send(port: int, base: pydicom.Dataset, n: int, rate: float | None) -> None:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ComputedRadiographyImageStorage, [base.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE")
    if not assoc.is_established:
        raise SystemExit("association to pacsbridge failed")
    t0 = time.time()
    try:
        for i in range(n):
            if rate:
                delay = t0 + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            base.StudyInstanceUID, base.SeriesInstanceUID = generate_uid(), generate_uid()
            status = assoc.send_c_store(base)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"C-STORE failed: {status}")
        assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()


def wait_sent(sessions, n_total: int, timeout: float = 900) -> list:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as s:
            rows = s.execute(select(Instance.sop_instance_uid, Instance.received_at, OutboxEntry.sent_at,
                                    OutboxEntry.state, Prediction.created_at)
                             .join(Prediction, Prediction.instance_id == Instance.id)
                             .join(OutboxEntry, OutboxEntry.prediction_id == Prediction.id)).all()
        if len(rows) == n_total and all(r[3] == "sent" for r in rows):
            return rows
        if any(r[3] == "dead" for r in rows):
            raise SystemExit(f"dead outbox entries: {[r for r in rows if r[3] == 'dead'][:3]}")
        time.sleep(0.1)
    raise SystemExit(f"only {sum(r[3] == 'sent' for r in rows)} of {n_total} SRs were sent in time")


def forward_stage(sessions, spool: Path, orthanc: OrthancServer, sops: set[str]) -> tuple[float, float]:  # noqa: ANN001
    """(results/s of the in-process forwarder, SR/s of plain pynetdicom C-STOREs of prebuilt SRs)."""
    with sessions.begin() as s:
        ids = s.scalars(select(OutboxEntry.id).join(Prediction, Prediction.id == OutboxEntry.prediction_id)
                        .join(Instance, Instance.id == Prediction.instance_id)
                        .where(Instance.sop_instance_uid.in_(sops))).all()
        s.execute(update(OutboxEntry).where(OutboxEntry.id.in_(ids)).values(state="pending", sent_at=None))
    dest = Destination(name="orthanc", kind="dicom", host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC",
                       max_per_association=len(ids))
    with sessions() as s:
        entries = due_entries(s, destinations=["orthanc"])
    # reference: the same SRs built beforehand, sent over one association by plain pynetdicom
    srs = [build_sr(e.result, pydicom.dcmread(spool / e.result.file_path, stop_before_pixels=True),
                    ae_title="PACSBRIDGE") for e in entries]
    ae = AE(ae_title="PACSBRIDGE")
    ae.add_requested_context(srs[0].SOPClassUID, [srs[0].file_meta.TransferSyntaxUID])
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
    for ds in srs:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    reference = len(srs) / (time.perf_counter() - t0)
    fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", spool))
    t0 = time.perf_counter()
    out = fwd.run_once()
    elapsed = time.perf_counter() - t0
    fwd.stop()
    assert out == {"sent": len(ids)}, out
    return len(ids) / elapsed, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=100, help="studies sent at full speed (default 100)")
    ap.add_argument("--paced", type=int, default=30, help="studies sent paced (default 30; 0 = skip)")
    ap.add_argument("--rate", type=float, default=2.0, help="paced rate, studies/s (default 2)")
    args = ap.parse_args()
    if ORTHANC is None:
        raise SystemExit("Orthanc is not installed (apt-get install orthanc)")
    base = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))
    with tempfile.TemporaryDirectory(prefix="pb-fwd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = export_model(tmp / "model", threshold=0.0, name="bench-random")
        orthanc = OrthancServer(tmp / "orthanc")
        orthanc.start()
        data = tmp / "pb"
        data.mkdir()
        serve = Serve(data, model, orthanc.dicom_port)
        sessions = make_sessionmaker(make_engine(f"sqlite:///{data / 'pacsbridge.db'}"))
        try:
            print(f"pacsbridge serve -> Orthanc, RG1_UNCR ({base.Rows}x{base.Columns}, "
                  f"{len(base.PixelData) / 1e6:.1f} MB) one study per image, objects=['sr']")
            done = 0
            if args.paced:
                send(serve.port, base, args.paced, args.rate)
                rows = wait_sent(sessions, args.paced)
                e2e = [(ts(r[2]) - ts(r[1])) * 1000 for r in rows]
                print(f"paced {args.rate:g}/s, {args.paced} studies: receipt -> SR in Orthanc {pct(e2e)}")
                print(f"paced {args.rate:g}/s, {args.paced} studies: of which receipt -> prediction "
                      f"{pct([(ts(r[4]) - ts(r[1])) * 1000 for r in rows])}")
                done = args.paced
            with sessions() as s:
                before = set(s.scalars(select(Instance.sop_instance_uid)))
            send(serve.port, base, args.burst, None)
            rows = [r for r in wait_sent(sessions, done + args.burst) if r[0] not in before]
            e2e = [(ts(r[2]) - ts(r[1])) * 1000 for r in rows]
            span = max(ts(r[2]) for r in rows) - min(ts(r[1]) for r in rows)
            print(f"full speed, {args.burst} studies: receipt -> SR in Orthanc {pct(e2e)}")
            print(f"full speed, {args.burst} studies: of which receipt -> prediction "
                  f"{pct([(ts(r[4]) - ts(r[1])) * 1000 for r in rows])}")
            print(f"full speed, {args.burst} studies: {args.burst / span:.1f} results/s to Orthanc "
                  f"(first receipt to last SR acknowledged, {span:.1f} s)")
        finally:
            serve.stop()
        burst_sops = {r[0] for r in rows}
        rate, reference = forward_stage(sessions, data / "spool", orthanc, burst_sops)
        print(f"forwarding stage alone ({len(burst_sops)} SRs, build + C-STORE + commit): {rate:.1f} SR/s; "
              f"reference (prebuilt SRs, plain pynetdicom, one association): {reference:.1f} SR/s; "
              f"ratio {rate / reference:.2f}")
        stored = len(orthanc.instances())
        print(f"Orthanc holds {stored} instances (expected {done + args.burst}: each SR once)")
        orthanc.stop()


if __name__ == "__main__":
    main()
