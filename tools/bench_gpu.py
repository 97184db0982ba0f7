"""GPU benchmark of the CUDA path, with ratios against anchors measured in the same run.

    python tools/bench_gpu.py                       # Llama-7B/8B projection shapes, bf16
    python tools/bench_gpu.py --quick               # one shape, fewer repeats
    python tools/bench_gpu.py --shapes 4096x4096 --dtype fp16 --tokens 2048

Needs a CUDA GPU, CuPy (``pip install 'qlorakit[cuda12]'`` or ``'qlorakit[cuda13]'``) and bitsandbytes (the
anchors); without a GPU or CuPy it prints why and exits with status 0.

For each weight shape ``out x in`` (NF4, blocksize 64, double quantization; packed once by qlorakit and given
to bitsandbytes as the same bytes through ``Params4bit.from_prequantized``):

* **dequantize**: qlorakit's kernel (``qlorakit.nn.dispatch.dequantize_weight``) vs
  ``bitsandbytes.functional.dequantize_4bit`` on the same data; GB/s count the bytes a dequantization must move
  (codes, nested scale codes, nested scales, output), and the device's copy bandwidth is the anchor: a
  ``copy_`` between two buffers of the output's size (read + write). Also checks that both outputs are equal
  bit for bit.
* **Linear4bit fwd+bwd**: ``qlorakit.nn.Linear4bit`` vs ``bitsandbytes.nn.Linear4bit`` on ``--tokens`` rows,
  input requiring grad (two dequantizations and two matmuls each), and a dense layer as a second anchor.
* **batch-1 matvec**: a one-row input without grad: qlorakit's fused kernel (``Linear4bit`` and the raw
  ``cuda_ops.gemv_4bit``) vs bitsandbytes (``Linear4bit``, i.e. ``matmul_4bit``, and ``functional.gemv_4bit``).
  Eager times include each library's Python dispatch, as a decoding loop sees it; the CUDA-graph column
  replays 20 captured calls, which leaves mostly the kernels (``n/a`` where a library cannot be captured).

Times: CUDA events around a loop of calls sized to >= 20 ms, best of ``--repeats``. Ratios ``x`` > 1 mean
qlorakit is faster (``t_anchor / t_qlorakit``); for bandwidth, the fraction of the copy bandwidth reached.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
from collections.abc import Callable, Sequence

from bench_common import configure_threads

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_SHAPES = ("4096x4096", "11008x4096", "4096x11008", "14336x4096")


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from qlorakit.kernels.cupy_loader import require_cupy

        require_cupy()
    except Exception as exc:  # noqa: BLE001 - any reason is reported as is
        return str(exc)
    return None


def cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``fn`` on the GPU timeline: CUDA events around a loop of calls of >= 20 ms."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iterations = 1
    while True:
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        if start.elapsed_time(end) >= 20 or iterations >= 1 << 16:
            break
        iterations *= 4
    best = math.inf
    for _ in range(repeats):
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iterations)
    return best


def graph_time(fn: Callable[[], object], repeats: int, calls: int = 20) -> float | str:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls, or why it cannot be captured."""
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
        return cuda_time(graph.replay, repeats) / calls
    except Exception as exc:  # noqa: BLE001 - reported in the table
        torch.cuda.synchronize()
        return f"n/a ({type(exc).__name__})"


def fmt_time(t: float | str) -> str:
    return t if isinstance(t, str) else f"{t * 1e6:9.1f} us"


def ratio(anchor: float | str, ours: float | str) -> str:
    if isinstance(anchor, str) or isinstance(ours, str):
        return "n/a"
    return f"{anchor / ours:5.2f}x"


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s (read + write) for buffers of ``nbytes``."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), repeats)


def bench_shape(rows: int, cols: int, dtype_name: str, tokens: int, repeats: int) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    import torch

    import qlorakit
    from qlorakit.kernels import cuda_ops
    from qlorakit.nn import Linear4bit
    from qlorakit.nn.dispatch import dequantize_weight

    dtype = getattr(torch, dtype_name)
    element = torch.empty(0, dtype=dtype).element_size()
    torch.manual_seed(0)
    weight = torch.randn(rows, cols) * 0.02
    packed = qlorakit.quantize(weight.to(dtype), "nf4", 64, True)
    ours = Linear4bit(packed, None, compute_dtype=dtype).cuda()
    tensors = packed.state_dict("weight")
    stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    reference = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=dtype, quant_type="nf4")
    reference.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False, device="cuda")
    reference = reference.cuda()
    dense = torch.nn.Linear(cols, rows, bias=False, device="cuda", dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dtype))
    dense.weight.requires_grad_(False)
    state = reference.weight.quant_state
    cuda_packed = ours.packed_weight()
    n = rows * cols
    print(f"\n== {rows} x {cols} ({n / 1e6:.1f} M weights), {dtype_name}, NF4 blocksize 64, double quant")

    # -- dequantize
    ours_w = dequantize_weight(cuda_packed, dtype)
    bnb_w = bnb_functional.dequantize_4bit(reference.weight, quant_state=state)
    identical = bnb_w.dtype == ours_w.dtype and torch.equal(ours_w.view(torch.uint8), bnb_w.view(torch.uint8))
    moved = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + n * element
    copy = copy_bandwidth(n * element, repeats)
    t_ours = cuda_time(lambda: dequantize_weight(cuda_packed, dtype), repeats)
    t_bnb = cuda_time(lambda: bnb_functional.dequantize_4bit(reference.weight, quant_state=state), repeats)
    print(f"dequantize         copy bandwidth {copy / 1e9:7.1f} GB/s (anchor); output identical to bnb: {identical}")
    for label, t in (("qlorakit", t_ours), ("bitsandbytes", t_bnb)):
        gbps = moved / t / 1e9
        print(f"  {label:<16} {fmt_time(t)}  {gbps:7.1f} GB/s  = {gbps * 1e9 / copy:5.1%} of copy")
    print(f"  qlorakit vs bitsandbytes: {ratio(t_bnb, t_ours)}")

    # -- Linear4bit forward + backward
    x = torch.randn(tokens, cols, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, rows, device="cuda", dtype=dtype)

    def fwd_bwd(layer: torch.nn.Module) -> Callable[[], None]:
        inp = x.clone().requires_grad_(True)

        def step() -> None:
            inp.grad = None
            layer(inp).backward(grad)

        return step

    times = {
        label: cuda_time(fwd_bwd(layer), repeats) for label, layer in (("q", ours), ("b", reference), ("d", dense))
    }
    print(f"Linear4bit fwd+bwd ({tokens} rows, input requires grad)")
    print(f"  qlorakit         {fmt_time(times['q'])}")
    print(f"  bitsandbytes     {fmt_time(times['b'])}   qlorakit vs bitsandbytes: {ratio(times['b'], times['q'])}")
    print(f"  dense {dtype_name:<10} {fmt_time(times['d'])}   qlorakit / dense: {times['q'] / times['d']:5.2f}")

    # -- batch-1 matvec
    row = torch.randn(1, cols, device="cuda", dtype=dtype)
    flat = row.reshape(-1)
    expected = torch.nn.functional.linear(row.float(), ours_w.float())
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "qlorakit Linear4bit": lambda: ours(row),
        "qlorakit gemv_4bit": lambda: cuda_ops.gemv_4bit(cuda_packed, flat),
        "bnb Linear4bit": lambda: reference(row),
        "bnb gemv_4bit": lambda: bnb_functional.gemv_4bit(row, reference.weight, state=state),
    }
    print("batch-1 matvec (one row, no grad)          eager     CUDA graph   check vs fp32 reference")
    results: dict[str, tuple[float | str, float | str]] = {}
    with torch.no_grad():
        for label, fn in candidates.items():
            try:
                got = fn().float().reshape(1, -1)
                error = ((got - expected).abs().max() / expected.abs().max()).item()
                check = f"max rel. error {error:.1e}" + ("" if error < 2e-2 else "  <-- WRONG")
                results[label] = (cuda_time(fn, repeats), graph_time(fn, repeats))
            except Exception as exc:  # noqa: BLE001 - an anchor that fails is reported, not fatal
                check = f"failed: {type(exc).__name__}: {exc}"[:90]
                results[label] = ("n/a", "n/a")
            eager, graphed = results[label]
            print(f"  {label:<24} {fmt_time(eager):>14} {fmt_time(graphed):>14}   {check}")
    q_eager, q_graph = results["qlorakit Linear4bit"]
    b_eager, b_graph = results["bnb Linear4bit"]
    qk_eager, qk_graph = results["qlorakit gemv_4bit"]
    bk_eager, bk_graph = results["bnb gemv_4bit"]
    print(f"  qlorakit vs bitsandbytes: Linear4bit eager {ratio(b_eager, q_eager)}, graph {ratio(b_graph, q_graph)};")
    print(
        f"                            gemv_4bit  eager {ratio(bk_eager, qk_eager)}, graph {ratio(bk_graph, qk_graph)}"
    )
    if not isinstance(qk_graph, str):
        gemv_bandwidth = (n // 2 + n // 64 + (cols + rows) * element) / qk_graph
        print(f"  qlorakit gemv (graph): {gemv_bandwidth / 1e9:.1f} GB/s = {gemv_bandwidth / copy:.1%} of copy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, help=f"OUTxIN (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the fwd+bwd input (default 4096)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one shape, 2 repeats, 1024 tokens")
    args = parser.parse_args(argv)
    configure_threads(None)

    reason = gpu_unavailable()
    if reason is not None:
        print(f"bench_gpu: nothing to measure: {reason}")
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bench_gpu: bitsandbytes (the anchor) is not installed: pip install 'qlorakit[test]'")
        return 0
    import torch

    shapes = args.shapes or (DEFAULT_SHAPES[:1] if args.quick else DEFAULT_SHAPES)
    repeats = 2 if args.quick else args.repeats
    tokens = 1024 if args.quick else args.tokens
    properties = torch.cuda.get_device_properties(0)
    print(
        f"device: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs"
    )
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), cupy {version('cupy-cuda12x')}/"
        f"{version('cupy-cuda13x')} (cuda12x/cuda13x), bitsandbytes {version('bitsandbytes')}, "
        f"qlorakit {version('qlorakit')}"
    )
    for shape in shapes:
        rows, cols = (int(v) for v in shape.lower().split("x"))
        bench_shape(rows, cols, DTYPES[args.dtype], tokens, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
