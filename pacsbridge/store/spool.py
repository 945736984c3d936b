"""Spool files: received DICOM files, written durably under names built from hashes.

A file is written to ``<spool>/tmp/<node>/`` (each node its own folder, so several nodes can share
one spool), atomically renamed to ``<spool>/ab/cd/<sha256>.dcm``, then
the file and its folder are fsync'd; the caller commits the database row only after that.  (fsync
after the rename lets one journal commit cover both data and rename on ext4/xfs.)  Paths never
contain a raw UID or tag value.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

#: ``ab/cd/<64 hex digits>.dcm``: the only names the spool creates outside ``tmp/``.
SPOOL_NAME_RE = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{2})/(\1\2[0-9a-f]{60})\.dcm$")
_HEX2_RE = re.compile(r"^[0-9a-f]{2}$")
_FILE_RE = re.compile(r"^[0-9a-f]{64}\.dcm$")
#: Loose files directly in ``tmp/`` (a layout without node folders) older than this are leftovers.
LOOSE_TMP_MIN_AGE_S = 600.0


class OutsideSpool(ValueError):
    """A stored path that is empty or leads out of the spool (``..``, an absolute path, a symlink)."""


def contained_path(spool_dir: Path, rel: str) -> Path:
    """``spool_dir/rel`` resolved, or :class:`OutsideSpool`: the one check every reader of a stored
    path makes before opening or deleting it (the database row may have been tampered with)."""
    root = Path(spool_dir).resolve()
    path = (root / rel).resolve() if rel else root
    if not path.is_relative_to(root) or path == root:
        raise OutsideSpool(f"spool path {rel!r} is empty or outside the spool")
    return path


def spool_relpath(sop_instance_uid: str) -> str:
    """Relative spool path for an instance: ``ab/cd/<sha256 of the UID>.dcm``."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"


class Spool:
    """Durable file storage under ``root``; ``fsync=False`` trades durability for speed (tests only);
    ``node`` (a node id, see store/node.py): temporary files go to ``tmp/<node>/``."""

    def __init__(self, root: Path, fsync: bool = True, node: str | None = None) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp" / node if node else self.root / "tmp"
        self.fsync = fsync

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def prepare(self) -> int:
        """Create the folders and remove partial files left by a crash (never acknowledged); returns
        how many were removed.  Call it before listening: everything in this node's tmp folder is then
        a leftover (other nodes' folders are left alone; loose files in ``tmp/`` only once old).

        The 256 first-level folders are made up front (one fsync) so that receiving an instance
        creates at most one new folder (and pays one extra folder fsync).
        """
        self._makedirs(self.tmp_dir)
        created = False
        for i in range(256):
            first = self.root / f"{i:02x}"
            if not first.is_dir():
                first.mkdir(exist_ok=True)
                created = True
        if created and self.fsync:
            _fsync_dir(self.root)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink(missing_ok=True)
                removed += 1
        if self.tmp_dir != self.root / "tmp":
            cutoff = time.time() - LOOSE_TMP_MIN_AGE_S
            for loose in (self.root / "tmp").iterdir():
                try:
                    if loose.is_file() and not loose.name.startswith(".") and loose.stat().st_mtime < cutoff:
                        loose.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def iter_stored(self) -> Iterator[tuple[str, os.DirEntry]]:
        """(relpath, directory entry) of every file named like a stored instance (``ab/cd/<hash>.dcm``),
        folder by folder in sorted order; anything else under the spool is left alone."""
        for first in sorted(e.name for e in os.scandir(self.root) if e.is_dir() and _HEX2_RE.match(e.name)):
            try:
                seconds = sorted(e.name for e in os.scandir(self.root / first)
                                 if e.is_dir() and _HEX2_RE.match(e.name))
            except FileNotFoundError:
                continue
            for second in seconds:
                try:
                    entries = sorted(os.scandir(self.root / first / second), key=lambda e: e.name)
                except FileNotFoundError:
                    continue
                for entry in entries:
                    rel = f"{first}/{second}/{entry.name}"
                    if _FILE_RE.match(entry.name) and SPOOL_NAME_RE.match(rel) and entry.is_file():
                        yield rel, entry

    def write_temp(self, *chunks: bytes | memoryview) -> tuple[Path, int]:
        """Write ``chunks`` to a new temporary file (not yet durable: see :meth:`commit`); returns (path, size)."""
        self._makedirs(self.tmp_dir)  # cheap; also recreates the folder after an outage
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        size = 0
        try:
            with open(tmp, "wb", buffering=0) as f:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:  # raw writes may be partial
                        n = f.write(view)
                        size += n
                        view = view[n:]
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, size

    def commit(self, tmp: Path, relpath: str) -> Path:
        """Atomically move ``tmp`` to ``relpath`` (replacing a never-recorded leftover), then fsync the file
        and its folder: when this returns, the file survives power loss."""
        final = self.root / relpath
        self._makedirs(final.parent)
        os.replace(tmp, final)
        if self.fsync:
            fd = os.open(final, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(final.parent)
        return final

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def _makedirs(self, folder: Path) -> None:
        """mkdir -p, fsync'ing each parent of a newly created folder so the folder survives power loss."""
        if folder.is_dir():
            return
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                pass  # another thread made it
            if self.fsync:
                _fsync_dir(d.parent)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a directory")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
