"""Whole-model CPU benchmark: QLoRA train steps and greedy generation, qlorakit against transformers +
bitsandbytes + PEFT on the same packed checkpoint (issue 14).

Run from the repository root with the dev venv active::

    python tools/bench_model.py                          # both default shapes, 2 threads
    python tools/bench_model.py --models h1024 --parts train --repeats 3
    python tools/bench_model.py --full                   # + the 1.1B TinyLlama-shaped model (slow)
    python tools/bench_model.py --json /tmp/bench.json   # the figures as JSON too
    python tools/bench_model.py --profile 25             # + torch.profiler's top ops of one train step each

Models: random-init Llamas built from a transformers ``LlamaConfig`` (TinyLlama's vocabulary and head size,
``qlorakit.synthetic``'s seeded normal(0, 0.02) weights), saved in bf16 and quantized once with
``qlorakit.quantize_checkpoint`` (NF4, blocksize 64, double quantization, bf16 compute), kept under
``--workdir``. ``h1024``: 4 layers, hidden 1024; ``h2048``: 2 layers, hidden 2048; ``tinyllama`` (``--full``):
22 layers, hidden 2048. Both libraries load that one packed directory: qlorakit with
``qlorakit.from_pretrained``, bitsandbytes with ``AutoModelForCausalLM.from_pretrained`` (the directory's
``config.json`` carries bitsandbytes' ``quantization_config``); both keep the unquantized tensors in bf16 and
compute in bf16.

What is timed (best of ``--repeats`` after one untimed warm-up call each, candidates interleaved round-robin
with a short pause before each call, so a burst of load from another process hits every candidate alike):

* ``train``: one QLoRA step, ``model(input_ids, labels=input_ids).loss.backward()``, ``AdamW.step()``,
  ``zero_grad`` on a fixed random batch (``--batch``, default 2x256 tokens), LoRA r=16, alpha 32, dropout 0 on all
  seven projections (q/k/v/o, gate/up/down), float32 adapters (PEFT's default, qlorakit's default), torch's
  AdamW on the adapter parameters only. Three routes: ``qlorakit + add_lora`` (qlorakit's own LoRA),
  ``qlorakit + PEFT`` (``peft.get_peft_model`` on a ``qlorakit.from_pretrained`` model) and ``bnb + PEFT``.
  The adapters of all three start equal (copied from the first), so the losses of their first steps agree.
* ``generate``: ``model.generate`` greedy, batch 1, ``--new-tokens`` (32) new tokens after a ``--prompt``-token
  (8) prompt, ``use_cache=True`` (the time includes the prompt's prefill); base models without adapters:
  qlorakit, bitsandbytes in train() mode (its dequantize + matmul path) and in eval() (its fused CPU kernel on an
  AVX512-BF16 CPU, the weights repacked on the first call, which the warm-up takes).
* ``rss`` (each route in a fresh subprocess, so each peak is its own): resident memory after importing torch,
  transformers, PEFT, bitsandbytes and qlorakit (the same imports for every route), and the peak after loading and
  two train steps (train routes) or one generate call (generate routes).

Ratios: ``x bnb`` is bitsandbytes' time over the route's (> 1: faster than bitsandbytes; the anchor is ``bnb +
PEFT`` for train steps and ``bnb eval()`` for generation, with ``bnb train()`` given too). Checks (printed, not
timed): the first two train-step losses of each route against bnb + PEFT's, and the generated tokens against
bitsandbytes'.

``--threads`` (default 2) must act before the libraries start their thread pools, so the environment is set
before torch, qlorakit or bitsandbytes are imported; those imports therefore live in functions.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_common import TimedCall, configure_threads, parse_dims, print_machine, time_interleaved
from bench_linear import load_line
from bench_load import current_rss_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape (TinyLlama's vocabulary, head size 64 and 8 query heads per key/value head)."""

    layers: int
    hidden: int
    intermediate: int

    @property
    def heads(self) -> int:
        return self.hidden // 64

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // 8)


MODELS = {
    "h1024": ModelShape(layers=4, hidden=1024, intermediate=2816),
    "h2048": ModelShape(layers=2, hidden=2048, intermediate=5632),
    "tinyllama": ModelShape(layers=22, hidden=2048, intermediate=5632),
}
DEFAULT_MODELS = ("h1024", "h2048")
FULL_MODEL = "tinyllama"
PARTS = ("train", "generate", "rss")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA, LR = 16, 32, 1e-4
SEED = 0
PAUSE_S = 0.05  # idle gap before each timed call: lets the previous library's spinning pool threads go to sleep
DEFAULT_WORKDIR = "/tmp/qlorakit-bench-model"
LOSS_RTOL = 2e-3  # bf16 compute, summation orders differ: the check's tolerance on a loss

TRAIN_QK_LORA = "qlorakit + add_lora"
TRAIN_QK_PEFT = "qlorakit + PEFT"
TRAIN_BNB_PEFT = "bnb + PEFT"
TRAIN_ROUTES = (TRAIN_QK_LORA, TRAIN_QK_PEFT, TRAIN_BNB_PEFT)
GEN_QK = "qlorakit"
GEN_BNB_TRAIN = "bnb train()"
GEN_BNB_EVAL = "bnb eval()"
GEN_ROUTES = (GEN_QK, GEN_BNB_TRAIN, GEN_BNB_EVAL)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="default: h1024 h2048")
    parser.add_argument("--full", action="store_true", help=f"also the 1.1B model ({FULL_MODEL})")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all")
    parser.add_argument("--threads", type=int, default=2, help="threads for qlorakit (rayon) and torch (default 2)")
    parser.add_argument("--batch", default="2x256", help="train batch x sequence length (default 2x256)")
    parser.add_argument("--prompt", type=int, default=8, help="generation prompt length in tokens (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per candidate, best kept (default 5)")
    parser.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="where checkpoints are kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--profile", type=int, default=0, help="print torch.profiler's top N ops of one train step")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "ROUTE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.prompt < 1 or args.new_tokens < 1:
        parser.error("--threads, --repeats, --prompt and --new-tokens must be >= 1")
    try:
        args.batch = parse_dims(args.batch, "batch", example="2x256", count=2)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    models = list(args.models or DEFAULT_MODELS)
    if args.full and FULL_MODEL not in models:
        models.append(FULL_MODEL)
    args.models = models
    return args


# --------------------------------------------------------------------------- checkpoints and models


def llama_config(shape: ModelShape) -> Any:
    from qlorakit.synthetic import tinyllama_config

    config = tinyllama_config(shape.layers)
    config.hidden_size = shape.hidden
    config.intermediate_size = shape.intermediate
    config.num_attention_heads = shape.heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = 64
    return config


def packed_checkpoint(name: str, workdir: Path) -> Path:
    """The packed checkpoint of model ``name`` (built once: random init, saved in bf16, quantized by qlorakit)."""
    import qlorakit
    from qlorakit.synthetic import empty_model, fill_weights

    packed = workdir / f"{name}-nf4"
    if (packed / "config.json").is_file():
        return packed
    source = workdir / f"{name}-bf16"
    if not (source / "config.json").is_file():
        model = empty_model(llama_config(MODELS[name]))
        fill_weights(model, SEED)
        model.save_pretrained(source)
        del model
    qlorakit.quantize_checkpoint(source, packed, compute_dtype="bf16", force=True)
    return packed


def load_qlorakit(packed: Path) -> nn.Module:
    import torch

    import qlorakit

    return qlorakit.from_pretrained(packed, compute_dtype=torch.bfloat16)


def load_bnb(packed: Path) -> nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(packed), device_map="cpu", dtype=torch.bfloat16)
    model.requires_grad_(False)
    return model


def peft_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS), bias="none"
    )


def train_model(route: str, packed: Path) -> nn.Module:
    """The model of a train route, adapters on, in train mode."""
    import torch

    torch.manual_seed(SEED)
    if route == TRAIN_QK_LORA:
        import qlorakit

        config = qlorakit.LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS)
        )
        model = qlorakit.add_lora(load_qlorakit(packed), config)
    else:
        import peft

        base = load_qlorakit(packed) if route == TRAIN_QK_PEFT else load_bnb(packed)
        model = peft.get_peft_model(base, peft_config())
    return model.train()


def adapter_key(name: str) -> str:
    """A LoRA parameter's name, the same for qlorakit's and PEFT's wrapping."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def copy_adapters(source: nn.Module, target: nn.Module) -> int:
    """Copies ``source``'s LoRA weights into ``target``'s (matched by :func:`adapter_key`); returns the count."""
    import torch

    theirs = {adapter_key(n): p for n, p in source.named_parameters() if p.requires_grad}
    ours = {adapter_key(n): p for n, p in target.named_parameters() if p.requires_grad}
    if theirs.keys() != ours.keys():
        raise RuntimeError(f"adapters differ: {sorted(theirs.keys() ^ ours.keys())[:4]}")
    with torch.no_grad():
        for key, param in ours.items():
            param.copy_(theirs[key])
    return len(ours)


def eval_repacked(model: nn.Module) -> bool:
    """Whether bitsandbytes repacked its 4-bit weights for the fused CPU kernel (its eval() path ran)."""
    states = [getattr(m.weight, "quant_state", None) for m in model.modules() if hasattr(m, "weight")]
    return any(bool(getattr(s, "packing_format_for_cpu", False)) for s in states if s is not None)


def dtype_summary(model: nn.Module) -> str:
    """The dtypes of the floating-point parameters, counted, with the adapters' apart."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point():
            key = f"{'adapter' if 'lora_' in name else 'base'} {str(param.dtype).removeprefix('torch.')}"
            counts[key] = counts.get(key, 0) + param.numel()
    return ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(counts.items()))


# --------------------------------------------------------------------------- timing


@dataclass
class Candidate(TimedCall):
    """A timed callable; ``times`` keeps every timed call, ``results`` every result (warm-up included)."""

    route: str
    fn: Callable[[], Any]
    best: float = math.inf
    reps: int = 0
    last: Any = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    def time_once(self) -> float:
        cpu = process_cpu_s()
        elapsed = super().time_once()
        self.cpu_times.append(process_cpu_s() - cpu)
        self.times.append(elapsed)
        return elapsed

    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.inf


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program (``VmHWM``). Not ``ru_maxrss``: Linux
    keeps that across ``exec``, so a child started by a big parent would report the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def process_cpu_s() -> float:
    """CPU seconds this process used so far, all threads (user + system): less sensitive than wall time to other
    processes on a shared machine, and it counts the time pool threads spin."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def recorded(fn: Callable[[], Any], into: list[Any]) -> Callable[[], Any]:
    def call() -> Any:
        result = fn()
        into.append(result)
        return result

    return call


def candidate(route: str, fn: Callable[[], Any]) -> Candidate:
    cand = Candidate(route, fn)
    cand.fn = recorded(fn, cand.results)
    return cand


def train_step(model: nn.Module, optimizer: Any, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1] :].tolist()


def optimizer_for(model: nn.Module) -> Any:
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


# --------------------------------------------------------------------------- parts


def bench_train(name: str, packed: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    models = {route: train_model(route, packed) for route in TRAIN_ROUTES}
    reference = models[TRAIN_ROUTES[0]]
    copied = [copy_adapters(reference, models[r]) for r in TRAIN_ROUTES[1:]]
    batch, seq = args.batch
    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, llama_config(MODELS[name]).vocab_size, (batch, seq), generator=generator)
    optimizers = {route: optimizer_for(m) for route, m in models.items()}
    candidates = [
        candidate(route, lambda m=models[route], o=optimizers[route]: train_step(m, o, ids)) for route in TRAIN_ROUTES
    ]
    before = load_line("before")
    time_interleaved(candidates, args.repeats, PAUSE_S)
    tokens = batch * seq
    result: dict[str, Any] = {
        "tokens_per_step": tokens,
        "load_before": before,
        "load_after": load_line("after "),
        "routes": {},
        "dtypes": {route: dtype_summary(m) for route, m in models.items()},
        "adapter_tensors": copied[0],
    }
    anchor = next(c for c in candidates if c.route == TRAIN_BNB_PEFT)
    for cand in candidates:
        result["routes"][cand.route] = {
            "best_s": cand.best,
            "median_s": cand.median(),
            "best_cpu_s": min(cand.cpu_times),
            "tokens_per_s": tokens / cand.best,
            "x_bnb": anchor.best / cand.best,
            "calls": cand.reps,
            "losses": cand.results[:2],
        }
    if args.profile:
        result["profile"] = {
            route: profile_step(models[route], optimizers[route], ids, args.profile) for route in TRAIN_ROUTES
        }
    del models, optimizers, candidates
    gc.collect()
    return result


def profile_step(model: nn.Module, optimizer: Any, ids: torch.Tensor, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    train_step(model, optimizer, ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, optimizer, ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench_generate(name: str, packed: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    models = {GEN_QK: load_qlorakit(packed), GEN_BNB_TRAIN: load_bnb(packed).train(), GEN_BNB_EVAL: load_bnb(packed)}
    models[GEN_BNB_EVAL].eval()
    generator = torch.Generator().manual_seed(SEED + 2)
    prompt = torch.randint(3, llama_config(MODELS[name]).vocab_size, (1, args.prompt), generator=generator)
    candidates = [
        candidate(route, lambda m=models[route]: generate(m, prompt, args.new_tokens)) for route in GEN_ROUTES
    ]
    before = load_line("before")
    time_interleaved(candidates, args.repeats, PAUSE_S)
    anchor = next(c for c in candidates if c.route == GEN_BNB_EVAL)
    anchor_train = next(c for c in candidates if c.route == GEN_BNB_TRAIN)
    result: dict[str, Any] = {
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt,
        "load_before": before,
        "load_after": load_line("after "),
        "bnb_eval_repacked": eval_repacked(models[GEN_BNB_EVAL]),
        "routes": {},
    }
    for cand in candidates:
        result["routes"][cand.route] = {
            "best_s": cand.best,
            "median_s": cand.median(),
            "best_cpu_s": min(cand.cpu_times),
            "tokens_per_s": args.new_tokens / cand.best,
            "x_bnb": anchor.best / cand.best,
            "x_bnb_train": anchor_train.best / cand.best,
            "calls": cand.reps,
            "tokens": cand.last,
        }
    del models, candidates
    gc.collect()
    return result


def child(name: str, route: str, packed: Path, args: argparse.Namespace) -> int:
    """One route in this (fresh) process: its resident memory, printed as one JSON line."""
    import bitsandbytes  # noqa: F401  (every route imports the same libraries, so their memory is alike)
    import peft  # noqa: F401
    import torch
    import transformers

    import qlorakit  # noqa: F401

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    imports_rss = current_rss_bytes()
    if route in TRAIN_ROUTES:
        model = train_model(route, packed)
        loaded_rss = current_rss_bytes()
        batch, seq = args.batch
        ids = torch.randint(0, llama_config(MODELS[name]).vocab_size, (batch, seq))
        optimizer = optimizer_for(model)
        for _ in range(2):
            train_step(model, optimizer, ids)
    else:
        model = load_qlorakit(packed) if route == GEN_QK else load_bnb(packed)
        model.train(route == GEN_BNB_TRAIN)
        loaded_rss = current_rss_bytes()
        generate(model, torch.randint(3, 1000, (1, args.prompt)), args.new_tokens)
    print(json.dumps({"imports_rss": imports_rss, "loaded_rss": loaded_rss, "peak_rss": peak_rss_bytes()}))
    return 0


def bench_rss(name: str, packed: Path, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for route in (*TRAIN_ROUTES, *GEN_ROUTES):
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            route,
            str(packed),
            "--threads",
            str(args.threads),
            "--batch",
            "x".join(map(str, args.batch)),
            "--prompt",
            str(args.prompt),
            "--new-tokens",
            str(args.new_tokens),
        ]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"rss child {route} failed (exit {run.returncode}):\n{run.stderr[-3000:]}", file=sys.stderr)
            results[route] = None
            continue
        results[route] = json.loads(run.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------- output


def print_train(name: str, result: dict[str, Any]) -> None:
    shape = MODELS[name]
    print(
        f"\n== {name}: train step (fwd + bwd + AdamW), {result['tokens_per_step']} tokens, {shape.layers} layers, "
        f"hidden {shape.hidden}, LoRA r={LORA_R} on {len(PROJECTIONS)} projections =="
    )
    print(f"   {result['load_before']}\n   {result['load_after']}")
    cpu_anchor = result["routes"][TRAIN_BNB_PEFT]["best_cpu_s"]
    print(
        f"{'route':<22} {'N':>3} {'best s':>8} {'median s':>9} {'tok/s':>8} {'x bnb+PEFT':>11} "
        f"{'cpu s':>7} {'x cpu':>7}"
    )
    for route, r in result["routes"].items():
        print(
            f"{route:<22} {r['calls']:>3} {r['best_s']:8.3f} {r['median_s']:9.3f} {r['tokens_per_s']:8.0f} "
            f"{r['x_bnb']:10.3f}x {r['best_cpu_s']:7.3f} {cpu_anchor / r['best_cpu_s']:6.3f}x"
        )
    anchor = result["routes"][TRAIN_BNB_PEFT]["losses"]
    for route, r in result["routes"].items():
        diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], anchor, strict=True)]
        ok = all(d <= LOSS_RTOL for d in diffs)
        losses = ", ".join(f"{v:.5f}" for v in r["losses"])
        print(
            f"  check: {route:<20} losses of steps 1-2 {losses}; rel. diff vs bnb+PEFT "
            f"{', '.join(f'{d:.1e}' for d in diffs)} ({'OK' if ok else 'DIFFERS'}, tolerance {LOSS_RTOL:g})"
        )
    for route, summary in result["dtypes"].items():
        print(f"  dtypes: {route:<20} {summary}")
    for route, table in result.get("profile", {}).items():
        print(f"\n-- profile of one train step: {route}\n{table}")


def print_generate(name: str, result: dict[str, Any]) -> None:
    print(
        f"\n== {name}: greedy generation, batch 1, {result['new_tokens']} new tokens after a "
        f"{result['prompt_tokens']}-token prompt (prefill included), use_cache =="
    )
    print(f"   {result['load_before']}\n   {result['load_after']}")
    print(f"{'route':<14} {'N':>3} {'best s':>8} {'median s':>9} {'tok/s':>8} {'x bnb eval':>11} {'x bnb train':>12}")
    for route, r in result["routes"].items():
        print(
            f"{route:<14} {r['calls']:>3} {r['best_s']:8.3f} {r['median_s']:9.3f} {r['tokens_per_s']:8.1f} "
            f"{r['x_bnb']:10.3f}x {r['x_bnb_train']:11.3f}x"
        )
    reference = result["routes"][GEN_BNB_EVAL]["tokens"]
    for route, r in result["routes"].items():
        same = sum(a == b for a, b in zip(r["tokens"], reference, strict=True))
        first = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference, strict=True)) if a != b), None)
        where = "" if first is None else f", first difference at token {first}"
        print(f"  check: {route:<12} {same}/{len(reference)} generated tokens equal bnb eval()'s{where}")
    repacked = "repacked (fused kernel ran)" if result["bnb_eval_repacked"] else "NOT repacked (took the train() path)"
    print(f"  check: bnb eval() weights {repacked}")


def print_rss(name: str, result: dict[str, Any]) -> None:
    print(f"\n== {name}: resident memory, each route in a fresh process (GB) ==")
    print(f"{'route':<22} {'after imports':>13} {'after load':>11} {'peak':>8} {'peak - imports':>15}")
    for route, r in result.items():
        if r is None:
            print(f"{route:<22} failed")
            continue
        print(
            f"{route:<22} {r['imports_rss'] / 1e9:13.3f} {r['loaded_rss'] / 1e9:11.3f} {r['peak_rss'] / 1e9:8.3f} "
            f"{(r['peak_rss'] - r['imports_rss']) / 1e9:15.3f}"
        )
    print("(train routes: peak over loading and two train steps; generate routes: over loading and one generate call)")


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    print("\n== summary: tokens/s (x bitsandbytes) ==")
    for name, parts in results.items():
        cells = []
        if "train" in parts:
            cells += [f"{r} {v['tokens_per_s']:.0f} ({v['x_bnb']:.2f}x)" for r, v in parts["train"]["routes"].items()]
        if "generate" in parts:
            cells += [
                f"gen {r} {v['tokens_per_s']:.1f} ({v['x_bnb']:.2f}x)" for r, v in parts["generate"]["routes"].items()
            ]
        if cells:
            print(f"{name}: " + "; ".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before the first import of qlorakit / torch / bitsandbytes
    if args.child:
        name, route, packed = args.child
        return child(name, route, Path(packed), args)
    import bitsandbytes
    import peft
    import transformers
    from bitsandbytes.functional import has_avx512bf16

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print_machine(
        args.threads,
        f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}; "
        f"AVX512-BF16 (bnb fused CPU kernel): {has_avx512bf16()}",
    )
    print(f"settings: batch {'x'.join(map(str, args.batch))}, best of {args.repeats} after one warm-up call each")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name in args.models:
        packed = packed_checkpoint(name, args.workdir)
        parts: dict[str, Any] = {"shape": vars(MODELS[name]), "checkpoint": str(packed)}
        if "train" in args.parts:
            parts["train"] = bench_train(name, packed, args)
            print_train(name, parts["train"])
        if "generate" in args.parts:
            parts["generate"] = bench_generate(name, packed, args)
            print_generate(name, parts["generate"])
        if "rss" in args.parts:
            parts["rss"] = bench_rss(name, packed, args)
            print_rss(name, parts["rss"])
        results[name] = parts
        sys.stdout.flush()
    print_summary(results)
    if args.json is not None:
        for parts in results.values():
            for part in ("train", "generate"):
                if part in parts:
                    parts[part].pop("profile", None)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
