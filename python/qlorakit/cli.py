"""The ``qlorakit`` command line."""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qlorakit import __version__
from qlorakit.checkpoint import inspect_checkpoint, parse_size, quantize_checkpoint, verify_checkpoint
from qlorakit.errors import QlorakitError
from qlorakit.formats import BLOCKSIZES, DEFAULT_BLOCKSIZE, DEFAULT_MAX_SHARD_SIZE, QUANT_TYPES
from qlorakit.hf_files import COMPUTE_DTYPES

#: Files whose presence says a model directory has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: Layers of the embedded default checkpoint (TinyLlama-1.1B's shape; 438 MB in bf16).
DEMO_LAYERS = 2


def run_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: writes a deterministic synthetic checkpoint,
    quantizes it as ``qlorakit quantize`` does, and verifies the result against it."""
    from qlorakit.synthetic import write_synthetic_llama

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qlorakit-demo-"))
    source, output = workdir / "tinyllama-demo-bf16", workdir / "tinyllama-demo-4bit"
    print(
        f"qlorakit {__version__} demo: TinyLlama-1.1B's architecture, first {args.layers} layers, "
        "deterministic synthetic bf16 weights"
    )
    try:
        if not source.exists():
            params = write_synthetic_llama(source, layers=args.layers)
            print(f"wrote the source checkpoint: {params / 1e6:.1f} M parameters -> {source}")
        print(f"$ qlorakit quantize {source} {output} --quant-type {args.quant_type} --blocksize {args.blocksize}")
        report = quantize_checkpoint(
            source,
            output,
            quant_type=args.quant_type,
            blocksize=args.blocksize,
            double_quant=args.double_quant,
            force=True,
            progress=True,
        )
        print(report.summary())
        verified = verify_checkpoint(output, against=source)
        errors = verified.per_tensor_error.values()
        print(
            f"verify: {verified.tensors_checked} checksums and {verified.weights_decoded} decoded weights "
            f"{'OK' if verified.ok else 'FAILED'}; relative error vs source: mean "
            f"{sum(errors) / len(errors):.4f}, worst {max(errors):.4f}"
        )
        return 0 if verified.ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_quantize(args: argparse.Namespace) -> int:
    hessians = None
    if args.calibration_text:
        from qlorakit.calibration import hessians_from_text, read_calibration_text

        text = read_calibration_text(args.calibration_text)
        hessians = hessians_from_text(args.src, text, args.calibration_length, args.calibration_sequences)
        if not args.quiet:
            print(f"calibration: H of {len(hessians.names())} linear layers over {hessians.tokens} tokens")
    report = quantize_checkpoint(
        args.src,
        args.dst,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        skip=args.skip,
        rule="names" if args.name_rule else "transformers",
        scale_search=args.scale_search,
        importance=args.importance,
        hessians=hessians,
        threads=args.threads,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(report.summary())
    return 0


def run_merge(args: argparse.Namespace) -> int:
    import torch

    import qlorakit
    from qlorakit.calibration import read_calibration_text, text_batches

    text = read_calibration_text(args.calibration_text) if args.calibration_text else None
    model = qlorakit.from_pretrained(args.base, compute_dtype=torch.float32)
    qlorakit.load_adapter(model, args.adapter)
    tokenizer, batches = None, None
    if text is not None or any((Path(args.base) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.base)
    if text is not None:
        batches = text_batches(tokenizer, text, args.calibration_length, args.calibration_sequences)
    report = qlorakit.save_merged(
        model,
        args.out,
        requantize=args.requantize,
        calibration=batches,
        force=args.force,
        tokenizer=tokenizer,
        scale_search=args.scale_search,
        threads=args.threads,
    )
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


def run_importance(args: argparse.Namespace) -> int:
    from qlorakit.importance import importance_from_text, save_importance

    text = Path(args.text).read_text(encoding="utf-8")
    samples = [p.strip() for p in text.split("\n\n") if p.strip()][: args.max_samples]
    if not samples:
        raise ValueError(f"{args.text}: no text")
    vectors = importance_from_text(args.src, samples, max_length=args.max_length)
    path = save_importance(vectors, args.out)
    print(f"importance of {len(vectors)} linear layers over {len(samples)} samples -> {path}")
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


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose the calibration text (shared by ``quantize`` and ``merge``)."""
    parser.add_argument(
        "--calibration-text",
        metavar="FILE",
        help="UTF-8 text to calibrate on: each layer's codes are chosen (GPTQ) to reproduce its outputs on "
        "the model's activations over this text, not just its weights (same format)",
    )
    parser.add_argument(
        "--calibration-length",
        type=positive_int,
        default=512,
        metavar="N",
        help="tokens per calibration sequence (default 512)",
    )
    parser.add_argument(
        "--calibration-sequences",
        type=positive_int,
        default=64,
        metavar="N",
        help="most calibration sequences to use from the text (default 64)",
    )


def add_format_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose the 4-bit format (shared by ``demo`` and ``quantize``)."""
    parser.add_argument(
        "--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit code table: nf4 (default) or fp4 (e2m1)"
    )
    parser.add_argument(
        "--blocksize",
        type=int,
        choices=BLOCKSIZES,
        default=DEFAULT_BLOCKSIZE,
        metavar="N",
        help=f"elements per absmax block, one of {', '.join(map(str, BLOCKSIZES))} (default {DEFAULT_BLOCKSIZE})",
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="store the block scales as float32 instead of double-quantizing them to 8 bits",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def shard_size(text: str) -> str:
    """argparse type: a size ``parse_size`` reads (checked here, so a bad one is a usage error)."""
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Parser(argparse.ArgumentParser):
    """Reports an unknown option with the usage of the subcommand it was given to and, for a
    near miss, the option meant."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):  # noqa: ANN201
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommands().get(getattr(parsed, "command", None) or "", self)
            options = [o for action in command._actions for o in action.option_strings]
            hints = [
                f"{extra}: did you mean {match[0]}?"
                for extra in extras
                if (match := difflib.get_close_matches(extra.split("=")[0], options, n=1))
            ]
            command.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(f"\n  {h}" for h in hints))
        return parsed

    def _subcommands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlorakit", description="QLoRA on little hardware.")
    parser.add_argument("--version", action="version", version=f"qlorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="quantize an embedded default checkpoint (synthetic TinyLlama-shaped, 2 layers) and verify it"
    )
    demo.add_argument("--layers", type=int, default=DEMO_LAYERS, help=f"decoder layers (default {DEMO_LAYERS})")
    demo.add_argument("--workdir", help="keep the source and output here (default: a temporary directory)")
    add_format_options(demo)

    quantize = commands.add_parser(
        "quantize",
        help="quantize a safetensors checkpoint into a bitsandbytes-format 4-bit model directory",
        description="Quantize SRC (a Hugging Face model directory or a .safetensors file) into DST, a model "
        "directory that transformers + bitsandbytes and qlorakit load. DST is written atomically.",
    )
    quantize.add_argument("src", help="source model directory or .safetensors file (read only)")
    quantize.add_argument("dst", help="destination directory (must not exist unless --force)")
    add_format_options(quantize)
    quantize.add_argument(
        "--scale-search",
        action="store_true",
        help="choose each block's scale to minimize its reconstruction error (same format, lower error)",
    )
    quantize.add_argument(
        "--importance",
        metavar="FILE",
        help="with --scale-search: per-input-column importance vectors (qlorakit importance) weighting the error",
    )
    add_calibration_options(quantize)
    quantize.add_argument(
        "--compute-dtype",
        choices=tuple(COMPUTE_DTYPES),
        default="bf16",
        help="dtype the 4-bit layers compute in, recorded as bnb_4bit_compute_dtype (default bf16)",
    )
    quantize.add_argument(
        "--skip", nargs="+", default=[], metavar="PATTERN", help="module names/regexes to keep unquantized"
    )
    quantize.add_argument(
        "--name-rule",
        action="store_true",
        help="select 2-D weights by name instead of asking transformers which layers bitsandbytes converts "
        "(for a model class transformers cannot build; transformers may not load the output)",
    )
    # The transformers rule is the default now; the old opt-in flag is accepted and does nothing.
    quantize.add_argument("--transformers-rule", action="store_true", help=argparse.SUPPRESS)
    quantize.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="worker threads for quantization (default: all cores)",
    )
    quantize.add_argument(
        "--max-shard-size",
        type=shard_size,
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest output file, e.g. 5GB, 500MB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    quantize.add_argument("--force", action="store_true", help="replace DST if it exists")
    quantize.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base and save the result (4-bit with --requantize)",
        description="Merge the LoRA adapter ADAPTER (PEFT format) into BASE (a packed 4-bit or full-precision "
        "model directory) and write the merged model to OUT, in full precision or, with --requantize, as a "
        "bitsandbytes-format 4-bit checkpoint; --calibration-text then re-quantizes with error compensation "
        "against the adapter model's own activations. OUT is written atomically.",
    )
    merge.add_argument("base", help="base model directory the adapter was trained on (read only)")
    merge.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("out", help="destination directory (must not exist unless --force)")
    merge.add_argument("--requantize", action="store_true", help="write a 4-bit checkpoint instead of a float one")
    add_calibration_options(merge)
    merge.add_argument(
        "--scale-search",
        action="store_true",
        help="with --requantize: error-optimal block scales (with calibration, the scales GPTQ rounds against)",
    )
    merge.add_argument(
        "--threads", type=positive_int, default=None, metavar="N", help="worker threads (default: all cores)"
    )
    merge.add_argument("--force", action="store_true", help="replace OUT if it exists")

    importance = commands.add_parser(
        "importance",
        help="measure per-input-column importance (mean squared activations) of a float model on text",
        description="Run the float model at SRC over the paragraphs of a text file and write, for every linear "
        "layer, the mean squared activation of each input column to OUT (safetensors), for "
        "'qlorakit quantize --scale-search --importance OUT'.",
    )
    importance.add_argument("src", help="float model directory (config.json, weights, tokenizer)")
    importance.add_argument("out", help="output .safetensors file")
    importance.add_argument("--text", required=True, help="UTF-8 text; blank-line separated paragraphs are the samples")
    importance.add_argument("--max-samples", type=int, default=200, help="paragraphs to use (default 200)")
    importance.add_argument("--max-length", type=int, default=512, help="tokens per sample (default 512)")

    inspect = commands.add_parser("inspect", help="show what a checkpoint directory or file holds")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    verify = commands.add_parser("verify", help="re-check checksums and decodability (and error vs the source)")
    verify.add_argument("path")
    verify.add_argument("--against", metavar="SRC", help="source checkpoint to measure reconstruction error against")
    return parser


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit code 2) for options that do not go together."""
    command = parser._subcommands().get(args.command) if isinstance(parser, _Parser) else None
    if command is None:
        return
    if args.command == "quantize" and args.calibration_text and args.importance:
        command.error("--calibration-text and --importance do not go together (calibration measures the full H)")
    if args.command == "merge" and not args.requantize and (args.calibration_text or args.scale_search):
        command.error("--calibration-text and --scale-search apply only with --requantize")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script. Exit codes: 0 ok, 1 failure, 2 usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    commands = {
        "demo": lambda: run_demo(args),
        "quantize": lambda: run_quantize(args),
        "merge": lambda: run_merge(args),
        "importance": lambda: run_importance(args),
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
