"""Bounded, seeded fuzzing of `pacsbridge serve` over loopback: mutated associations and C-STOREs
(truncations, wrong PDU/PDV lengths, bit flips, huge lengths, spliced/reordered PDUs, garbage, invalid VRs,
deeply nested sequences, odd UIDs, wrong SOP class, truncated data sets).

After the run: the daemon is alive and answers C-ECHO, its resident memory stayed within
RSS_BOUND of idle, every case got an answer (a DIMSE status, A-ASSOCIATE-RJ or A-ABORT) or a log line
naming its connection, every acknowledged data-set case is in the database, and spool files and
instance rows match one to one.

Reproduce a run: PACSBRIDGE_FUZZ_SEED=<seed> PACSBRIDGE_FUZZ_CASES=<n> pytest tests/test_fuzz_dicom.py -s
Cases that once broke something live in tests/fuzz_corpus/ (raw byte streams, replayed first).
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicom_support import make_image, send_datasets
from fuzz_support import Case, make_case
from hostile_support import dimse_statuses, echo_ok, exchange, rss_bytes, running_serve
from waiting import wait_until

SEED = int(os.environ.get("PACSBRIDGE_FUZZ_SEED", "20261126"))
CASES = int(os.environ.get("PACSBRIDGE_FUZZ_CASES", "1000"))
THREADS = 6
RSS_BOUND = 256 * 1024 * 1024
CORPUS = Path(__file__).parent / "fuzz_corpus"


def corpus_cases() -> list[Case]:
    """``*.raw.bin``: sent in one write; other ``*.bin``: first PDU, then (after the answer) the rest."""
    cases = []
    for p in sorted(CORPUS.glob("*.bin")):
        data = p.read_bytes()
        if p.name.endswith(".raw.bin"):
            cases.append(Case(f"corpus:{p.name}", [data], raw=True))
        else:
            first = 6 + int.from_bytes(data[2:6], "big")
            cases.append(Case(f"corpus:{p.name}", [data[:first], data[first:]]))
    return cases


def run_case(port: int, case: Case) -> dict:
    pdus, closed, local_port = exchange(port, case.items if not case.raw else case.items[0], timeout=0.6)
    types = [t for t, _ in pdus]
    statuses = dimse_statuses(pdus)
    return {"case": case, "types": types, "statuses": statuses, "closed": closed, "port": local_port}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, about the odd values the cases are made of
def test_fuzz_serve(tmp_path):
    rng = random.Random(SEED)
    cases = corpus_cases() + [make_case(rng, i) for i in range(CASES)]
    env = dict(PACSBRIDGE_FSYNC="false", PACSBRIDGE_ACSE_TIMEOUT="2", PACSBRIDGE_NETWORK_TIMEOUT="3",
               PACSBRIDGE_DIMSE_TIMEOUT="3", PACSBRIDGE_MAX_ASSOCIATIONS="32", PACSBRIDGE_LOG_LEVEL="INFO")
    with running_serve(tmp_path, **env) as d:
        assert echo_ok(d.port)
        idle = rss_bytes(d.pid)
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                try:
                    peak[0] = max(peak[0], rss_bytes(d.pid))
                except (OSError, RuntimeError):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(lambda c: run_case(d.port, c), cases))
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        assert d.proc.poll() is None, "the daemon died"
        wait_until(lambda: echo_ok(d.port), 10, "a C-ECHO answered after the fuzz", interval=0.2)
        follow_up = make_image()
        assert send_datasets(d.port, [follow_up]) == [0], "a valid C-STORE after the fuzz"
        # On purpose: waits out the server's timeouts above (network 3 s), so that what it logs when it gives
        # up on the connections the cases left half-open (a traceback included) is in the log checked below.
        time.sleep(3.5)
        log = d.log()

    # Every case got an answer, or a log line naming its connection (it was cut off, and said why).
    unanswered = [r for r in results if not (r["statuses"] or {3, 7} & set(r["types"]))]
    unexplained = [r for r in unanswered if f":{r['port']}" not in log and r["case"].items[0][:1] not in (b"",)]
    silent_ok = [r for r in unexplained if _nothing_to_answer(r["case"])]
    unexplained = [r for r in unexplained if r not in silent_ok]
    assert not unexplained, [(r["case"].name, r["types"], r["closed"]) for r in unexplained[:10]]
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:log.index("Traceback") + 3000]
    corpus = [r for r in results if r["case"].name.startswith("corpus:")]
    assert corpus and all(r["statuses"] or {3, 7} & set(r["types"]) for r in corpus), \
        [(r["case"].name, r["types"]) for r in corpus]

    # What was acknowledged is stored, and the spool matches the database.
    db = sqlite3.connect(d.data_dir / "pacsbridge.db")
    rows = {uid: path for uid, path in db.execute("SELECT sop_instance_uid, file_path FROM instances")}
    db.close()
    acked = [r for r in results if r["case"].uid and 0 in r["statuses"]]
    for r in acked:
        assert r["case"].uid in rows, f"{r['case'].name}: acknowledged but not recorded"
    spool = d.data_dir / "spool"
    files = {str(p.relative_to(spool)) for p in spool.rglob("*.dcm") if p.relative_to(spool).parts[0] != "tmp"}
    assert files == set(rows.values()), "spool files and instance rows differ"
    assert not any(p.is_file() for p in (spool / "tmp").rglob("*")), "leftovers in spool/tmp"
    assert follow_up.SOPInstanceUID in rows

    kinds = Counter(r["case"].name for r in results)
    outcomes = Counter("status" if r["statuses"] else "reject" if 3 in r["types"] else "abort" if 7 in r["types"]
                       else "closed" for r in results)
    print(f"\nfuzz seed {SEED}: {len(results)} cases in {elapsed:.1f} s; outcomes {dict(outcomes)}; "
          f"acknowledged data-set cases {len(acked)}; rows {len(rows)}; RSS idle {idle / 2**20:.0f} MiB, "
          f"peak {peak[0] / 2**20:.0f} MiB\nkinds {dict(kinds)}")
    assert len(results) >= 1000
    assert peak[0] - idle < RSS_BOUND


def _nothing_to_answer(case: Case) -> bool:
    """A case whose bytes end before any complete PDU reached the server (e.g. an empty write): the
    server closes without a word, which is right."""
    first = case.items[0]
    return len(first) < 6 and len(case.items) == 1
