"""Scheduler leader failover: SIGKILL the leading process, time until the standby's first job runs.

Two candidate processes (tests/leader_support.py: a Leadership and a job gated on it every 0.05 s,
as the scheduler's and forwarder's are) on the real PostgreSQL, in a fresh schema; the leader is
killed ``--rounds`` times (a new standby started each round) and the time from the kill to the first
gated job of the new leader is printed, with the stated bound (2 x leader_retry_s + 5 s) beside it.

    .venv/bin/python bench/leader_failover.py --retry 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicom_support import postgres_schema_url, postgres_unavailable_reason  # noqa: E402
from leader_support import Candidate  # noqa: E402
from pacsbridge.store import migrations  # noqa: E402
from pacsbridge.store.db import make_engine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retry", type=float, default=5.0, help="leader_retry_s of the candidates (default 5)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if postgres_unavailable_reason():
        print("PostgreSQL is not reachable: nothing measured", file=sys.stderr)
        return 1
    times = []
    with postgres_schema_url() as url:
        engine = make_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        leader = Candidate(url, args.retry)
        leader.expect("LEADER", 60)
        try:
            for _ in range(args.rounds):
                standby = Candidate(url, args.retry)
                standby.expect("STANDBY", 60)
                killed = time.time()
                leader.kill()
                took = float(standby.expect("LEADER", 4 * args.retry + 30).split()[1]) - killed
                times.append(took)
                print(f"failover: {took:.2f} s (leader_retry_s = {args.retry:g})", flush=True)
                leader = standby
        finally:
            leader.kill()
    bound = 2 * args.retry + 5
    print(f"SIGKILL -> first job of the new leader: median {statistics.median(times):.2f} s, "
          f"max {max(times):.2f} s over {len(times)} rounds; stated bound {bound:g} s "
          f"(ratio max/bound {max(times) / bound:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
