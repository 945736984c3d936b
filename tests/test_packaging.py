"""An installed wheel is a complete pacsbridge: it migrates a new database and answers ``status``.

The wheel is built from the checkout's files (tracked and new, as ``git ls-files`` lists them) copied
outside the repository, installed with ``pip --target`` into a folder of its own, and run from a
directory outside the repository with that folder first on ``sys.path`` (the dependencies come from
the test's virtual environment), so nothing of the checkout itself can be picked up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def test_wheel_installs_migrates_and_reports_status(tmp_path: Path) -> None:
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], REPO).stdout.split("\0")
    src = tmp_path / "src"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
         tmp_path)
    (wheel,) = dist.glob("pacsbridge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    migrations = sorted(n for n in names if n.startswith("pacsbridge/migrations/versions/") and n.endswith(".py"))
    assert "pacsbridge/migrations/env.py" in names and migrations, sorted(names)[:50]
    assert len(migrations) == len(list((REPO / "pacsbridge/migrations/versions").glob("*.py")))

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
         tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(PYTHONPATH=str(site), PACSBRIDGE_DATA_DIR=str(tmp_path / "data"))
    where = _run([sys.executable, "-c", "import pacsbridge; print(pacsbridge.__file__)"], elsewhere, env).stdout.strip()
    assert Path(where).is_relative_to(site), f"pacsbridge imported from {where}, not from the installed wheel"

    _run([sys.executable, "-m", "pacsbridge", "db", "upgrade"], elsewhere, env)
    status = json.loads(_run([sys.executable, "-m", "pacsbridge", "status", "--json"], elsewhere, env).stdout)
    assert status["schema"]["current"] == status["schema"]["head"] is not None, status
    assert status["instances"]["received"] == 0
