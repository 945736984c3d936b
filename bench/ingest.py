"""Ingest benchmark: 100 large CR images over one association with DCMTK storescu, to

  (a) pacsbridge's Storage SCP (durable: every file fsync'd + folder fsync'd + SQLite row committed),
  (b) pynetdicom's bundled storescp app (``python -m pynetdicom storescp``, writes files, no fsync),
  (c) DCMTK's storescp (writes files, no fsync),

each with its default settings, then the bare receivers again with their largest max PDU ("tuned").
Prints MB/s for each and pacsbridge's ratio to the faster bare receiver.

    .venv/bin/python bench/ingest.py [--count 100] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def make_inputs(folder: Path, count: int) -> list[Path]:
    """``count`` copies of RG1_UNCR.dcm (chest PA, ~7 MB) with fresh Study/Series/SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    template = dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))
    paths = []
    for i in range(count):
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID = generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"cr{i:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def drop_caches_hint() -> None:
    os.sync()  # start each run from the same dirty-page state


def run_storescu(port: int, files: list[Path], aec: str) -> float:
    drop_caches_hint()
    start = time.perf_counter()
    res = subprocess.run(
        ["storescu", "-xe", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-2000:]}")
    return elapsed


def bench_receiver(name: str, cmd: list[str], port: int, files: list[Path], out: Path, env: dict | None = None,
                   aec: str = "ANY") -> float:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        elapsed = run_storescu(port, files, aec)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stored = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    if len(stored) != len(files):
        raise RuntimeError(f"{name}: {len(stored)} of {len(files)} files stored")
    shutil.rmtree(out)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="runs per receiver; the best is reported")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--only", default="", metavar="TEXT",
                    help="run only the receivers whose name contains TEXT (e.g. pacsbridge); no ratios then")
    args = ap.parse_args()
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        print("DCMTK (storescu/storescp) is required: apt-get install dcmtk", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="pb-ingest-", dir=args.workdir))
    try:
        files = make_inputs(work / "in", args.count)
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"{len(files)} files, {total_mb:.0f} MB, one association each run (storescu -xe)")

        def pacsbridge(port: int, out: Path) -> tuple[list[str], dict]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
            env.update(PACSBRIDGE_DATA_DIR=str(out), PACSBRIDGE_DICOM_PORT=str(port), PACSBRIDGE_HTTP_PORT="0",
                       PACSBRIDGE_DICOM_HOST="127.0.0.1", PACSBRIDGE_WORKER_ENABLED="false",
                       PACSBRIDGE_LOG_LEVEL="WARNING", PACSBRIDGE_FSYNC="true")
            return [sys.executable, "-m", "pacsbridge", "serve"], env

        receivers = {
            "pacsbridge (fsync + DB row)": lambda port, out: pacsbridge(port, out),
            "pynetdicom storescp": lambda port, out: (
                [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out)], None),
            "DCMTK storescp": lambda port, out: (["storescp", "-od", str(out), str(port)], None),
            "pynetdicom storescp -pdu 0 (tuned)": lambda port, out: (
                [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-pdu", "0"], None),
            "DCMTK storescp -pdu 131072 (tuned)": lambda port, out: (
                ["storescp", "-pdu", "131072", "-od", str(out), str(port)], None),
        }
        results: dict[str, float] = {}
        if args.only:
            receivers = {k: v for k, v in receivers.items() if args.only in k}
        for name, make in receivers.items():
            best = None
            for _ in range(args.repeat):
                port = free_port()
                out = work / "out"
                cmd, env = make(port, out)
                elapsed = bench_receiver(name, cmd, port, files, out, env=env,
                                         aec="PACSBRIDGE" if name.startswith("pacsbridge") else "ANY")
                best = elapsed if best is None else min(best, elapsed)
            results[name] = total_mb / best
            print(f"  {name:38s} {best:7.2f} s  {results[name]:8.1f} MB/s", flush=True)

        if args.only:
            return 0
        ours = results["pacsbridge (fsync + DB row)"]
        bare_default = max(results["pynetdicom storescp"], results["DCMTK storescp"])
        bare_tuned = max(v for k, v in results.items() if not k.startswith("pacsbridge"))
        print()
        print(f"pacsbridge / faster bare receiver (defaults):   {ours / bare_default:.2f}x")
        print(f"pacsbridge / fastest bare receiver (any PDU):    {ours / bare_tuned:.2f}x")
        print(f"pacsbridge / pynetdicom storescp -pdu 0:         "
              f"{ours / results['pynetdicom storescp -pdu 0 (tuned)']:.2f}x  (goal >= 1.0x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
