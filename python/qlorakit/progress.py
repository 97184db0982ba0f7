"""A dependency-free progress bar for long work: tensors, bytes, rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(count: float) -> str:
    """``1.23 GB`` style (decimal units, as disk sizes are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} TB"


class ProgressBar:
    """Redraws one line on a terminal; on a pipe or log, prints a line every ~10%."""

    def __init__(self, stream: TextIO | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.interactive = self.stream.isatty()
        self.next_report = 0.1

    def __call__(self, tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int, name: str) -> None:
        fraction = bytes_done / bytes_total if bytes_total else 1.0
        elapsed = time.perf_counter() - self.start
        rate = bytes_done / elapsed if elapsed > 0 else 0.0
        eta = (bytes_total - bytes_done) / rate if rate > 0 else 0.0
        filled = int(self.width * fraction)
        line = (
            f"[{'#' * filled}{'-' * (self.width - filled)}] {tensors_done}/{tensors_total} tensors  "
            f"{human_bytes(bytes_done)}/{human_bytes(bytes_total)}  {human_bytes(rate)}/s  ETA {eta:4.1f}s"
        )
        if self.interactive:
            self.stream.write(f"\r{line}  {name[-40:]:<40}")
            if tensors_done == tensors_total:
                self.stream.write("\n")
            self.stream.flush()
        elif fraction >= self.next_report or tensors_done == tensors_total:
            self.stream.write(line + "\n")
            self.stream.flush()
            while self.next_report <= fraction:
                self.next_report += 0.1
