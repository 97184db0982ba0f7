"""The ``qlorakit`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from qlorakit import __version__
from qlorakit.errors import QlorakitError
from qlorakit.formats import BLOCKSIZES, DEFAULT_BLOCKSIZE
from qlorakit.packed import PackedWeight
from qlorakit.quantization import dequantize, quantize

#: The embedded default workload: the seven linear weights of one Llama-2-7B decoder
#: layer (out_features, in_features), bf16.
LLAMA_7B_LAYER: tuple[tuple[str, tuple[int, int]], ...] = (
    ("self_attn.q_proj", (4096, 4096)),
    ("self_attn.k_proj", (4096, 4096)),
    ("self_attn.v_proj", (4096, 4096)),
    ("self_attn.o_proj", (4096, 4096)),
    ("mlp.gate_proj", (11008, 4096)),
    ("mlp.up_proj", (11008, 4096)),
    ("mlp.down_proj", (4096, 11008)),
)


def synthetic_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A deterministic bf16 weight with the heavy-tailed spread of trained LLM weights."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    outliers = torch.rand(shape, generator=generator) < 1e-3
    return torch.where(outliers, weight * 8, weight).to(torch.bfloat16)


def run_demo(quant_type: str, blocksize: int, double_quant: bool) -> int:
    """Quantizes the embedded layer, checks the round trip, prints a summary."""
    print(f"qlorakit {__version__}: {quant_type} blocksize {blocksize} double-quant {double_quant}")
    print("embedded default: the 7 linear weights of one Llama-2-7B layer, bf16 (deterministic synthetic values)")
    total_params = total_in = total_out = 0
    total_seconds = 0.0
    squared_error = squared_norm = 0.0
    for index, (name, shape) in enumerate(LLAMA_7B_LAYER):
        weight = synthetic_weight(shape, index)
        start = time.perf_counter()
        packed = quantize(weight, quant_type, blocksize, double_quant)
        seconds = time.perf_counter() - start
        restored = PackedWeight.from_state_dict(packed.state_dict("weight"), "weight")
        decoded = dequantize(restored, torch.float32)
        reference = weight.float()
        error = float((decoded - reference).pow(2).sum())
        norm = float(reference.pow(2).sum())
        print(
            f"  {name:<17} {shape[0]:>5} x {shape[1]:<5} {weight.numel() / seconds / 1e9:6.2f} Gparam/s  "
            f"relative error {(error / norm) ** 0.5:.4f}"
        )
        total_params += weight.numel()
        total_in += weight.numel() * weight.element_size()
        total_out += packed.nbytes
        total_seconds += seconds
        squared_error += error
        squared_norm += norm
    print(
        f"quantized {total_params / 1e6:.1f} M parameters in {total_seconds:.3f} s "
        f"({total_params / total_seconds / 1e9:.2f} Gparam/s, {total_in / total_seconds / 1e9:.2f} GB/s of bf16 input)"
    )
    print(
        f"size {total_in / 2**20:.1f} MiB -> {total_out / 2**20:.1f} MiB, "
        f"{8 * total_out / total_params:.3f} bits/parameter, "
        f"relative reconstruction error {(squared_error / squared_norm) ** 0.5:.4f}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlorakit", description="QLoRA on little hardware.")
    parser.add_argument("--version", action="version", version=f"qlorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="quantize an embedded default workload (one Llama-7B layer) and report speed and error"
    )
    demo.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    demo.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=DEFAULT_BLOCKSIZE)
    demo.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script. Exit codes: 0 ok, 1 failure, 2 usage error."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.quant_type, args.blocksize, args.double_quant)
    except QlorakitError as exc:
        print(f"qlorakit: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
