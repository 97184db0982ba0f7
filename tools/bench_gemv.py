"""CPU benchmark of the decode-time paths: qlorakit's fused small-batch kernel vs a plain copy of the packed bytes,
dequantize + matmul and bitsandbytes' eval() fused kernel; and fresh-output dequantization vs bitsandbytes.

Run from the repository root::

    python tools/bench_gemv.py                               # layers 1024x1024, 2048x2048, 4096x4096; batch 1 2 4 8
    python tools/bench_gemv.py --layers 4096x11008 --batches 1 4 --threads 2

Per layer (out_features x in_features, NF4, blocksize 64, double quant, bf16 compute, no bias), side by side in one
interleaved run (best of N after a warm-up, see ``bench_common.time_interleaved``):

* ``copy``: ``dst.copy_(src)`` of a uint8 tensor as large as the packed weight (codes + nested scale codes): the
  bandwidth a plain copy reaches (GB/s = bytes copied / time).
* ``batch-1 kernel``: ``qlorakit.nn.dispatch.matvec_weight`` on one row (the fused kernel plus its Python
  dispatch); its GB/s counts the packed bytes it reads, and ``of copy`` compares that with the copy's (target >= 80%).
* ``layer fwd``: ``Linear4bit`` forward under ``torch.no_grad()`` (adds the module and op-registry overhead).
* ``batch B``: the fused kernel on B rows vs ``dequantize + F.linear`` (reused scratch buffer) and vs
  ``bitsandbytes.nn.Linear4bit`` in eval() (on an AVX512-BF16 CPU it repacks the weight once, on the first
  forward, and runs its fused kernel for any number of rows; the warm-up call takes the repack).
* ``fresh dequantize``: ``qlorakit.dequantize(packed, bf16)`` into a new tensor vs
  ``bitsandbytes.functional.dequantize_4bit`` (also a new tensor).
* ``decode chain``: the batch-1 kernel over a chain of distinct layers of the shape (in memory of their own; 8
  distinct weights, the rest copies of them), more bytes than the last-level cache (:func:`chain_bytes`: twice the
  largest cache this CPU reports, at least ``CHAIN_BYTES``), called back to back as a decode step calls a model's
  layers (the threads hot, every layer's bytes from memory), per layer, vs copying each layer's bytes the same way.
  The single calls above each follow an idle pause, so they also pay for waking the threads; the chain does not.

Ratios are ``t_other / t_qlorakit``: above 1 means qlorakit is faster. ``--threads`` sets RAYON_NUM_THREADS and
OMP_NUM_THREADS before the libraries start their pools (hence the imports inside functions).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import TimedCall, configure_threads, parse_dims, print_machine, time_interleaved

DEFAULT_LAYERS = ((1024, 1024), (2048, 2048), (4096, 4096))
DEFAULT_BATCHES = (1, 2, 4, 8)
BLOCKSIZE = 64
PAUSE_S = 0.005
TIME_BUDGET_S = 3.0
MAX_REPEAT_FACTOR = 40
COPY_TARGET = 0.8
#: Packed bytes of a decode chain, at least: well above a last-level cache, so no layer's bytes are cached when it
#: runs (:func:`chain_bytes` raises it on a CPU with a larger one).
CHAIN_BYTES = 96 * 2**20
#: Distinct quantized weights of a chain; the rest are copies of them (their own memory, the same values).
CHAIN_DISTINCT = 8


@dataclass
class Candidate(TimedCall):
    name: str
    fn: Callable[[], Any]
    best: float = math.inf
    reps: int = 0
    last: Any = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=None, help="out x in, e.g. 4096x4096 (default: three sizes)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES), help="input rows (1..8)")
    parser.add_argument("--threads", type=int, default=None, help="threads for qlorakit (rayon) and torch/OpenMP")
    parser.add_argument("--repeats", type=int, default=10, help="best-of-N, at least (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        items = args.layers or ["x".join(map(str, s)) for s in DEFAULT_LAYERS]
        args.layers = [parse_dims(s, "layer", count=2) for s in items]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if any(layer[1] % BLOCKSIZE for layer in args.layers):
        parser.error(f"in_features must be a multiple of the blocksize {BLOCKSIZE}")
    if any(not 1 <= b <= 8 for b in args.batches):
        parser.error("--batches must lie in 1..8")
    return args


def packed_bytes(packed: Any) -> int:
    """Bytes the fused kernel reads: codes, per-block scale codes (or float32 absmax) and nested scales."""
    total = packed.codes.numel() * packed.codes.element_size() + packed.absmax.numel() * packed.absmax.element_size()
    if packed.nested_absmax is not None:
        total += packed.nested_absmax.numel() * packed.nested_absmax.element_size()
    return total


def bench_layer(out_features: int, in_features: int, args: argparse.Namespace) -> None:
    import bitsandbytes.functional as bnb_f
    import torch
    from bench_linear import bnb_from_packed
    from torch import nn

    import qlorakit
    from qlorakit import _core
    from qlorakit.nn import Linear4bit
    from qlorakit.nn.dispatch import dequantize_weight, matvec_weight

    torch.manual_seed(args.seed)
    dense = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(
        dense, quant_type="nf4", blocksize=BLOCKSIZE, double_quant=True, compute_dtype=torch.bfloat16
    )
    packed = layer.packed_weight()
    bnb_train = bnb_from_packed(layer).train()
    bnb_eval = bnb_from_packed(layer).eval()
    nbytes = packed_bytes(packed)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    xs = {b: torch.randn(b, in_features).to(torch.bfloat16) for b in args.batches}

    def dequant_matmul(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, dequantize_weight(packed, torch.bfloat16, reuse=True))

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return fn()

        return call

    copy = Candidate("copy", lambda: dst.copy_(src))
    routed = matvec_weight(packed, xs[min(xs)]) is not None
    if not routed:  # the portable kernel only: few-row inputs take dequantize + matmul, timed below
        print(f"\n(the fused kernel is not routed on this CPU: {_core.cpu_kernel()} only; its rows are skipped)")
    kernels = {
        b: Candidate(f"qlorakit fused x{b}", lambda x=x: matvec_weight(packed, x)) for b, x in xs.items() if routed
    }
    layer_fwd = Candidate("qlorakit layer fwd x1", no_grad(lambda: layer(xs[min(xs)])))
    dense_path = {b: Candidate(f"dequant+matmul x{b}", lambda x=x: dequant_matmul(x)) for b, x in xs.items()}
    bnb_fused = {b: Candidate(f"bnb eval() x{b}", no_grad(lambda x=x: bnb_eval(x))) for b, x in xs.items()}
    fresh = Candidate("qlorakit dequantize (fresh)", lambda: qlorakit.dequantize(packed, torch.bfloat16))
    weight = bnb_train.weight
    bnb_fresh = Candidate("bnb dequantize_4bit (fresh)", lambda: bnb_f.dequantize_4bit(weight.data, weight.quant_state))
    candidates = [copy, layer_fwd, fresh, bnb_fresh, *kernels.values(), *dense_path.values(), *bnb_fused.values()]
    time_interleaved(candidates, args.repeats, PAUSE_S, TIME_BUDGET_S, MAX_REPEAT_FACTOR)

    repacked = bool(getattr(bnb_eval.weight.quant_state, "packing_format_for_cpu", False))
    print(
        f"\n== layer {out_features}x{in_features} (out x in), NF4 bs{BLOCKSIZE} + double quant, bf16, "
        f"packed {nbytes / 2**20:.2f} MiB; qlorakit kernel {_core.cpu_kernel()}; bnb eval() "
        f"{'repacked, fused kernel' if repacked else 'NOT repacked (no AVX512-BF16): train() path'} =="
    )

    def gbps(cand: Candidate) -> float:
        return nbytes / cand.best / 1e9

    print(f"  copy of {nbytes} bytes: {1e3 * copy.best:.4f} ms, {gbps(copy):.1f} GB/s (N={copy.reps})")
    if 1 in kernels:
        k1 = kernels[1]
        share = gbps(k1) / gbps(copy)
        verdict = "ok" if share >= COPY_TARGET else f"below the {COPY_TARGET:.0%} target"
        print(
            f"  batch-1 kernel: {1e3 * k1.best:.4f} ms, {gbps(k1):.1f} GB/s of packed bytes = {share:.0%} of copy "
            f"({verdict}); layer fwd {1e3 * layer_fwd.best:.4f} ms"
        )
    print(
        f"  {'rows':>4} {'fused ms':>10} {'deq+mm ms':>10} {'bnb eval ms':>12} {'deq+mm/fused':>13} {'bnb/fused':>10}"
    )
    for b in kernels:
        k, d, e = kernels[b], dense_path[b], bnb_fused[b]
        print(
            f"  {b:>4} {1e3 * k.best:>10.4f} {1e3 * d.best:>10.4f} {1e3 * e.best:>12.4f} "
            f"{d.best / k.best:>12.2f}x {e.best / k.best:>9.2f}x"
        )
    print(
        f"  fresh dequantize: qlorakit {1e3 * fresh.best:.3f} ms, bnb {1e3 * bnb_fresh.best:.3f} ms, "
        f"bnb/qlorakit {bnb_fresh.best / fresh.best:.2f}x"
    )
    for b in kernels:
        got, want = kernels[b].last.float(), dense_path[b].last.float()
        rel = float((got - want).norm() / want.norm().clamp_min(1e-30))
        bnb_rel = float((bnb_fused[b].last.float() - want).norm() / want.norm().clamp_min(1e-30))
        print(f"  check x{b}: fused vs dequant+matmul rel. L2 {rel:.2e}; bnb eval() vs dequant+matmul {bnb_rel:.2e}")


def clone_packed(packed: Any) -> Any:
    """A copy of a packed weight in memory of its own."""
    from qlorakit.packed import PackedWeight

    nested = packed.nested_absmax.clone() if packed.nested_absmax is not None else None
    return PackedWeight(packed.codes.clone(), packed.absmax.clone(), nested, packed.layout)


def last_level_cache_bytes() -> int:
    """The largest cache of CPU 0 that Linux reports (``/sys/devices/system/cpu/cpu0/cache``), 0 where it reports
    none."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text or 0))
    return max(sizes)


def chain_bytes() -> int:
    """Packed bytes of a decode chain: twice the last-level cache, at least ``CHAIN_BYTES``."""
    return max(CHAIN_BYTES, 2 * last_level_cache_bytes())


def bench_chain(out_features: int, in_features: int, args: argparse.Namespace) -> None:
    """The ``decode chain`` rows (see the module docs)."""
    import torch

    import qlorakit
    from qlorakit.nn.dispatch import matvec_weight

    generator = torch.Generator().manual_seed(args.seed)
    first = qlorakit.quantize(torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16) * 0.02)
    nbytes = packed_bytes(first)
    count = max(2, math.ceil(chain_bytes() / nbytes))
    distinct = [first] + [
        qlorakit.quantize(torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16) * 0.02)
        for _ in range(min(count, CHAIN_DISTINCT) - 1)
    ]
    layers = [clone_packed(distinct[i % len(distinct)]) if i >= len(distinct) else distinct[i] for i in range(count)]
    sources = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=generator) for _ in range(count)]
    targets = [torch.empty_like(src) for src in sources]
    x = torch.randn(1, in_features, generator=generator).to(torch.bfloat16)

    def run_chain() -> None:
        for packed in layers:
            matvec_weight(packed, x)

    def copy_chain() -> None:
        for src, dst in zip(sources, targets, strict=True):
            dst.copy_(src)

    kernel, copy = Candidate("decode chain", run_chain), Candidate("copy chain", copy_chain)
    time_interleaved([copy, kernel], args.repeats, PAUSE_S, TIME_BUDGET_S, MAX_REPEAT_FACTOR)
    share = copy.best / kernel.best
    verdict = "ok" if share >= COPY_TARGET else f"below the {COPY_TARGET:.0%} target"
    print(
        f"  {out_features}x{in_features}: {count} layers, {1e3 * kernel.best / count:.4f} ms per layer "
        f"({nbytes * count / kernel.best / 1e9:.1f} GB/s of packed bytes), copy {1e3 * copy.best / count:.4f} ms "
        f"per layer ({nbytes * count / copy.best / 1e9:.1f} GB/s): {share:.0%} of copy ({verdict})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)
    import bitsandbytes
    from bitsandbytes.functional import has_avx512bf16

    print_machine(args.threads, f"bitsandbytes {bitsandbytes.__version__}; AVX512-BF16: {has_avx512bf16()}")
    one, five, _ = os.getloadavg()
    print(f"load average before: {one:.2f} (1 min), {five:.2f} (5 min)")
    for out_features, in_features in args.layers:
        bench_layer(out_features, in_features, args)
    print("\n== decode chains: batch-1 kernel per layer over distinct layers called back to back, vs copying them ==")
    from qlorakit import _core

    if not _core.GEMV_SIMD and not os.environ.get(_core.CPU_KERNEL_ENV, "").strip():
        print(f"  skipped: the fused kernel is not routed on this CPU ({_core.cpu_kernel()} only)")
    else:
        for out_features, in_features in args.layers:
            bench_chain(out_features, in_features, args)
    one, five, _ = os.getloadavg()
    print(f"\nload average after: {one:.2f} (1 min), {five:.2f} (5 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
