"""The ``qlorakit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qlorakit import __version__

if TYPE_CHECKING:
    import torch
from qlorakit.checkpoint import inspect_checkpoint, quantize_checkpoint, verify_checkpoint
from qlorakit.errors import QlorakitError
from qlorakit.formats import BLOCKSIZES, DEFAULT_BLOCKSIZE

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
    import torch

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    outliers = torch.rand(shape, generator=generator) < 1e-3
    return torch.where(outliers, weight * 8, weight).to(torch.bfloat16)


def run_demo(quant_type: str, blocksize: int, double_quant: bool) -> int:
    """Quantizes the embedded layer, checks the round trip, prints a summary."""
    import torch

    from qlorakit.packed import PackedWeight
    from qlorakit.quantization import dequantize, quantize

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


def run_quantize(args: argparse.Namespace) -> int:
    report = quantize_checkpoint(
        args.src,
        args.dst,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        skip=args.skip,
        transformers_rule=args.transformers_rule,
        threads=args.threads,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(report.summary())
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {len(info['files'])} file(s), {info['tensors']} tensors {info['dtypes']}")
    writer = f"qlorakit {info['written_by']}, format {info['format_version']}" if info["written_by"] else "not qlorakit"
    print(f"written by: {writer}")
    if info["quantized_weights"]:
        print(
            f"quantized weights: {info['quantized_weights']} ({'/'.join(info['quant_types'])}, "
            f"blocksize {info['blocksizes']}, double quant {info['double_quant']})"
        )
    print(
        f"parameters: {info['parameters'] / 1e6:.1f} M, {info['bytes'] / 1e9:.3f} GB, "
        f"{info['bits_per_param']:.3f} bits/param"
    )
    if info["options"]:
        print(f"options: {json.dumps(info['options'], sort_keys=True)}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    report = verify_checkpoint(args.path, against=args.against)
    for name, error in sorted(report.per_tensor_error.items()):
        print(f"  {name:<60} relative error {error:.4f}")
    print(
        f"{report.files} file(s): {report.tensors_checked} checksums, "
        f"{report.weights_decoded} quantized weights decoded"
    )
    if report.per_tensor_error:
        worst = max(report.per_tensor_error.values())
        mean = sum(report.per_tensor_error.values()) / len(report.per_tensor_error)
        print(f"relative error vs {args.against}: mean {mean:.4f}, worst {worst:.4f}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print("OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


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

    quantize = commands.add_parser(
        "quantize",
        help="quantize a safetensors checkpoint into a bitsandbytes-format 4-bit model directory",
        description="Quantize SRC (a Hugging Face model directory or a .safetensors file) into DST, a model "
        "directory that transformers + bitsandbytes and qlorakit load. DST is written atomically.",
    )
    quantize.add_argument("src", help="source model directory or .safetensors file (read only)")
    quantize.add_argument("dst", help="destination directory (must not exist unless --force)")
    quantize.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    quantize.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=DEFAULT_BLOCKSIZE)
    quantize.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    quantize.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    quantize.add_argument(
        "--skip", nargs="+", default=[], metavar="PATTERN", help="module names/regexes to keep unquantized"
    )
    quantize.add_argument(
        "--transformers-rule",
        action="store_true",
        help="quantize exactly the linear layers transformers would (builds the model class; slower start)",
    )
    quantize.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    quantize.add_argument("--max-shard-size", default="5GB", help="largest output file (default 5GB)")
    quantize.add_argument("--force", action="store_true", help="replace DST if it exists")
    quantize.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    inspect = commands.add_parser("inspect", help="show what a checkpoint directory or file holds")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    verify = commands.add_parser("verify", help="re-check checksums and decodability (and error vs the source)")
    verify.add_argument("path")
    verify.add_argument("--against", metavar="SRC", help="source checkpoint to measure reconstruction error against")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script. Exit codes: 0 ok, 1 failure, 2 usage error."""
    args = build_parser().parse_args(argv)
    commands = {
        "demo": lambda: run_demo(args.quant_type, args.blocksize, args.double_quant),
        "quantize": lambda: run_quantize(args),
        "inspect": lambda: run_inspect(args),
        "verify": lambda: run_verify(args),
    }
    try:
        return commands[args.command]()
    except (QlorakitError, FileExistsError, ValueError, OSError) as exc:
        print(f"qlorakit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qlorakit: interrupted; nothing was written to the destination", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
