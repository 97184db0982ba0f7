"""Benchmark: QLoRA under FSDP2 on 1, 2 (, 4) ranks — peak RSS per rank, the 4-bit base each rank holds, step time.

Runs tools/train_fsdp.py (the example script) once per world size, launched with torchrun (gloo on the CPU, NCCL
on GPUs), on the same packed checkpoint and the same global batch: every run does ``--micro-batches`` micro-batches
per step in total, split evenly over its ranks. Prints one row per world size and the step time relative to the
smallest world size::

    python tools/make_test_checkpoint.py && qlorakit quantize /tmp/qlorakit-tinyllama-1.1b /tmp/tinyllama-nf4
    python tools/bench_fsdp.py /tmp/tinyllama-nf4 --ranks 1 2

Peak RSS is the process's high-water mark (``ru_maxrss``): it includes torch and transformers (~0.6-0.8 GB per
process) and the pages of the memory-mapped checkpoint the rank read. On a machine with fewer cores than ranks x
threads the step times say little about speed-up; they are printed with the thread count used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "train_fsdp.py"


def _run(packed: Path, ranks: int, args: argparse.Namespace, out: Path) -> dict:
    per_rank = args.micro_batches // ranks
    command = [str(SCRIPT), str(packed), "--out", str(out), "--accumulate", str(per_rank)]
    command += ["--steps", str(args.steps), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", *command]
    else:
        command = [sys.executable, *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "RAYON_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed", type=Path, help="packed 4-bit checkpoint directory")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes (default 1 2)")
    parser.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per run (default 3; the first is warm-up)"
    )
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step, all ranks (default 4)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    args = parser.parse_args(argv)
    if any(args.micro_batches % ranks for ranks in args.ranks):
        parser.error(f"--micro-batches {args.micro_batches} must divide by every world size {args.ranks}")
    device = "CUDA, NCCL" if _has_cuda() else f"CPU, gloo, {args.threads} thread(s) per rank"
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        device += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    print(
        f"{args.packed}: {args.steps} steps of {args.micro_batches} x {args.micro_batch} x {args.seq_len} tokens "
        f"({device})"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in args.ranks:
            rows[ranks] = _run(args.packed, ranks, args, Path(scratch) / str(ranks))
    base = rows[min(rows)]
    step_1 = _step_seconds(base)
    print("per rank (the largest over the ranks), MiB: peak RSS = ru_maxrss; private / file-backed = RssAnon / RssFile")
    print("at the end of each step (file-backed: the memory-mapped checkpoint's pages, shared and reclaimable)")
    print(f"{'ranks':>5} {'4-bit base':>17} {'peak RSS':>9} {'private':>8} {'file':>6} {'step s':>8} {'vs 1st':>7}")
    for ranks, result in rows.items():
        held = max(r["held_4bit_bytes"] for r in result["ranks"])
        mib = {key: max(r[key] for r in result["ranks"]) / 2**20 for key in result["ranks"][0] if key.endswith("bytes")}
        step = _step_seconds(result)
        print(
            f"{ranks:>5} {held / 2**20:>8.1f} {held / result['total_4bit_bytes']:>5.2f}x "
            f"{mib['peak_rss_bytes']:>10.0f} "
            f"{mib['max_private_bytes']:>8.0f} {mib['max_file_backed_bytes']:>6.0f} {step:>8.2f} {step / step_1:>6.2f}x"
        )
    return 0


def _step_seconds(result: dict) -> float:
    """Median step time after the first (warm-up) step."""
    times = sorted(result["step_seconds"][1:] or result["step_seconds"])
    return times[len(times) // 2]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
