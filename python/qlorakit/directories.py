"""Directories written whole: staged beside their destination and renamed into place, so that a failure
leaves the destination as it was (what ``qlorakit quantize``, ``save_merged`` and the distributed saves do)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staging_beside(destination: Path, tag: str) -> Iterator[Path]:
    """A fresh hidden directory beside ``destination`` (same file system, so the final rename is atomic),
    deleted on exit unless it was renamed into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{tag}-", dir=destination.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(staging: Path, destination: Path) -> None:
    """Renames the finished staging directory onto ``destination`` (moving an existing
    one aside first, and deleting it only once the new one is in place)."""
    previous = None
    if destination.exists():
        previous = destination.parent / f".{destination.name}.qlorakit-previous-{os.getpid()}"
        os.rename(destination, previous)
    os.rename(staging, destination)
    descriptor = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if previous is not None:
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
