"""QLoRA against LoRA on a small byte-level Llama trained on this machine's Python standard library.

    python tools/train_lora.py                    # full experiment (a few minutes on 2 cores)
    python tools/train_lora.py --quick            # tiny sizes and steps (what the test runs)
    python tools/train_lora.py --pretrain-steps 1000 --finetune-steps 400 --workdir /tmp/tl --threads 2
    python tools/train_lora.py --merge --finetune-lr 2e-4   # + merged 4-bit checkpoints: plain vs GPTQ

What it does, deterministically (seeded model init, seeded data order, fixed thread count):

1. Data: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (sorted relative paths; third-party
   ``site-packages`` and the 17 MB regression suite ``test/`` left out), tokenized as raw bytes (vocabulary 256,
   a NUL byte between files; no tokenizer to download). Split by file: the packages ``asyncio/`` and ``email/``
   are held out as the fine-tuning domain (every fifth of their files, in sorted order, is the eval split);
   every other file is the pretraining corpus. The three splits share no file.
2. Pretraining: a small Llama-shaped ``LlamaForCausalLM`` (float32, AdamW, warmup + cosine) on the pretraining
   corpus, saved with ``save_pretrained`` in bfloat16.
3. QLoRA: ``qlorakit.quantize_checkpoint`` (NF4, blocksize 64, double quantization) of that checkpoint,
   ``qlorakit.load_packed(..., compute_dtype=torch.float32)``, ``qlorakit.add_lora`` on every linear projection
   (q/k/v/o, gate/up/down; not ``lm_head``), AdamW on the adapters over the held-out training split.
4. LoRA: the same fine-tune (same config, same adapter init seed, same batches in the same order) on the
   unquantized bf16 checkpoint loaded with ``from_pretrained(dtype=torch.float32)``.

Why float32 compute: the 4-bit weights are dequantized to float32 and the tensors ``load_packed`` keeps as
stored (embeddings, norms, ``lm_head``, bf16 in the checkpoint) are widened to float32, so both runs compute in
the same precision from the same bf16 checkpoint and the only difference between them is NF4 quantization of
the projection weights. float32 matmuls are also the fast, well-trodden path of torch on a CPU (bf16 autograd on
CPU is slower unless the CPU has AVX512-BF16/AMX, and its 8-bit mantissa adds noise to a small model's loss).

5. With ``--merge``: the QLoRA adapter merged into a 4-bit checkpoint twice, by plain re-quantization
   (``save_merged(requantize=True)``) and calibrated on windows of the fine-tuning split
   (``save_merged(requantize=True, calibration=...)``, GPTQ against the adapter model's activations), each
   loaded back and compared with the unmerged adapter model on the eval split: per-token KL and the share of
   the adapter's eval-loss gain over the base that the merged model keeps.

Prints the pretraining loss curve, both fine-tuning curves side by side, the eval loss of each base before
fine-tuning and after it, the relative gap ``(QLoRA - LoRA) / LoRA`` of the final eval losses, and wall times.
``run(args)`` returns the same numbers as a dict (for tests).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

HELD_OUT_PACKAGES = ("asyncio", "email")  # the fine-tuning domain: async event loops and RFC mail handling
EXCLUDED_TOP_LEVEL = ("site-packages", "dist-packages", "test")  # third-party code; CPython's own test suite
EVAL_EVERY_NTH_FILE = 5  # of the held-out files (sorted), every 5th is the eval split
FILE_SEPARATOR = 0  # a NUL byte between files


@dataclass(frozen=True)
class Sizes:
    """Model shape, batch shape, steps and learning rates of one experiment."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688  # ~2.7x hidden, Llama's SwiGLU ratio
    seq_len: int = 128
    batch: int = 16
    pretrain_steps: int = 400
    pretrain_lr: float = 2e-3
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    log_every: int = 20
    eval_every: int = 40  # a multiple of log_every
    eval_sequences: int = 256


QUICK = Sizes(  # ~13 s on 2 quiet cores; what tests/test_train_lora.py runs
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=176,
    seq_len=64,
    batch=16,
    pretrain_steps=300,
    pretrain_lr=3e-3,
    finetune_steps=150,
    finetune_lr=1e-2,
    lora_r=16,
    lora_alpha=32,
    log_every=10,
    eval_every=50,
    eval_sequences=64,
)


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Corpus:
    """Byte streams of the three splits and the files they came from (relative paths)."""

    pretrain: torch.Tensor
    finetune: torch.Tensor
    eval: torch.Tensor
    pretrain_files: list[str]
    finetune_files: list[str]
    eval_files: list[str]


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``*.py`` files under ``root``, sorted, without the excluded top-level
    directories. ``os.walk`` does not follow symlinks, so the list is the same on every run."""
    found = []
    for directory, subdirs, files in os.walk(root):
        rel_dir = Path(directory).relative_to(root)
        if rel_dir == Path("."):
            subdirs[:] = [d for d in subdirs if d not in EXCLUDED_TOP_LEVEL]
        found.extend((rel_dir / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(found)


def _stream(root: Path, files: Sequence[str]) -> torch.Tensor:
    """The files' bytes, each followed by the separator, as a uint8 tensor."""
    data = bytearray()
    for name in files:
        data += (root / name).read_bytes()
        data.append(FILE_SEPARATOR)
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def load_corpus(root: Path) -> Corpus:
    """Splits the standard library by file: held-out packages → fine-tune/eval, the rest → pretraining."""
    files = stdlib_files(root)
    held_out = [f for f in files if f.split("/", 1)[0] in HELD_OUT_PACKAGES]
    pretrain = [f for f in files if f.split("/", 1)[0] not in HELD_OUT_PACKAGES]
    eval_files = held_out[::EVAL_EVERY_NTH_FILE]
    eval_set = set(eval_files)
    finetune = [f for f in held_out if f not in eval_set]
    if not pretrain or not finetune or not eval_files:
        raise RuntimeError(f"{root}: expected stdlib sources with the packages {HELD_OUT_PACKAGES}")
    return Corpus(
        _stream(root, pretrain), _stream(root, finetune), _stream(root, eval_files), pretrain, finetune, eval_files
    )


def batch_starts(stream_len: int, seq_len: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` random window starts, from a generator seeded with ``seed`` (the data order)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, stream_len - seq_len, (steps, batch), generator=generator)


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 token windows ``[len(starts), seq_len]`` of ``stream``."""
    index = starts.unsqueeze(1) + torch.arange(seq_len)
    return stream[index].long()


def eval_windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping windows spread evenly over ``stream`` (fixed, no randomness)."""
    available = len(stream) // seq_len
    picks = torch.linspace(0, available - 1, min(count, available)).round().long()
    return windows(stream, picks * seq_len, seq_len)


# ---------------------------------------------------------------------------------------------------------------
# Training


def llama_config(sizes: Sizes) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=sizes.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=FILE_SEPARATOR,
        pad_token_id=None,
    )


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte) of ``model`` on ``ids`` ``[batch, seq_len]``."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


@torch.no_grad()
def eval_loss(model: torch.nn.Module, ids: torch.Tensor, batch: int) -> float:
    """Mean next-byte cross-entropy over all of ``ids`` (every window has the same length)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        total += lm_loss(model, chunk).item() * len(chunk)
    model.train(was_training)
    return total / len(ids)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``peak / 10``; ``step`` counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    stream: torch.Tensor,
    starts: torch.Tensor,
    sizes: Sizes,
    lr: float,
    weight_decay: float,
    label: str,
    eval_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """AdamW on the trainable parameters of ``model`` over the batches ``starts`` selects; logs the mean train
    loss every ``log_every`` steps (and the eval loss every ``eval_every`` steps when ``eval_ids`` is given)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    steps = len(starts)
    warmup = max(1, steps // 20)
    model.train()
    curve: list[tuple[int, float]] = []
    eval_curve: list[tuple[int, float]] = []
    window: list[float] = []
    begin = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = lm_loss(model, windows(stream, starts[step], sizes.seq_len))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append(loss.item())
        done = step + 1
        if done % sizes.log_every == 0 or done == steps:
            curve.append((done, sum(window) / len(window)))
            line = f"[{label}] step {done:5d}/{steps}  train loss {curve[-1][1]:.4f}"
            if eval_ids is not None and (done % sizes.eval_every == 0 or done == steps):
                eval_curve.append((done, eval_loss(model, eval_ids, sizes.batch)))
                line += f"  eval loss {eval_curve[-1][1]:.4f}"
            elapsed = time.perf_counter() - begin
            print(f"{line}  ({elapsed:.1f} s, {1000 * elapsed / done:.0f} ms/step)", flush=True)
            window = []
    return {"curve": curve, "eval_curve": eval_curve, "seconds": time.perf_counter() - begin}


def finetune(
    model: torch.nn.Module, corpus: Corpus, eval_ids: torch.Tensor, sizes: Sizes, seed: int, label: str
) -> dict[str, Any]:
    """Adds LoRA adapters (init seeded with ``seed``) and trains them on the fine-tuning split, with the batches
    seeded by ``seed`` too, so two calls with the same seed see the same adapters and data."""
    import qlorakit

    config = qlorakit.LoraConfig(r=sizes.lora_r, lora_alpha=sizes.lora_alpha, target_modules="all-linear")
    torch.manual_seed(seed)
    qlorakit.add_lora(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_init = sum(float(p.detach().double().sum()) for n, p in model.named_parameters() if "lora_A" in n)
    start = eval_loss(model, eval_ids, sizes.batch)
    print(f"[{label}] {trainable / 1e3:.1f} k trainable adapter parameters; eval loss before fine-tuning {start:.4f}")
    starts = batch_starts(len(corpus.finetune), sizes.seq_len, sizes.batch, sizes.finetune_steps, seed)
    result = train(model, corpus.finetune, starts, sizes, sizes.finetune_lr, 0.0, label, eval_ids)
    result.update(
        eval_start=start,
        eval_final=result["eval_curve"][-1][1],
        trainable_params=trainable,
        adapter_init_checksum=adapter_init,
        lora_config=config,
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# The experiment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=None, help=f"default {Sizes.pretrain_steps}")
    parser.add_argument("--finetune-steps", type=int, default=None, help=f"default {Sizes.finetune_steps}")
    parser.add_argument("--quick", action="store_true", help="tiny model, data and step counts (seconds, for tests)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch and quantizer threads (default: all)")
    parser.add_argument("--stdlib", type=Path, default=None, help="source root (default: this Python's stdlib)")
    parser.add_argument("--finetune-lr", type=float, default=None, help="adapter learning rate (default per size)")
    parser.add_argument("--merge", action="store_true", help="also compare merged 4-bit checkpoints: plain vs GPTQ")
    parser.add_argument(
        "--calibration-sequences", type=int, default=32, help="fine-tuning-split windows to calibrate on (--merge)"
    )
    return parser


def run(args: argparse.Namespace | Sequence[str]) -> dict[str, Any]:
    """Runs the whole experiment; returns the losses (curves, start/final eval losses of QLoRA and LoRA, the
    relative gap), sizes and wall times. ``args`` is parsed arguments or an argv list."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(list(args))
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # save/load bars would interleave with the loss log
    try:  # the thread count and transformers' log level are process-wide: restored afterwards
        if args.workdir is None:
            with tempfile.TemporaryDirectory(prefix="qlorakit-train-lora-") as tmp:
                return _run(args, Path(tmp))
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()


def _run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import transformers

    import qlorakit
    from qlorakit.nn import Linear4bit

    wall_begin = time.perf_counter()
    transformers.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    if args.pretrain_steps is not None:
        sizes = replace(sizes, pretrain_steps=args.pretrain_steps)
    if args.finetune_steps is not None:
        sizes = replace(sizes, finetune_steps=args.finetune_steps)
    if args.finetune_lr is not None:
        sizes = replace(sizes, finetune_lr=args.finetune_lr)
    if sizes.pretrain_steps < 1 or sizes.finetune_steps < 1:
        raise ValueError("--pretrain-steps and --finetune-steps must be positive")
    times: dict[str, float] = {}

    begin = time.perf_counter()
    root = args.stdlib or Path(sysconfig.get_paths()["stdlib"])
    corpus = load_corpus(root)
    eval_ids = eval_windows(corpus.eval, sizes.seq_len, sizes.eval_sequences)
    times["data"] = time.perf_counter() - begin
    print(f"data: {root} ({sys.version.split()[0]}), byte-level tokens, vocabulary 256")
    print(f"  pretrain: {len(corpus.pretrain_files)} files, {len(corpus.pretrain) / 1e6:.2f} M tokens")
    print(
        f"  fine-tune ({'/, '.join(HELD_OUT_PACKAGES)}/): {len(corpus.finetune_files)} files, "
        f"{len(corpus.finetune) / 1e3:.0f} k tokens; eval: {len(corpus.eval_files)} other files of the same "
        f"packages, {len(corpus.eval) / 1e3:.0f} k tokens, {len(eval_ids)} x {sizes.seq_len}-token windows"
    )
    print(f"sizes: {sizes}; seed {args.seed}; {torch.get_num_threads()} threads")

    # 2. Pretraining (float32), saved in bf16.
    config = llama_config(sizes)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).float()
    params = sum(p.numel() for p in model.parameters())
    print(f"\npretraining a {sizes.layers}-layer Llama, hidden {sizes.hidden}, {params / 1e6:.2f} M parameters")
    starts = batch_starts(len(corpus.pretrain), sizes.seq_len, sizes.batch, sizes.pretrain_steps, args.seed)
    pretrain = train(model, corpus.pretrain, starts, sizes, sizes.pretrain_lr, 0.1, "pretrain")
    times["pretrain"] = pretrain["seconds"]
    base_dir = workdir / "base-bf16"
    model.to(torch.bfloat16).save_pretrained(base_dir)
    del model

    # 3. QLoRA: quantize the bf16 checkpoint, load it 4-bit, fine-tune adapters.
    begin = time.perf_counter()
    packed_dir = workdir / "base-nf4"
    report = qlorakit.quantize_checkpoint(base_dir, packed_dir, compute_dtype="fp32", threads=args.threads, force=True)
    times["quantize"] = time.perf_counter() - begin
    print(f"\n{report.summary()}")
    qmodel = qlorakit.load_packed(packed_dir, compute_dtype=torch.float32)
    qmodel.to(torch.float32)  # the tensors kept as stored (embeddings, norms, lm_head) are bf16: widen them
    n4 = sum(isinstance(m, Linear4bit) for m in qmodel.modules())
    print(f"\nQLoRA: {n4} Linear4bit layers (NF4, compute float32) + LoRA r={sizes.lora_r}, alpha={sizes.lora_alpha}")
    qlora = finetune(qmodel, corpus, eval_ids, sizes, args.seed + 1, "qlora")
    times["qlora"] = qlora["seconds"]
    qlorakit.save_adapter(qmodel, workdir / "qlora-adapter", qlora["lora_config"])
    del qmodel
    merge = None
    if args.merge:
        begin = time.perf_counter()
        merge = merge_comparison(packed_dir, workdir, corpus, eval_ids, sizes, qlora, args)
        times["merge"] = time.perf_counter() - begin

    # 4. LoRA on the unquantized bf16 checkpoint, in float32, same adapters init and data order.
    lmodel = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    print(f"\nLoRA: bf16 checkpoint in float32 (nn.Linear) + LoRA r={sizes.lora_r}, alpha={sizes.lora_alpha}")
    lora = finetune(lmodel, corpus, eval_ids, sizes, args.seed + 1, "lora")
    times["lora"] = lora["seconds"]
    del lmodel
    times["total"] = time.perf_counter() - wall_begin

    for run_result in (qlora, lora):
        del run_result["lora_config"]
    gap = (qlora["eval_final"] - lora["eval_final"]) / lora["eval_final"]
    base_gap = (qlora["eval_start"] - lora["eval_start"]) / lora["eval_start"]
    result = {
        "sizes": asdict(sizes),
        "params": params,
        "pretrain": pretrain,
        "qlora": qlora,
        "lora": lora,
        "relative_gap": gap,
        "base_relative_gap": base_gap,
        "quant_mean_relative_error": report.mean_relative_error,
        "times": times,
        **({"merge": merge} if merge is not None else {}),
    }
    print_summary(result)
    return result


@torch.no_grad()
def mean_kl(reference: torch.Tensor, model: torch.nn.Module, ids: torch.Tensor, batch: int) -> float:
    """Mean per-token KL(reference || model) over ``ids``, ``reference`` the log-probabilities
    ``[len(ids), seq_len, vocab]`` of the reference model."""
    total = 0.0
    for i in range(0, len(ids), batch):
        actual = torch.log_softmax(model(input_ids=ids[i : i + batch]).logits.float(), dim=-1)
        expected = reference[i : i + batch]
        total += float((expected.exp() * (expected - actual)).sum())
    return total / reference.shape[:-1].numel()


def merge_comparison(
    packed_dir: Path,
    workdir: Path,
    corpus: Corpus,
    eval_ids: torch.Tensor,
    sizes: Sizes,
    qlora: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Merges the QLoRA adapter into 4-bit checkpoints (plain re-quantization; GPTQ calibrated on windows of
    the fine-tuning split, with absmax and with searched block scales) and measures each against the unmerged
    adapter model on the eval split."""
    import qlorakit

    def adapter_model() -> torch.nn.Module:
        model = qlorakit.load_packed(packed_dir, compute_dtype=torch.float32).to(torch.float32)
        qlorakit.load_adapter(model, workdir / "qlora-adapter")
        return model.eval()

    with torch.no_grad():
        reference = adapter_model()
        expected = torch.cat(
            [
                torch.log_softmax(reference(input_ids=eval_ids[i : i + sizes.batch]).logits.float(), dim=-1)
                for i in range(0, len(eval_ids), sizes.batch)
            ]
        )
    del reference
    calibration_ids = eval_windows(corpus.finetune, sizes.seq_len, args.calibration_sequences)
    calibration = list(calibration_ids.split(sizes.batch))
    base_eval, adapter_eval = qlora["eval_start"], qlora["eval_final"]
    results: dict[str, Any] = {}
    variants = (("plain", None, False), ("gptq", calibration, False), ("gptq+search", calibration, True))
    print(f"\nmerge: adapter folded into 4-bit checkpoints; calibration {len(calibration_ids)} fine-tuning windows")
    for name, batches, search in variants:
        begin = time.perf_counter()
        report = qlorakit.save_merged(
            adapter_model(),
            workdir / f"merged-{name}",
            requantize=True,
            calibration=batches,
            force=True,
            compute_dtype="fp32",
            scale_search=search,
            threads=args.threads,
        )
        seconds = time.perf_counter() - begin
        merged = qlorakit.load_packed(report.directory, compute_dtype=torch.float32).to(torch.float32)
        loss = eval_loss(merged, eval_ids, sizes.batch)
        gptq = report.quantize.gptq if report.quantize is not None else None
        results[name] = {
            "eval_loss": loss,
            "kl": mean_kl(expected, merged, eval_ids, sizes.batch),
            "gain_kept": (base_eval - loss) / (base_eval - adapter_eval) if base_eval != adapter_eval else 0.0,
            "output_error_reduction": gptq.reduction if gptq is not None else 0.0,
            "seconds": seconds,
        }
    results["kl_ratio"] = results["gptq"]["kl"] / results["plain"]["kl"] if results["plain"]["kl"] else 0.0
    print(f"  base eval loss {base_eval:.4f}, adapter model {adapter_eval:.4f}")
    print(
        f"  {'merged 4-bit':<14} {'eval loss':>10} {'gain kept':>10} {'KL to adapter':>14} {'out err':>8} {'time':>7}"
    )
    for name, _, _ in variants:
        r = results[name]
        print(
            f"  {name:<14} {r['eval_loss']:10.4f} {100 * r['gain_kept']:9.1f}% {r['kl']:14.5f} "
            f"{-100 * r['output_error_reduction']:7.1f}% {r['seconds']:6.1f}s"
        )
    print(f"  KL(gptq) / KL(plain) = {results['kl_ratio']:.3f}")
    return results


def print_summary(result: dict[str, Any]) -> None:
    qlora, lora, times = result["qlora"], result["lora"], result["times"]
    print("\nfine-tuning curves (mean train loss over the logging interval; eval on the held-out eval files)")
    print(f"{'step':>6} {'QLoRA train':>12} {'LoRA train':>11} {'QLoRA eval':>11} {'LoRA eval':>10}")
    q_eval, l_eval = dict(qlora["eval_curve"]), dict(lora["eval_curve"])
    print(f"{0:6d} {'':>12} {'':>11} {qlora['eval_start']:11.4f} {lora['eval_start']:10.4f}")
    for (step, q), (_, lo) in zip(qlora["curve"], lora["curve"], strict=True):
        qe = f"{q_eval[step]:11.4f}" if step in q_eval else f"{'':>11}"
        le = f"{l_eval[step]:10.4f}" if step in l_eval else f"{'':>10}"
        print(f"{step:6d} {q:12.4f} {lo:11.4f} {qe} {le}")
    print("\neval loss (nats/byte)     before fine-tuning   after    change")
    for name, r in (("QLoRA (NF4 base)", qlora), ("LoRA (bf16 base)", lora)):
        change = (r["eval_final"] - r["eval_start"]) / r["eval_start"]
        print(f"  {name:<22} {r['eval_start']:14.4f} {r['eval_final']:9.4f} {100 * change:+8.1f}%")
    print(
        f"QLoRA vs LoRA: base eval loss {100 * result['base_relative_gap']:+.2f}% from quantization "
        f"(mean relative weight error {result['quant_mean_relative_error']:.4f}); "
        f"after fine-tuning {100 * result['relative_gap']:+.2f}%"
    )
    print(
        "wall time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items() if k != "total")
        + f"; total {times['total']:.1f} s"
        + f" (QLoRA {1000 * qlora['seconds'] / qlora['curve'][-1][0]:.0f} ms/step,"
        + f" LoRA {1000 * lora['seconds'] / lora['curve'][-1][0]:.0f} ms/step incl. evals)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
