"""Write a deterministic bf16 Llama checkpoint with TinyLlama-1.1B's shape, for benchmarks.

Run from the repository root with the dev venv active::

    source /work/devenv/bin/activate
    python tools/make_test_checkpoint.py                                  # full size: 22 layers, 2.2 GB, 3 shards
    python tools/make_test_checkpoint.py --layers 2 --out /tmp/tiny-2l    # small variant for smoke tests
    python tools/make_test_checkpoint.py --max-shard-size 500MB --force   # more, smaller shards
    python tools/make_test_checkpoint.py --checksums --force              # also print each file's sha256

The model is TinyLlama-1.1B's architecture (hidden 2048, intermediate 5632, 22 layers, 32
heads, 4 kv heads, vocab 32000, untied lm_head) with synthetic weights: normal(0, 0.02) for
embeddings and linear weights, ones for the RMSNorm weights. It is built on the meta device
(no default initialization runs), given uninitialized bf16 CPU storage, and each tensor is
filled in place from its own generator, seeded from the base seed and the tensor's name, so
the bytes depend neither on the fill order nor on the thread count, and ``--layers N`` gives
the first N layers of the full model. Peak memory is about the size of the checkpoint.

``save_pretrained`` writes a normal Hugging Face directory: ``config.json`` (architectures
LlamaForCausalLM, dtype bfloat16), ``generation_config.json``, and either
``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``. Nothing is fetched from the hub; no tokenizer is written.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qlorakit.synthetic import TINYLLAMA_LAYERS, empty_model, fill_weights, tinyllama_config

DEFAULT_OUT = "/tmp/qlorakit-tinyllama-1.1b"
DEFAULT_LAYERS = TINYLLAMA_LAYERS
DEFAULT_MAX_SHARD_SIZE = "1GB"
DEFAULT_SEED = 0
HASH_CHUNK = 16 << 20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help=f"decoder layers (default {DEFAULT_LAYERS})")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"save_pretrained's max_shard_size (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    parser.add_argument("--checksums", action="store_true", help="print the sha256 of every written file")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    return args


def prepare_out(out: Path, force: bool) -> None:
    """Refuses to overwrite OUT unless ``force``; removes it when forced."""
    if out.exists():
        if not force:
            sys.exit(f"error: {out} exists (pass --force to replace it)")
        shutil.rmtree(out)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def describe(out: Path, checksums: bool) -> None:
    """Lists the written files with sizes (and sha256 when asked)."""
    for path in sorted(out.iterdir()):
        line = f"  {path.name:<40} {path.stat().st_size / 1e6:10.1f} MB"
        if checksums:
            line += f"  sha256 {sha256_file(path)}"
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Builds, fills and saves the checkpoint, printing the time of each phase."""
    args = parse_args(argv)
    out = Path(args.out)
    prepare_out(out, args.force)
    start = time.perf_counter()
    model = empty_model(tinyllama_config(args.layers))
    built = time.perf_counter()
    params = fill_weights(model, args.seed)
    filled = time.perf_counter()
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    saved = time.perf_counter()
    print(
        f"wrote {out}: {args.layers} layers, {params / 1e6:.1f} M parameters, "
        f"{2 * params / 1e9:.2f} GB bf16, max shard {args.max_shard_size}"
    )
    describe(out, args.checksums)
    print(
        f"time {saved - start:.1f} s (build {built - start:.1f} s, fill {filled - built:.1f} s, "
        f"save {saved - filled:.1f} s); peak RSS {peak_rss_gib():.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
