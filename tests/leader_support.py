"""A scheduler-leader candidate in a process of its own, for the failover test and bench/leader_failover.py.

    python tests/leader_support.py DATABASE_URL RETRY_S

prints ``STARTED <node>``, then ``STANDBY`` or ``LEADER <unix time>``: the time its first gated "job"
(run every 0.05 s while :meth:`Leadership.is_leader` says yes, as the scheduler's jobs do) ran.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def candidate(url: str, retry_s: float) -> None:
    from pacsbridge.store.db import make_engine, make_sessionmaker
    from pacsbridge.store.leader import Leadership

    engine = make_engine(url)
    lead = Leadership(engine, make_sessionmaker(engine), retry_s=retry_s)
    lead.start()
    print(f"STARTED {lead.node}", flush=True)
    leading = None
    while True:
        now = lead.is_leader()
        if now != leading:
            print(f"LEADER {time.time():.6f}" if now else "STANDBY", flush=True)
            leading = now
        time.sleep(0.05)


class Candidate:
    """The candidate as a subprocess, its stdout lines in a queue."""

    def __init__(self, url: str, retry_s: float) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), url, str(retry_s)],
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.node = self.expect("STARTED", 60).split()[1]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float) -> str:
        """The next line starting with ``prefix`` (other lines are skipped) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix} line within {timeout} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    candidate(sys.argv[1], float(sys.argv[2]))
