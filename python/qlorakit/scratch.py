"""Scratch directories: where ``qlorakit.from_pretrained`` writes the packed checkpoint of a
full-precision directory it quantizes while loading, before loading it and deleting it.

They go in qlorakit's cache directory (``QLORAKIT_CACHE``, see :mod:`qlorakit.selection`), else
(cache off, not writable, or on a RAM-backed file system) the system's temporary directory. A
directory on tmpfs is avoided where another exists: its files would take RAM beside the loaded
model. One left behind by a killed process is removed by the next run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlorakit.checkpoint import _process_exists
from qlorakit.selection import cache_root

#: File systems whose files live in memory.
RAM_FILESYSTEMS = ("tmpfs", "ramfs")
_PREFIX = "qlorakit-load-"


@contextmanager
def scratch_directory() -> Iterator[Path]:
    """A fresh empty directory, deleted (with everything in it) on exit."""
    root = _root()
    _remove_stale(root)
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _root() -> Path:
    cache = cache_root()
    candidates = ([cache / "loading"] if cache is not None else []) + [Path(tempfile.gettempdir())]
    usable = []
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            usable.append(candidate)
    if not usable:
        return Path(tempfile.gettempdir())
    return next((c for c in usable if not on_ram_filesystem(c)), usable[0])


def on_ram_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on tmpfs/ramfs (Linux ``/proc/mounts``; False where that cannot be told)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    resolved = str(path.resolve())
    best, best_type = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type in RAM_FILESYSTEMS


def _remove_stale(root: Path) -> None:
    """Deletes scratch directories whose process no longer exists."""
    for leftover in root.glob(f"{_PREFIX}*"):
        pid = leftover.name.removeprefix(_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
