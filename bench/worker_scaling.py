"""Worker scaling: images scored per second with 1 and 2 ``pacsbridge worker`` processes on one PostgreSQL.

For each worker count, in a fresh PostgreSQL schema and a fresh data folder: a receiver-only
``pacsbridge serve --roles receiver`` takes the same ``--count`` images (copies of pydicom-data's
RG1_UNCR.dcm, 7.2 MB each, with new UIDs) from DCMTK ``storescu`` over one association; once every
row is in the database the workers are started together.  The clock starts when all of them are
registered (model loaded, heartbeat running) and stops when every instance has its prediction:

    images/s = (images scored after the start) / (seconds from the start to the last prediction)

At the end it checks that every instance has exactly one prediction and that no instance is in
another state than ``predicted``, and prints the ratio 2 workers / 1 worker.

The model is a small-resnet-v1 with seeded random weights (tests/pipeline_support.export_model:
the shipped model's network, not its weights; the shipped model refuses RG1, an adult, at its
intended-use gate, so it would measure refusals, not scoring).  ``--model shipped`` uses the
shipped model anyway.  ``--threads N`` sets OMP_NUM_THREADS for each worker (default: torch's own,
one thread per core per process).

    .venv/bin/python bench/worker_scaling.py [--count 200] [--workers 1,2] [--threads N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from sqlalchemy import func, select  # noqa: E402

from dicom_support import (  # noqa: E402
    daemon_env, free_port, pacsbridge_cmd, postgres_schema_url, postgres_unavailable_reason, wait_for_port,
)
from pacsbridge.store.db import make_engine, make_sessionmaker  # noqa: E402
from pacsbridge.store.models import Instance, Prediction  # noqa: E402
from pacsbridge.store.workers import live_count  # noqa: E402
from pipeline_support import SHIPPED_MODEL, export_model, reuid, sample_file  # noqa: E402

TIMEOUT_S = 900.0


def make_inputs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    src = sample_file("RG1_UNCR.dcm")
    return [reuid(src, folder / f"img{i:04d}.dcm") for i in range(count)]


def counts(sessions) -> tuple[int, int]:  # noqa: ANN001
    with sessions() as s:
        return (int(s.scalar(select(func.count()).select_from(Instance)) or 0),
                int(s.scalar(select(func.count()).select_from(Prediction)) or 0))


def wait_until(what: str, done, procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> float:  # noqa: ANN001
    """Poll ``done()`` every 0.05 s; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: a process exited early ({dead[0].returncode}); see its log")
        time.sleep(0.05)
    return time.monotonic()


def check_once(sessions) -> str:  # noqa: ANN001
    """One line: instances, predictions, instances with != 1 prediction, states."""
    with sessions() as s:
        per = (select(Instance.id, func.count(Prediction.id).label("n")).outerjoin(Prediction)
               .group_by(Instance.id).subquery())
        wrong = int(s.scalar(select(func.count()).select_from(per).where(per.c.n != 1)) or 0)
        states = dict(s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
    n_inst, n_pred = counts(sessions)
    ok = wrong == 0 and n_inst == n_pred and set(states) == {"predicted"}
    return (f"{'OK' if ok else 'FAILED'}: {n_inst} instances, {n_pred} predictions, {wrong} instances without "
            f"exactly one prediction, states {dict(sorted(states.items()))}")


def run_one(n_workers: int, files: Path, count: int, model: Path, threads: int | None, work: Path) -> float:
    data = Path(tempfile.mkdtemp(prefix=f"data-{n_workers}-", dir=work))
    port = free_port()
    logs: list = []
    procs: list[subprocess.Popen] = []
    with postgres_schema_url() as url:
        env = daemon_env(data, port, PACSBRIDGE_DATABASE_URL=url, PACSBRIDGE_MODEL_PATH=str(model),
                         PACSBRIDGE_LOG_LEVEL="WARNING")
        wenv = dict(env, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            logs.append(open(work / f"serve-{n_workers}.log", "w"))
            procs.append(subprocess.Popen(pacsbridge_cmd("serve", "--roles", "receiver"), env=env,
                                          stdout=logs[-1], stderr=subprocess.STDOUT))
            wait_for_port(port, 120, procs[0])
            res = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "PACSBRIDGE", "+sd", "127.0.0.1", str(port),
                                  str(files)], capture_output=True, text=True, timeout=TIMEOUT_S)
            if res.returncode != 0:
                raise RuntimeError(f"storescu failed: {res.stderr.strip()[-300:]}")
            wait_until("rows", lambda: counts(sessions)[0] >= count, procs)
            for i in range(n_workers):
                logs.append(open(work / f"worker-{n_workers}-{i}.log", "w"))
                procs.append(subprocess.Popen(pacsbridge_cmd("worker"), env=wenv, stdout=logs[-1],
                                              stderr=subprocess.STDOUT))

            def registered() -> bool:
                with sessions() as s:
                    return live_count(s) >= n_workers
            start = wait_until("workers registered", registered, procs, 300)
            done_at_start = counts(sessions)[1]
            end = wait_until("all scored", lambda: counts(sessions)[1] >= count, procs)
            rate = (count - done_at_start) / (end - start)
            print(f"{n_workers} worker(s): {count - done_at_start} images in {end - start:.2f} s after all "
                  f"registered ({done_at_start} scored before): {rate:.2f} images/s", flush=True)
            for p in procs[1:]:
                p.send_signal(signal.SIGTERM)
            for p in procs[1:]:
                p.wait(120)
            print(f"  check: {check_once(sessions)}", flush=True)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            for f in logs:
                f.close()
            engine.dispose()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each worker")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, worker counts alternating; the best is kept")
    ap.add_argument("--model", choices=("random", "shipped"), default="random")
    args = ap.parse_args()
    reason = postgres_unavailable_reason()
    if reason:
        print(f"worker_scaling: {reason}: nothing measured", file=sys.stderr)
        return 1
    if shutil.which("storescu") is None:
        print("worker_scaling: DCMTK storescu not found: nothing measured", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="pb-workers-"))
    try:
        files = work / "in"
        make_inputs(files, args.count)
        model = SHIPPED_MODEL if args.model == "shipped" else export_model(work / "model")
        print(f"{args.count} images (RG1_UNCR copies), model {model.name}, PostgreSQL, "
              f"{os.cpu_count()} CPUs, OMP_NUM_THREADS {args.threads or 'default'}", flush=True)
        rates: dict[int, float] = {}
        for _ in range(args.repeat):  # alternating, so background load hits both counts alike
            for n in (int(x) for x in args.workers.split(",")):
                rates[n] = max(rates.get(n, 0.0), run_one(n, files, args.count, model, args.threads, work))
    except (RuntimeError, TimeoutError) as exc:
        print(f"worker_scaling: {exc} (logs in {work})", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    if args.repeat > 1:
        print("best of", args.repeat, "rounds:", ", ".join(f"{n} worker(s) {r:.2f} images/s" for n, r in rates.items()))
    if 1 in rates and 2 in rates:
        print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
