"""GPU benchmark: qlorakit.optim.PagedAdamW against torch.optim.AdamW(fused=True).

Run from the repository root on a machine with a CUDA GPU and CuPy::

    python tools/bench_paged.py                  # Llama-2-7B LoRA adapters (r=16, all 7 projections), fp32
    python tools/bench_paged.py --dtype bf16     # bf16 adapters (PagedAdamW keeps fp32 moments, torch bf16 ones)
    python tools/bench_paged.py --rank 64 --steps 30 --skip-demo

What it measures (the parameters: LoRA A and B of q, k, v, o, gate, up, down in each of
32 layers of hidden size 4096 and intermediate size 11008, 448 tensors, 40.0 M values at
r=16; gradients are fixed random tensors, so only ``optimizer.step()`` is timed):

1. **Step time**, states resident on the GPU: PagedAdamW (one prefetch + one fused kernel
   per parameter) against the anchor ``torch.optim.AdamW(fused=True)`` (one multi-tensor
   kernel for all parameters) and torch's default foreach AdamW, round-robin, each on its
   own copy of the same parameters; median wall-clock milliseconds per step (synchronized
   before and after), and the ratio to the anchor. Afterwards PagedAdamW's parameters are
   compared with the fused anchor's (same gradients, same number of steps).
2. **States that do not fit** (``--skip-demo`` leaves it out): a deliberately large ordinary
   allocation leaves the GPU room for only a quarter of the optimizer states (plus a small
   headroom), then a PagedAdamW is created and stepped: its managed states page between
   host RAM and the GPU and training continues. Reported: step time against the same
   optimizer with resident states, and the parameters against a CPU torch.optim.AdamW run
   on the same gradients. Before anything is allocated for it, ``torch.cuda.mem_get_info()``
   must show room for all the states: the managed memory the demo asks for never exceeds
   what the card had free (the phase is skipped otherwise), so the host RAM that takes the
   evicted part stays bounded too. (The states are then allocated after the ballast, so
   at that moment they do exceed the free memory: that is the demonstration.)
3. **A spike after the states are resident**: an ordinary allocation larger than the free
   memory, which succeeds only if the driver evicts managed pages to make room for it
   (the QLoRA case: an activation spike while the states sit on the GPU). Either outcome
   is reported; on success the optimizer steps again and is checked.

Deviations are printed with a verdict (``ok`` below 1e-5, else ``MISMATCH``, and exit status
1). Exits with a message (status 0) when there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIB = 1 << 20
MAX_DEVIATION = 1e-5  # a float32 rounding-level difference after a few dozen steps is far below this
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_shapes(layers: int, hidden: int, intermediate: int, rank: int) -> list[tuple[int, int]]:
    """Shapes of every LoRA A (``[r, in]``) and B (``[out, r]``) of a Llama-shaped model."""
    in_out = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    shapes = []
    for _ in range(layers):
        for name in PROJECTIONS:
            fan_in, fan_out = in_out[name]
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes


@dataclass
class Adapters:
    """One copy of the adapter parameters, each with its fixed gradient."""

    params: list[torch.nn.Parameter]

    @classmethod
    def create(cls, shapes: list[tuple[int, int]], device: str, dtype: torch.dtype) -> Adapters:
        generator = torch.Generator(device="cpu").manual_seed(0)
        params = []
        for shape in shapes:
            param = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=dtype))
            param.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device=device, dtype=dtype)
            params.append(param)
        return cls(params)

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def relative_deviation(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """``max|ours - ref| / max|ref|`` over all tensors."""
    worst = 0.0
    for a, b in zip(ours, reference, strict=True):  # on the CPU: no device memory needed
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return worst


def verdict(deviation: float) -> str:
    return f"{deviation:.2e} ({'ok' if deviation < MAX_DEVIATION else 'MISMATCH'})"


def time_steps(step: Callable[[], object], count: int) -> list[float]:
    """Wall-clock milliseconds of ``count`` calls, each synchronized before and after (so CPU
    launch overhead and GPU time both count, as they do in a training loop)."""
    times = []
    for _ in range(count):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def free_memory() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def bench_step_time(args: argparse.Namespace, shapes: list[tuple[int, int]], dtype: torch.dtype) -> bool:
    """Phase 1; False if PagedAdamW's parameters do not match the anchor's."""
    from qlorakit.optim import PagedAdamW

    kwargs = {"lr": 1e-4, "weight_decay": 0.01}
    candidates: dict[str, tuple[Adapters, torch.optim.Optimizer]] = {}
    for name, make in (
        ("torch AdamW fused (anchor)", lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs)),
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **kwargs)),
        ("qlorakit PagedAdamW", lambda ps: PagedAdamW(ps, **kwargs)),
    ):
        adapters = Adapters.create(shapes, "cuda", dtype)
        candidates[name] = (adapters, make(adapters.params))

    numel = next(iter(candidates.values()))[0].numel()
    print(f"\n== step time: {len(shapes)} tensors, {numel / 1e6:.1f} M parameters ({dtype}), states resident")
    for _, optimizer in candidates.values():  # warm-up: state allocation, kernel compilation
        time_steps(optimizer.step, args.warmup)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):  # round-robin, so drift in clocks or load hits every row alike
        for name, (_, optimizer) in candidates.items():
            samples[name] += time_steps(optimizer.step, args.steps)

    anchor = statistics.median(samples["torch AdamW fused (anchor)"])
    print(f"{'optimizer':<28} {'median ms':>10} {'min ms':>8} {'t / t_fused':>12}")
    for name, times in samples.items():
        median = statistics.median(times)
        print(f"{name:<28} {median:>10.3f} {min(times):>8.3f} {median / anchor:>12.2f}")

    paged = candidates["qlorakit PagedAdamW"][0].params
    fused = candidates["torch AdamW fused (anchor)"][0].params
    if dtype != torch.float32:
        print("(no parameter comparison for half-precision adapters: torch keeps half-precision moments)")
        return True
    deviation = relative_deviation(paged, fused)
    print(f"PagedAdamW vs fused AdamW after the same steps: max relative deviation {verdict(deviation)}")
    return deviation < MAX_DEVIATION


def cpu_reference(adapters: Adapters, checkpoints: tuple[int, ...]) -> dict[int, list[torch.Tensor]]:
    """torch.optim.AdamW on the CPU over the same gradients, from the adapters' current values:
    the parameters after each step count in ``checkpoints``."""
    params = []
    for p in adapters.params:
        cpu = torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True))
        cpu.grad = p.grad.to("cpu", torch.float32, copy=True)
        params.append(cpu)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=False)
    snapshots = {}
    for step in range(1, max(checkpoints) + 1):
        optimizer.step()
        if step in checkpoints:
            snapshots[step] = [p.detach().clone() for p in params]
    return snapshots


def demo_oversubscribed(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> bool:
    """Phases 2 and 3, in float32; False if the parameters do not match the CPU reference."""
    from qlorakit.optim import PagedAdamW

    kwargs = {"lr": 1e-4, "weight_decay": 0.01}
    adapters = Adapters.create(shapes, "cuda", torch.float32)
    state_bytes = 8 * adapters.numel()  # exp_avg + exp_avg_sq, float32
    free = free_memory()
    print(f"\n== states that do not fit: {state_bytes / MIB:.0f} MiB of optimizer states, {free / MIB:.0f} MiB free")
    if state_bytes > 0.9 * free:
        print("skipped: the states alone would not fit in the free memory, and the demo never asks for more")
        return True
    steps = args.demo_steps
    reference = cpu_reference(adapters, (steps, 2 * steps))

    # Baseline on its own copy, then freed: the same states and steps with the states resident.
    resident = Adapters.create(shapes, "cuda", torch.float32)
    optimizer = PagedAdamW(resident.params, **kwargs)
    optimizer.step()
    resident_ms = statistics.median(time_steps(optimizer.step, steps))
    del optimizer, resident

    # The ballast leaves the GPU room for a quarter of the states plus the headroom.
    ballast_bytes = free_memory() - (state_bytes // 4 + args.headroom_mib * MIB)
    try:
        ballast = torch.empty(max(ballast_bytes, 0), dtype=torch.uint8, device="cuda").fill_(1)
    except torch.OutOfMemoryError:
        print("skipped: the ballast could not be allocated in one piece")
        return True
    print(f"ballast: {ballast_bytes / MIB:.0f} MiB of ordinary device memory, {free_memory() / MIB:.0f} MiB left free")
    optimizer = PagedAdamW(adapters.params, **kwargs)  # the states are created under pressure
    tight = time_steps(optimizer.step, steps)
    tight_ms = statistics.median(tight[1:] or tight)  # the first step also allocates and zeroes
    print(f"free while stepping: {free_memory() / MIB:.0f} MiB (the rest of the states are in host RAM)")
    deviation = relative_deviation(adapters.params, reference[steps])
    ok = deviation < MAX_DEVIATION
    print(f"{'PagedAdamW, states resident':<34} {resident_ms:>9.2f} ms/step")
    print(f"{'PagedAdamW, 1/4 of the states fit':<34} {tight_ms:>9.2f} ms/step  ({tight_ms / resident_ms:.1f}x)")
    print(f"parameters after {steps} steps vs CPU torch.optim.AdamW: max relative deviation {verdict(deviation)}")
    del ballast
    free_memory()  # hand the ballast back to the driver, so the next prefetch can bring the states home

    # Phase 3: the states resident again, then an ordinary allocation larger than the free memory.
    optimizer.step()
    spike_bytes = free_memory() + state_bytes // 2
    print(f"\n== spike: {spike_bytes / MIB:.0f} MiB of ordinary memory requested with the states resident")
    try:
        spike = torch.empty(spike_bytes, dtype=torch.uint8, device="cuda").fill_(1)
    except torch.OutOfMemoryError:
        print("out of memory: this driver does not evict managed pages to satisfy cudaMalloc, so here a spike")
        print("must fit beside the resident states (the phase above shows paging under managed-memory pressure)")
        return ok
    spike_ms = statistics.median(time_steps(optimizer.step, steps - 1))
    deviation = relative_deviation(adapters.params, reference[2 * steps])
    print(f"allocated: the driver evicted states to host RAM; PagedAdamW continues at {spike_ms:.2f} ms/step")
    print(f"parameters after {2 * steps} steps vs CPU torch.optim.AdamW: max relative deviation {verdict(deviation)}")
    del spike
    return ok and deviation < MAX_DEVIATION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="adapter dtype for the step timing")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and optimizer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--demo-steps", type=int, default=5, help="steps per demo phase (at least 2)")
    parser.add_argument("--headroom-mib", type=int, default=64, help="free memory left beside the states' quarter")
    parser.add_argument("--skip-demo", action="store_true", help="only time the steps")
    args = parser.parse_args(argv)
    if args.demo_steps < 2 or args.steps < 1 or args.rounds < 1:
        parser.error("--demo-steps must be at least 2, --steps and --rounds at least 1")

    if not torch.cuda.is_available():
        print("bench_paged: no CUDA GPU here; this benchmark needs one (nothing was measured)")
        return 0
    try:
        from qlorakit.kernels.cupy_loader import require_cupy
        from qlorakit.optim.managed import concurrent_managed_access

        cupy = require_cupy()
    except Exception as error:  # QlorakitError naming the extra to install
        print(f"bench_paged: {error}")
        return 1

    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / MIB:.0f} MiB, {props.multi_processor_count} SMs")
    driver = cupy.cuda.runtime.driverGetVersion()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CuPy {cupy.__version__}, driver API {driver}")
    print(f"concurrent managed access (prefetch, oversubscription): {concurrent_managed_access(0)}")
    shapes = lora_shapes(args.layers, args.hidden, args.intermediate, args.rank)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    ok = bench_step_time(args, shapes, dtype)
    free_memory()
    if not args.skip_demo:
        ok = demo_oversubscribed(args, shapes) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
