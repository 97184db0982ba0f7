"""Peak resident memory of ``qlorakit.load_packed`` on a packed checkpoint, against its size.

    python tools/make_test_checkpoint.py                          # 1.1B bf16 source (once)
    qlorakit quantize /tmp/qlorakit-tinyllama-1.1b /tmp/tinyllama-nf4
    python tools/bench_load.py /tmp/tinyllama-nf4

Prints the process's peak RSS after importing torch + transformers, after loading, and
after one forward pass (which touches every weight), each also as a multiple of the
packed checkpoint's size on disk. Target (issue): peak below 1.25x the packed size. The
imports alone take about 0.57 GB, so the script also reports what loading added on top.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed", type=Path, help="packed checkpoint directory")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the forward pass")
    args = parser.parse_args()
    size = sum(p.stat().st_size for p in args.packed.glob("*.safetensors"))

    import torch
    import transformers  # noqa: F401  (imported here so its memory is counted apart)

    import qlorakit

    rows = [("imports (torch, transformers, qlorakit)", peak_rss_bytes(), 0.0)]
    start = time.perf_counter()
    model = qlorakit.load_packed(args.packed)
    rows.append(("after load_packed", peak_rss_bytes(), time.perf_counter() - start))
    start = time.perf_counter()
    with torch.no_grad():
        model(torch.arange(args.tokens).unsqueeze(0))
    rows.append((f"after a forward pass ({args.tokens} tokens)", peak_rss_bytes(), time.perf_counter() - start))

    print(f"packed checkpoint: {args.packed} ({size / 1e9:.3f} GB of safetensors)")
    print(f"{'stage':<42} {'peak RSS GB':>12} {'x packed':>9} {'seconds':>8}")
    for stage, rss, seconds in rows:
        print(f"{stage:<42} {rss / 1e9:12.3f} {rss / size:9.2f} {seconds:8.2f}")
    ratio = rows[-1][1] / size
    added = (rows[-1][1] - rows[0][1]) / size
    print(f"target: peak < 1.25x packed size -> {ratio:.2f}x {'PASS' if ratio < 1.25 else 'MISS'} as measured;")
    print(f"        {added:.2f}x counting only what loading and the forward pass added to the imports' memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
