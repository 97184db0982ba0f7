"""CPU benchmark: forward + backward of qlorakit's Linear4bit vs bitsandbytes' Linear4bit and a dense bf16 layer.

Run from the repository root with the dev venv active::

    source /work/devenv/bin/activate
    python tools/bench_linear.py                        # 4096x4096 layer, batch x seq = 1x1 and 8x512, best of 5
    python tools/bench_linear.py --threads 2            # pin qlorakit (rayon) and torch/OpenMP to 2 threads
    python tools/bench_linear.py --shapes 1x1 4x128 8x512 --repeats 7
    python tools/bench_linear.py --layer 11008x4096     # out_features x in_features

What is timed, per input shape ``batch x seq`` (bf16 compute, CPU, no bias):

* ``fwd+bwd``: ``out = layer(x)`` with ``x.requires_grad``, then ``out.backward(g)`` with a
  fixed random ``g``; the layer's weight is frozen, so only the input gradient is computed.
* ``fwd (grad on)``: the same forward alone (autograd graph built, then dropped).
* ``fwd (no_grad)``: an inference forward under ``torch.no_grad()`` with an input that
  does not require grad.
* ``dequantize W``: the weight -> bf16 alone, for reading the rows above (a 4-bit
  ``fwd+bwd`` is two dequantizations and two matmuls).

Implementations:

* ``qlorakit``: ``qlorakit.nn.Linear4bit.from_linear`` (NF4, blocksize 64, double quant). A
  single-row input (the 1x1 shape) takes its fused dequantize-and-multiply kernel in the
  forward (``matvec_weight``: the 4-bit codes read once, no bf16 weight written); its
  backward, and every shape of several rows, dequantize and multiply.
* ``bnb train()``: ``bitsandbytes.nn.Linear4bit`` holding the same packed data (built with
  ``Params4bit.from_prequantized`` from ``packed_weight().state_dict()``), in train mode:
  its dequantize + matmul path (``MatMul4Bit``; without grad, the ``gemm_4bit`` op).
* ``bnb eval()``: a second such module in eval mode. With an input that needs no grad (and
  an AVX512-BF16 CPU) bitsandbytes repacks the weight once and runs its fused 4-bit
  kernel; with an input that requires grad it takes exactly the train() path, so only its
  ``fwd (no_grad)`` row is timed.
* ``dense``: ``nn.Linear`` in bf16 with the original (unquantized) weight, frozen.

Times are best-of-N wall clock after one untimed warm-up call each; candidates are run
round-robin, all passes of a shape together (with a short pause before each call), so a
burst of load from another process hits every row alike. ``N`` grows for fast shapes (up
to 10x ``--repeats``, about 4 s of timed calls per shape). Ratios: ``t_bnb/t`` > 1 means faster than bitsandbytes
(train() row of the same pass); ``t/t_dense`` is the cost relative to the dense layer.
The load average is printed before and after each shape: on a busy machine read the
numbers as noisy.

``--threads`` must act before the libraries start their thread pools, so the environment
(RAYON_NUM_THREADS, OMP_NUM_THREADS) is set before torch, qlorakit or bitsandbytes are
imported; those imports therefore live in functions.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench_common import TimedCall, configure_threads, parse_dims, print_machine, time_interleaved

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_SHAPES = ((1, 1), (8, 512))
DEFAULT_LAYER = (4096, 4096)  # out_features x in_features
BLOCKSIZE = 64
PAUSE_S = 0.02  # idle gap before each timed call: lets the previous library's spinning pool threads go to sleep
TIME_BUDGET_S = 4.0  # per shape: fast shapes get more rounds, up to MAX_REPEAT_FACTOR x --repeats
MAX_REPEAT_FACTOR = 10

PASS_FWD_BWD = "fwd+bwd"
PASS_FWD_GRAD = "fwd (grad on)"
PASS_FWD_NOGRAD = "fwd (no_grad)"
PASS_DEQUANT = "dequantize W"
PASSES = (PASS_FWD_BWD, PASS_FWD_GRAD, PASS_FWD_NOGRAD, PASS_DEQUANT)

IMPL_QK = "qlorakit Linear4bit"
IMPL_BNB = "bnb Linear4bit train()"
IMPL_BNB_EVAL = "bnb Linear4bit eval() fused kernel"
IMPL_DENSE = "dense nn.Linear bf16"


# --------------------------------------------------------------------------- arguments / threads


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="threads for qlorakit (rayon) and torch/OpenMP")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="input shapes batch x seq, e.g. 1x1 8x512 (space- or comma-separated); default: 1x1 8x512",
    )
    parser.add_argument(
        "--layer", default="x".join(map(str, DEFAULT_LAYER)), help="out_features x in_features (default 4096x4096)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="best-of-N, at least (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for weights and inputs (default 0)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        items = args.shapes or ["x".join(map(str, s)) for s in DEFAULT_SHAPES]
        args.shapes = [parse_dims(s, "shape", count=2) for item in items for s in item.split(",") if s]
        args.layer = parse_dims(args.layer, "layer", count=2)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.layer[1] % BLOCKSIZE:
        parser.error(f"in_features must be a multiple of the blocksize {BLOCKSIZE}")
    return args


# --------------------------------------------------------------------------- environment report


def load_line(when: str) -> str:
    one, five, _ = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    busy = "  <- busy: other processes compete for the cores, timings are noisy" if one > 0.5 else ""
    return f"load average {when}: {one:.2f} (1 min), {five:.2f} (5 min) on {cores} cores{busy}"


def print_environment(threads: int | None) -> None:
    import bitsandbytes
    from bitsandbytes.functional import has_avx512bf16

    print_machine(
        threads,
        f"bitsandbytes {bitsandbytes.__version__}; AVX512-BF16 (bnb fused CPU kernel): {has_avx512bf16()}",
    )
    print(load_line("before the run"))


# --------------------------------------------------------------------------- timing


@dataclass
class Candidate(TimedCall):
    """A timed callable: one implementation in one pass."""

    impl: str
    fn: Callable[[], Any]
    best: float = math.inf
    reps: int = 0
    last: Any = None


def time_rounds(candidates: Sequence[Candidate], repeats: int) -> None:
    """``time_interleaved``: ``repeats`` rounds, raised for fast shapes (about TIME_BUDGET_S of timed calls,
    at most MAX_REPEAT_FACTOR x ``repeats``)."""
    time_interleaved(candidates, repeats, PAUSE_S, TIME_BUDGET_S, MAX_REPEAT_FACTOR)


# --------------------------------------------------------------------------- layers


@dataclass
class Layers:
    qk: nn.Module
    bnb: nn.Module
    bnb_eval: nn.Module
    dense: nn.Module
    bnb_eval_note: str = ""


def bnb_from_packed(layer: nn.Module) -> nn.Module:
    """A bitsandbytes Linear4bit holding the same packed data as qlorakit's ``layer`` (cloned)."""
    import bitsandbytes as bnb
    import torch

    tensors = {k: v.clone() for k, v in layer.packed_weight().state_dict("weight").items()}
    weight = bnb.nn.Params4bit.from_prequantized(
        tensors["weight"],
        {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"},
        requires_grad=False,
        device="cpu",
    )
    module = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        quant_type=layer.quant_type,
        device="cpu",
    )
    module.weight = weight
    return module


def build_layers(out_features: int, in_features: int, seed: int) -> Layers:
    import torch
    from torch import nn

    from qlorakit.nn import Linear4bit

    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    dense.weight.requires_grad_(False)
    qk = Linear4bit.from_linear(
        dense, quant_type="nf4", blocksize=BLOCKSIZE, double_quant=True, compute_dtype=torch.bfloat16
    )
    bnb = bnb_from_packed(qk).train()
    bnb_eval = bnb_from_packed(qk).eval()
    return Layers(qk, bnb, bnb_eval, dense)


# --------------------------------------------------------------------------- benchmarks


@dataclass
class ShapeReport:
    batch: int
    seq: int
    layer: tuple[int, int]
    groups: dict[str, list[Candidate]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x.grad = None
    layer(x).backward(grad)
    return x.grad


def fwd_no_grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return layer(x)


def bnb_dequantize(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state)


def bench_shape(batch: int, seq: int, layers: Layers, args: argparse.Namespace) -> ShapeReport:
    import torch

    from qlorakit.nn.dispatch import dequantize_weight

    out_features, in_features = args.layer
    report = ShapeReport(batch, seq, (out_features, in_features), load_before=load_line("before"))
    torch.manual_seed(args.seed + 1)
    x_plain = torch.randn(batch, seq, in_features, dtype=torch.float32).to(torch.bfloat16)
    x = x_plain.clone().requires_grad_(True)
    grad = torch.randn(batch, seq, out_features, dtype=torch.float32).to(torch.bfloat16)
    training = [(IMPL_QK, layers.qk), (IMPL_BNB, layers.bnb), (IMPL_DENSE, layers.dense)]

    report.groups[PASS_FWD_BWD] = [Candidate(name, lambda m=m: fwd_bwd(m, x, grad)) for name, m in training]
    report.groups[PASS_FWD_GRAD] = [Candidate(name, lambda m=m: m(x)) for name, m in training]
    report.groups[PASS_FWD_NOGRAD] = [
        Candidate(name, lambda m=m: fwd_no_grad(m, x_plain))
        for name, m in [*training, (IMPL_BNB_EVAL, layers.bnb_eval)]
    ]
    packed = layers.qk.packed_weight()
    report.groups[PASS_DEQUANT] = [
        Candidate(IMPL_QK, lambda: dequantize_weight(packed, torch.bfloat16)),
        Candidate(IMPL_BNB, lambda: bnb_dequantize(layers.bnb)),
    ]
    # All passes in one round-robin: a burst of outside load hits every row alike.
    time_rounds([cand for pass_name in PASSES for cand in report.groups[pass_name]], args.repeats)
    report.load_after = load_line("after ")
    report.checks = agreement_checks(report, layers)
    return report


def agreement_checks(report: ShapeReport, layers: Layers) -> list[str]:
    """Informational: do the implementations compute the same thing on this input?"""
    import torch

    def last(pass_name: str, impl: str) -> torch.Tensor:
        return next(c.last for c in report.groups[pass_name] if c.impl == impl).float()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    from qlorakit.nn.dispatch import matvec_weight

    qk_g, bnb_g, dense_g = (last(PASS_FWD_BWD, i) for i in (IMPL_QK, IMPL_BNB, IMPL_DENSE))
    qk_y, bnb_y, dense_y = (last(PASS_FWD_NOGRAD, i) for i in (IMPL_QK, IMPL_BNB, IMPL_DENSE))
    eval_y = last(PASS_FWD_NOGRAD, IMPL_BNB_EVAL)
    repacked = bool(getattr(layers.bnb_eval.weight.quant_state, "packing_format_for_cpu", False))
    eval_path = "fused packed CPU kernel (weight repacked)" if repacked else "not repacked: same path as train()"
    probe = torch.zeros(report.batch, report.seq, report.layer[1], dtype=torch.bfloat16)
    fused = matvec_weight(layers.qk.packed_weight(), probe) is not None
    # The fused kernel sums in another float32 order than bitsandbytes' matmul: its outputs may differ from
    # train()'s in the last bf16 place (a bit-identical result is then a coincidence of the rounding).
    qk_path = "fused dequantize-and-multiply kernel" if fused else "dequantize + matmul"
    return [
        f"qlorakit forward ran the {qk_path}; vs bnb train(): outputs bit-identical {torch.equal(qk_y, bnb_y)} "
        f"(rel. L2 diff {rel(qk_y, bnb_y):.2e}), input grads bit-identical {torch.equal(qk_g, bnb_g)}",
        f"bnb eval() forward ran the {eval_path}; its output vs qlorakit: rel. L2 diff {rel(eval_y, qk_y):.2e}",
        f"4-bit vs dense (quantization error, informational): output rel. L2 {rel(qk_y, dense_y):.2e}, "
        f"input grad rel. L2 {rel(qk_g, dense_g):.2e}",
    ]


# --------------------------------------------------------------------------- output


def ratio(num: Candidate | None, den: Candidate | None) -> str:
    if num is None or den is None or not math.isfinite(num.best) or not math.isfinite(den.best):
        return f"{'-':>9}"
    return f"{num.best / den.best:8.2f}x"


def print_table(report: ShapeReport) -> None:
    out_features, in_features = report.layer
    tokens = report.batch * report.seq
    print(
        f"\n== batch x seq = {report.batch}x{report.seq} ({tokens} tokens), layer {out_features}x{in_features} "
        f"(out x in), bf16 compute, NF4 bs{BLOCKSIZE} + double quant, no bias =="
    )
    print(f"   {report.load_before}\n   {report.load_after}")
    print(f"{'pass':<15} {'implementation':<36} {'N':>3} {'best ms':>10} {'t_bnb/t':>9} {'t/t_dense':>9}")
    for pass_name in PASSES:
        group = report.groups[pass_name]
        anchor = next((c for c in group if c.impl == IMPL_BNB), None)
        dense = next((c for c in group if c.impl == IMPL_DENSE), None)
        for cand in group:
            print(
                f"{pass_name:<15} {cand.impl:<36} {cand.reps:>3} {1e3 * cand.best:>10.3f} "
                f"{ratio(anchor, cand)} {ratio(cand, dense)}"
            )
    print(
        f"{'':<15} (bnb eval() fwd+bwd / fwd (grad on): not timed - with an input that requires grad, "
        "eval() takes the train() path)"
    )
    for line in report.checks:
        print(f"  check: {line}")


def print_summary(reports: list[ShapeReport]) -> None:
    """fwd+bwd and fwd (grad on) of each implementation, one column per shape."""
    names = [f"{r.batch}x{r.seq}" for r in reports]
    print("\n== summary: best ms (t_bnb/t, t/t_dense) ==")
    header = "".join(f" {name:>30}" for name in names)
    print(f"{'pass':<15} {'implementation':<24}{header}")
    for pass_name in (PASS_FWD_BWD, PASS_FWD_GRAD, PASS_FWD_NOGRAD):
        for impl in (IMPL_QK, IMPL_BNB, IMPL_DENSE):
            cells = []
            for r in reports:
                group = r.groups[pass_name]
                cand = next(c for c in group if c.impl == impl)
                anchor = next(c for c in group if c.impl == IMPL_BNB)
                dense = next(c for c in group if c.impl == IMPL_DENSE)
                cell = f"{1e3 * cand.best:.3f} ({anchor.best / cand.best:.2f}x, {cand.best / dense.best:.2f}x)"
                cells.append(f" {cell:>30}")
            print(f"{pass_name:<15} {impl.removesuffix(' train()'):<24}{''.join(cells)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before the first import of qlorakit / torch / bitsandbytes
    print_environment(args.threads)
    out_features, in_features = args.layer
    print(f"settings: seed {args.seed}; best of >= {args.repeats} after one warm-up call each")
    layers = build_layers(out_features, in_features, args.seed)
    reports = [bench_shape(batch, seq, layers, args) for batch, seq in args.shapes]
    for report in reports:
        print_table(report)
    print_summary(reports)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
