"""CPU benchmark: qlorakit NF4 quantize/dequantize vs bitsandbytes, torchao and a memory copy.

Run from the repository root with the dev venv active::

    source /work/devenv/bin/activate
    python tools/bench_quantize.py                  # 4096x4096 and 11008x4096 bf16, best of 5 (2 for slow libs)
    python tools/bench_quantize.py --threads 2      # pin qlorakit (rayon) and torch/OpenMP to 2 threads
    python tools/bench_quantize.py --quick          # 1024x1024, best of 2: a smoke test
    python tools/bench_quantize.py --shapes 4096x4096 8192x8192 --repeats 7 --slow-repeats 3
    python tools/bench_quantize.py --gptq --threads 2 --shapes 4096x4096   # + calibrated GPTQ per layer
    python tools/bench_quantize.py --gptq-checkpoint /tmp/qlorakit-tinyllama-1.1b --threads 2 --shapes 4096x4096
        # + GPTQ of a whole checkpoint, measured: calibration (H of every layer) and the calibrated quantize

All implementations see the same deterministic bf16 tensors (``torch.manual_seed``).
Times are best-of-N wall clock. ``GB/s`` counts the bf16 tensor's bytes (2 B/param: the
input of quantize, the output of dequantize) so every row compares with the copy row.
The targets of the project issue are printed at the end with PASS/MISS: information
only, this is a benchmark, not a test.

``--threads`` must act before the libraries start their thread pools, so the arguments are
parsed and the environment (RAYON_NUM_THREADS, OMP_NUM_THREADS) set before numpy, torch,
qlorakit, bitsandbytes or torchao are imported; those imports therefore live in functions.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench_common import TimedCall, configure_threads, parse_dims, print_machine, rayon_threads, time_interleaved

if TYPE_CHECKING:
    import torch

DEFAULT_SHAPES = ((4096, 4096), (11008, 4096))
QUICK_SHAPES = ((1024, 1024),)
BLOCKSIZE = 64
SCALER_BLOCKSIZE = 256

# Targets of the project issue (bf16 input, NF4, blocksize 64, double quant).
TARGET_QUANT_MPARAMS = 1500.0  # >= 1.5 Gparam/s with 2 threads
TARGET_QUANT_VS_BNB = 25.0  # ~25x bitsandbytes CPU quantize_4bit
TARGET_DEQUANT_VS_BNB = 1.5  # >= 1.5x bitsandbytes CPU dequantize_4bit
TARGET_THREADS = 2
PAUSE_S = 0.05  # idle gap before each timed call: lets the previous library's spinning pool threads go to sleep


@dataclass
class Result:
    """One timed row of the table."""

    op: str
    impl: str
    reps: int
    seconds: float
    numel: int

    @property
    def mparams(self) -> float:
        return self.numel / self.seconds / 1e6

    @property
    def gbytes(self) -> float:
        return 2 * self.numel / self.seconds / 1e9


@dataclass
class ShapeReport:
    """All rows for one shape plus the anchors used for the ratios."""

    shape: tuple[int, ...]
    rows: list[tuple[Result, Result | None]]  # (row, its bitsandbytes anchor or None)
    copy: Result
    checks: list[str]

    def find(self, impl_prefix: str, op: str) -> Result:
        return next(r for r, _ in self.rows if r.op == op and r.impl.startswith(impl_prefix))


# --------------------------------------------------------------------------- arguments / threads


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="threads for qlorakit (rayon) and torch/OpenMP")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="shapes such as 4096x4096 (space- or comma-separated); default: 4096x4096 11008x4096",
    )
    parser.add_argument("--repeats", type=int, default=5, help="best-of-N for the fast rows (default 5)")
    parser.add_argument(
        "--slow-repeats", type=int, default=2, help="best-of-N for bitsandbytes/torchao quantize (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run: 1024x1024, best of 2")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the inputs (default 0)")
    parser.add_argument(
        "--gptq",
        action="store_true",
        help="also time GPTQ-NF4 per layer (factor of H included) and estimate a TinyLlama-1.1B checkpoint",
    )
    parser.add_argument(
        "--gptq-checkpoint",
        metavar="DIR",
        default=None,
        help="also run GPTQ on the whole full-precision checkpoint DIR (e.g. tools/make_test_checkpoint.py's): "
        "H collected over --calibration-tokens random token ids, then quantize_checkpoint(hessians=...), each timed",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=2048,
        help="calibration tokens for --gptq-checkpoint, in sequences of 512 (default 2048)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.repeats < 1 or args.slow_repeats < 1:
        parser.error("--repeats and --slow-repeats must be >= 1")
    if args.shapes:
        try:
            args.shapes = [parse_dims(s, "shape", "4096x4096") for item in args.shapes for s in item.split(",") if s]
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    else:
        args.shapes = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    args.slow_repeats = min(args.slow_repeats, args.repeats)
    return args


# --------------------------------------------------------------------------- environment report


def print_environment(threads: int | None) -> None:
    import bitsandbytes
    import numpy as np
    import torchao

    print_machine(
        threads,
        f"numpy {np.__version__}, bitsandbytes {bitsandbytes.__version__}, torchao {torchao.__version__}",
        "; numpy copy is single-threaded",
    )
    load = os.getloadavg()[0]
    busy = "  <- busy machine: other processes compete for the cores, timings will be noisy" if load > 0.5 else ""
    print(f"load average (1 min) before the run: {load:.2f}{busy}")


# --------------------------------------------------------------------------- timing


@dataclass
class Candidate(TimedCall):
    """A timed callable; ``tag`` groups it for the ratio column ('bnb' marks the anchor)."""

    op: str
    impl: str
    fn: Callable[[], Any]
    tag: str
    best: float = math.inf
    reps: int = 0
    last: Any = None

    def result(self, numel: int) -> Result:
        return Result(self.op, self.impl, self.reps, self.best, numel)


def time_repeated(cand: Candidate, repeats: int) -> None:
    """Back-to-back timed calls, no full-size warm-up (for the slow quantizers)."""
    for _ in range(repeats):
        cand.time_once()


def make_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    import torch

    torch.manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32).to(torch.bfloat16).contiguous()


def warm_up_libraries() -> None:
    """One small call per library so lazy initialization is not timed."""
    import bitsandbytes.functional as bnb_f
    from torchao.quantization import to_nf4

    import qlorakit

    x = make_input((256, 256), seed=1)
    packed = qlorakit.quantize(x)
    qlorakit.dequantize(packed)
    codes, state = bnb_f.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    bnb_f.dequantize_4bit(codes, state)
    to_nf4(x, block_size=BLOCKSIZE, scaler_block_size=SCALER_BLOCKSIZE)


# --------------------------------------------------------------------------- benchmarks

OP_COPY = "copy (bandwidth yardstick)"
OP_QUANT = "quantize nf4+dq"
OP_DEQUANT = "dequantize -> bf16"


def copy_candidate(x: torch.Tensor) -> Candidate:
    import numpy as np
    import torch

    src = x.view(torch.int16).numpy().view(np.uint16)
    dst = np.empty_like(src)
    return Candidate(OP_COPY, "numpy np.copyto, uint16 view", lambda: np.copyto(dst, src), "copy")


def quantize_candidates(x: torch.Tensor) -> tuple[list[Candidate], list[Candidate]]:
    """(fast qlorakit rows, slow bitsandbytes/torchao rows) for quantizing ``x``."""
    import bitsandbytes.functional as bnb_f
    from torchao.quantization import to_nf4

    import qlorakit

    out = qlorakit.quantize(x)
    searched = qlorakit.quantize(x, scale_search=True)
    fast = [
        Candidate(OP_QUANT, "qlorakit.quantize (out=, reused)", lambda: qlorakit.quantize(x, out=out), "qk"),
        Candidate(OP_QUANT, "qlorakit.quantize (fresh alloc)", lambda: qlorakit.quantize(x), "qk"),
        Candidate(
            OP_QUANT,
            "qlorakit.quantize scale_search (out=)",
            lambda: qlorakit.quantize(x, scale_search=True, out=searched),
            "qk",
        ),
    ]
    slow = [
        Candidate(
            OP_QUANT,
            "bitsandbytes quantize_4bit",
            lambda: bnb_f.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
            "bnb",
        ),
        Candidate(
            OP_QUANT,
            f"torchao to_nf4 (scaler {SCALER_BLOCKSIZE})",
            lambda: to_nf4(x, block_size=BLOCKSIZE, scaler_block_size=SCALER_BLOCKSIZE),
            "other",
        ),
    ]
    return fast, slow


def to_bnb(packed: Any) -> tuple[torch.Tensor, Any]:
    """The same packed data as bitsandbytes' (codes, QuantState), via the serialized form."""
    import torch
    from bitsandbytes.functional import QuantState

    tensors = packed.state_dict("weight")
    state = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    return tensors["weight"], QuantState.from_dict(state, device=torch.device("cpu"))


def bnb_dequantize_candidate(packed: Any) -> Candidate:
    """bitsandbytes' dequantize_4bit on qlorakit's packed data, into ``out=`` if its CPU backend supports it."""
    import bitsandbytes.functional as bnb_f
    import torch

    codes, state = to_bnb(packed)
    out = torch.empty(packed.shape, dtype=torch.bfloat16)
    try:
        bnb_f.dequantize_4bit(codes, state, out=out)
    except (NotImplementedError, RuntimeError):
        fn = lambda: bnb_f.dequantize_4bit(codes, state)  # noqa: E731
        return Candidate(OP_DEQUANT, "bitsandbytes dequantize_4bit (fresh; no CPU out=)", fn, "bnb")
    fn = lambda: bnb_f.dequantize_4bit(codes, state, out=out)  # noqa: E731
    return Candidate(OP_DEQUANT, "bitsandbytes dequantize_4bit (out=)", fn, "bnb")


def dequantize_candidates(packed: Any) -> list[Candidate]:
    import torch

    import qlorakit

    out = torch.empty(packed.shape, dtype=torch.bfloat16)
    return [
        Candidate(
            OP_DEQUANT, "qlorakit.dequantize (out=)", lambda: qlorakit.dequantize(packed, torch.bfloat16, out=out), "qk"
        ),
        Candidate(
            OP_DEQUANT, "qlorakit.dequantize (fresh alloc)", lambda: qlorakit.dequantize(packed, torch.bfloat16), "qk"
        ),
        bnb_dequantize_candidate(packed),
    ]


def agreement_checks(packed: Any, bnb_quant: Any, qk_deq: torch.Tensor, bnb_deq: torch.Tensor) -> list[str]:
    """Informational: does qlorakit's output match bitsandbytes' on this input?"""
    import torch

    codes, state = bnb_quant
    same_codes = torch.equal(codes.reshape(-1), packed.codes.reshape(-1))
    absmax_diff = int((state.absmax.to(torch.int16) - packed.absmax.to(torch.int16)).ne(0).sum())
    same_nested = torch.equal(state.state2.absmax.float(), packed.nested_absmax.float())
    same_offset = float(state.offset) == float(packed.offset)
    return [
        f"4-bit codes equal to bitsandbytes: {same_codes}; nested absmax codes differing: {absmax_diff}"
        f"/{packed.absmax.numel()}; nested scales equal: {same_nested}; offset equal: {same_offset}",
        f"dequantize outputs (same packed data) bit-identical: {torch.equal(qk_deq, bnb_deq)}",
    ]


def with_anchor(group: list[Candidate], numel: int) -> list[tuple[Result, Result | None]]:
    anchor = next(c for c in group if c.tag == "bnb").result(numel)
    return [(c.result(numel), anchor) for c in group]


def bench_shape(shape: tuple[int, ...], args: argparse.Namespace) -> ShapeReport:
    import qlorakit

    x = make_input(shape, args.seed)
    n = x.numel()
    packed = qlorakit.quantize(x)
    copy = copy_candidate(x)
    quant_fast, quant_slow = quantize_candidates(x)
    dequant = dequantize_candidates(packed)
    time_interleaved([copy, *quant_fast, *dequant], args.repeats, PAUSE_S)
    for cand in quant_slow:
        time_repeated(cand, args.slow_repeats)
    rows: list[tuple[Result, Result | None]] = [(copy.result(n), None)]
    rows += with_anchor([*quant_fast, *quant_slow], n) + with_anchor(dequant, n)
    checks = agreement_checks(packed, quant_slow[0].last, dequant[0].last, dequant[2].last)
    return ShapeReport(shape, rows, copy.result(n), checks)


# --------------------------------------------------------------------------- output


def shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def print_table(report: ShapeReport) -> None:
    n = report.copy.numel
    print(f"\n== {shape_name(report.shape)} bf16: {n / 1e6:.1f} Mparam, {2 * n / 1e6:.1f} MB ==")
    header = f"{'operation':<28} {'implementation':<50} {'N':>2} {'best ms':>9} {'Mparam/s':>9} {'GB/s':>7}"
    print(f"{header} {'vs bnb':>8} {'of copy':>8}")
    for row, anchor in report.rows:
        vs_bnb = f"{anchor.seconds / row.seconds:7.2f}x" if anchor is not None else f"{'-':>8}"
        of_copy = f"{100 * report.copy.seconds / row.seconds:7.1f}%"
        print(
            f"{row.op:<28} {row.impl:<50} {row.reps:>2} {1e3 * row.seconds:>9.2f} {row.mparams:>9.1f} "
            f"{row.gbytes:>7.2f} {vs_bnb} {of_copy}"
        )
    for line in report.checks:
        print(f"  check: {line}")


#: Issue 7: error-optimal scales may cost at most this multiple of absmax quantization.
TARGET_SEARCH_COST = 6.0


def target_lines(report: ShapeReport) -> list[tuple[bool, str]]:
    name = shape_name(report.shape)
    quant = report.find("qlorakit.quantize (out=", "quantize nf4+dq")
    quant_bnb = report.find("bitsandbytes", "quantize nf4+dq")
    deq = report.find("qlorakit.dequantize (out=", "dequantize -> bf16")
    deq_bnb = report.find("bitsandbytes", "dequantize -> bf16")
    quant_ratio, deq_ratio = quant_bnb.seconds / quant.seconds, deq_bnb.seconds / deq.seconds
    searched = report.find("qlorakit.quantize scale_search", "quantize nf4+dq")
    search_cost = searched.seconds / quant.seconds
    return [
        (
            search_cost <= TARGET_SEARCH_COST,
            f"{name}: scale search within {TARGET_SEARCH_COST:.0f}x the time of absmax quantization: "
            f"{search_cost:.1f}x (llama.cpp's IQ4_NL takes ~26x its Q4_0 time)",
        ),
        (
            quant.mparams >= TARGET_QUANT_MPARAMS,
            f"{name}: quantize >= {TARGET_QUANT_MPARAMS:.0f} Mparam/s: {quant.mparams:.0f} Mparam/s",
        ),
        (
            quant_ratio >= TARGET_QUANT_VS_BNB,
            f"{name}: quantize ~{TARGET_QUANT_VS_BNB:.0f}x bitsandbytes quantize_4bit: {quant_ratio:.1f}x",
        ),
        (
            deq_ratio >= TARGET_DEQUANT_VS_BNB,
            f"{name}: dequantize bf16 >= {TARGET_DEQUANT_VS_BNB}x bitsandbytes dequantize_4bit: {deq_ratio:.2f}x",
        ),
    ]


def print_targets(reports: list[ShapeReport]) -> None:
    n_rayon, _ = rayon_threads()
    print("\nTargets from the project issue (information only, not a test):")
    print(
        f"  quantize (NF4 + double quant, bf16 in) >= {TARGET_QUANT_MPARAMS / 1e3:.1f} Gparam/s with "
        f"{TARGET_THREADS} threads, which is ~{TARGET_QUANT_VS_BNB:.0f}x bitsandbytes CPU quantize_4bit"
    )
    print(f"  dequantize to bf16 >= {TARGET_DEQUANT_VS_BNB}x bitsandbytes' CPU dequantize_4bit")
    print("  (qlorakit figures: the out= rows; the bitsandbytes rows are the anchors)")
    if n_rayon != TARGET_THREADS:
        print(f"  note: this run used {n_rayon} qlorakit threads; the throughput target is stated for {TARGET_THREADS}")
    for report in reports:
        for ok, text in target_lines(report):
            print(f"  [{'PASS' if ok else 'MISS'}] {text}")


#: TinyLlama-1.1B's quantized linears per decoder layer, [out, in], and its layer count.
TINYLLAMA_LINEARS = ((2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632))
TINYLLAMA_LAYERS = 22
#: Distinct layer inputs (Hessians to factor) per TinyLlama layer, by input width: attention in, o_proj in,
#: MLP in (2048 wide), down_proj in (5632 wide).
TINYLLAMA_FACTORS = (2048, 2048, 2048, 5632)
#: Issue 15: the 1.1B checkpoint with GPTQ in a few minutes at most.
TARGET_GPTQ_1B_SECONDS = 300.0


def gptq_seconds(rows: int, cols: int, seed: int) -> float:
    """Wall time of one ``quantize_gptq`` call (factor of a random correlated H included)."""
    import time

    import torch

    from qlorakit.calibration import quantize_gptq

    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)
    inputs = torch.randn(2 * cols, cols, generator=generator)
    hessian = inputs.T @ inputs / len(inputs)
    begin = time.perf_counter()
    quantize_gptq(weight, hessian)
    return time.perf_counter() - begin


def bench_gptq(reports: list[ShapeReport], seed: int) -> None:
    """GPTQ per bench shape beside the absmax and scale-search rows, and the 1.1B estimate: the factor
    (timed on a 64-row weight, where it dominates) once per distinct input, the rows scaled by rows*cols^2."""
    print("\nGPTQ-NF4 (double quant; H factored per call; the three candidates scored for the fallback):")
    for report in reports:
        rows, cols = report.shape[0], report.shape[-1]
        seconds = gptq_seconds(rows, cols, seed)
        absmax = report.find("qlorakit.quantize (out=", "quantize nf4+dq").seconds
        searched = report.find("qlorakit.quantize scale_search", "quantize nf4+dq").seconds
        print(
            f"  {shape_name(report.shape)}: GPTQ {seconds:.2f} s; absmax {1e3 * absmax:.1f} ms, "
            f"scale search {1e3 * searched:.1f} ms (GPTQ = {seconds / absmax:.0f}x absmax)"
        )
    factor = {cols: gptq_seconds(64, cols, seed) for cols in sorted(set(TINYLLAMA_FACTORS))}
    reference_rows, reference_cols = 2048, 2048
    per_mac = (gptq_seconds(reference_rows, reference_cols, seed) - factor[reference_cols]) / (
        reference_rows * reference_cols**2
    )
    layer = sum(factor[c] for c in TINYLLAMA_FACTORS) + sum(r * c * c * per_mac for r, c in TINYLLAMA_LINEARS)
    total = TINYLLAMA_LAYERS * layer
    print(
        f"  TinyLlama-1.1B estimate: {total:.0f} s ({TINYLLAMA_LAYERS} layers x {layer:.1f} s; factors "
        + ", ".join(f"{c}: {t:.2f} s" for c, t in factor.items())
        + f") [{'PASS' if total <= TARGET_GPTQ_1B_SECONDS else 'MISS'}] target {TARGET_GPTQ_1B_SECONDS:.0f} s"
    )


#: Sequence length of the calibration batches of --gptq-checkpoint (the CLI's default --calibration-length).
CALIBRATION_LENGTH = 512


def bench_gptq_checkpoint(source: str, tokens: int, seed: int) -> None:
    """GPTQ of a whole checkpoint, measured rather than estimated: the float32 model's forward over random token
    ids with the Hessian hooks (cost of calibration: the model and the text, not GPTQ), then the calibrated
    quantize of every selected tensor (the factor of each distinct H, the rounding, the fallback's scoring, the
    writing), and plain absmax quantize of the same checkpoint as the yardstick."""
    import tempfile
    import time

    import torch

    import qlorakit
    from qlorakit.calibration import collect_hessians
    from qlorakit.importance import float_model

    print(f"\nGPTQ-NF4 of the checkpoint {source} (double quant; {tokens} calibration tokens):")
    begin = time.perf_counter()
    model = float_model(source)
    loaded = time.perf_counter() - begin
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batches = [
        torch.randint(0, vocab, (1, CALIBRATION_LENGTH), generator=generator)
        for _ in range(max(1, tokens // CALIBRATION_LENGTH))
    ]
    begin = time.perf_counter()
    hessians = collect_hessians(model, batches)
    calibration = time.perf_counter() - begin
    del model
    with tempfile.TemporaryDirectory(prefix="qlorakit-bench-gptq-") as scratch:
        begin = time.perf_counter()
        hessian_file = hessians.save(f"{scratch}/hessians.safetensors")
        saved = time.perf_counter() - begin
        matrices = len(hessians.matrices)
        del hessians
        begin = time.perf_counter()
        report = qlorakit.quantize_checkpoint(source, f"{scratch}/gptq", hessians=hessian_file, force=True)
        gptq = time.perf_counter() - begin
        begin = time.perf_counter()
        qlorakit.quantize_checkpoint(source, f"{scratch}/absmax", force=True)
        absmax = time.perf_counter() - begin
    chosen: dict[str, int] = {}
    if report.gptq is not None:
        for result in report.gptq.per_tensor.values():
            chosen[result.chosen] = chosen.get(result.chosen, 0) + 1
    print(f"  float32 model loaded in {loaded:.1f} s; calibration forward + H ({matrices} H) {calibration:.1f} s")
    print(f"  H written in {saved:.1f} s; calibrated quantize {gptq:.1f} s (absmax quantize {absmax:.1f} s)")
    print(f"  tensors by result kept: {chosen}")
    total = calibration + saved + gptq
    verdict = "PASS" if gptq <= TARGET_GPTQ_1B_SECONDS else "MISS"
    print(
        f"  [{verdict}] calibrated quantize {gptq:.0f} s, target {TARGET_GPTQ_1B_SECONDS:.0f} s; with the "
        f"calibration forward {total:.0f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before the first import of qlorakit / torch
    print_environment(args.threads)
    print(
        f"settings: NF4, blocksize {BLOCKSIZE}, double quant on, seed {args.seed}; "
        f"best of {args.repeats} (bitsandbytes/torchao quantize: best of {args.slow_repeats})"
    )
    warm_up_libraries()
    reports = [bench_shape(shape, args) for shape in args.shapes]
    for report in reports:
        print_table(report)
    print_targets(reports)
    if args.gptq:
        bench_gptq(reports, args.seed)
    if args.gptq_checkpoint:
        bench_gptq_checkpoint(args.gptq_checkpoint, args.calibration_tokens, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
