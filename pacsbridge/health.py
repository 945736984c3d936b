"""Checks of an installation, shared by ``/readyz`` (the running daemon) and ``pacsbridge doctor``.

Each check returns a :class:`Check`: a name, ``ok`` (False fails readiness, or makes ``doctor`` exit 1),
``warn`` (passes, but says something an admin should look at) and one line of detail.  Checks never
raise: a check that cannot run is a failed check with the reason.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from pacsbridge.store import migrations
from pacsbridge.store.diskguard import DiskGuard, free_space, human_bytes


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warn: bool = False

    @property
    def word(self) -> str:
        return "FAIL" if not self.ok else ("warn" if self.warn else "ok")

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        if not self.warn:
            d.pop("warn")
        return d


def _why(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"[:300]


def check_database(engine: Engine, show_url: bool = True) -> Check:
    """The database answers ``SELECT 1`` (``show_url=False``: no URL in the detail, for open routes)."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        where = f"{engine.url.render_as_string(hide_password=True)}: " if show_url else ""
        return Check("database", False, f"{where}{_why(exc)}")
    return Check("database", True, f"{engine.dialect.name} answers")


def check_migrations(engine: Engine) -> Check:
    """The schema is at the latest revision this version knows."""
    try:
        current, head = migrations.current_revision(engine), migrations.head_revision()
    except Exception as exc:  # noqa: BLE001
        return Check("migrations", False, f"cannot read the schema revision: {_why(exc)}")
    if current != head:
        return Check("migrations", False, f"schema at revision {current or 'none (empty)'}, not {head}: "
                     "run `pacsbridge db upgrade` (or start `pacsbridge serve`)")
    return Check("migrations", True, f"schema at head ({head})")


def check_spool(spool_dir: Path, min_free_bytes: int, guard: DiskGuard | None = None,
                write_probe: bool = True, show_path: bool = True) -> Check:
    """The spool is a folder we can write (a small file created and removed in ``tmp/``) with free space
    above ``min_free_bytes`` (read from ``guard`` when given, so readiness and the receiver agree).
    ``show_path=False`` names it "spool" instead of its path (for open routes)."""
    root = Path(spool_dir)
    name = str(root) if show_path else "spool"
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        return Check("spool", False, f"{name} {what}")
    if write_probe:
        probe = root / "tmp" / f".probe-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            return Check("spool", False, f"{name}: cannot write in tmp/: {exc.strerror or exc}")
    try:
        free = free_space(root).free_bytes
    except OSError as exc:
        return Check("spool", False, f"{name}: cannot read free space: {exc.strerror or exc}")
    if guard is not None:
        low = guard.check()
        if low is not None:
            return Check("spool", False, f"{name}: {low}")
    elif free < min_free_bytes:
        return Check("spool", False, f"{name}: free space {human_bytes(free)} is below min_free_bytes "
                     f"({human_bytes(min_free_bytes)})")
    return Check("spool", True, f"{name} writable, {human_bytes(free)} free (floor {human_bytes(min_free_bytes)})")
