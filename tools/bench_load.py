"""Peak resident memory and wall time of loading: a packed checkpoint with ``qlorakit.load_packed``,
or a full-precision one quantized while it loads, qlorakit against transformers + bitsandbytes.

    python tools/make_test_checkpoint.py                          # 1.1B bf16 source (once)
    qlorakit quantize /tmp/qlorakit-tinyllama-1.1b /tmp/tinyllama-nf4
    python tools/bench_load.py /tmp/tinyllama-nf4                 # packed load
    python tools/bench_load.py --quantize-on-load /tmp/qlorakit-tinyllama-1.1b

Packed load: prints the process's peak RSS after importing torch + transformers, after loading,
and after one forward pass (which touches every weight), each also as a multiple of the packed
checkpoint's size on disk. Target (issue): peak below 1.25x the packed size. The imports alone
take about 0.57 GB, so the script also reports what loading added on top.

Quantize on load: runs, each in a fresh subprocess, ``qlorakit.from_pretrained(SRC)`` and
transformers + bitsandbytes ``from_pretrained(SRC, quantization_config=BitsAndBytesConfig(nf4,
double quant, bf16 compute), device_map="cpu")``, and reports each one's wall time (the load call,
imports excluded), RSS after importing torch + transformers, and peak RSS, then the speed ratio
against the targets: at least 10x faster than bitsandbytes, and a peak at most the packed size +
0.5 GB above the imports. The source is read once first so both start from a warm page cache;
qlorakit runs with an empty plan cache (``QLORAKIT_CACHE`` in a fresh directory), so its time
includes deciding the selection with transformers, and again as ``qlorakit-cached`` with the plan
a previous run cached (every later load of the same checkpoint). transformers imports its modeling code (and
bitsandbytes) on first use, seconds on a small machine and the same for both routes: each child
imports it before the timed call, and the report shows the times with it too. ``--repeat N``
runs each route N times and keeps the fastest (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Quantize-on-load targets (issue 11).
SPEED_TARGET = 10.0
RSS_MARGIN_BYTES = 500_000_000
ROUTES = ("qlorakit", "bitsandbytes")
#: The qlorakit route again, its plan cache filled by the run before.
CACHED = "qlorakit-cached"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def packed_load(packed: Path, tokens: int) -> int:
    size = sum(p.stat().st_size for p in packed.glob("*.safetensors"))

    import torch
    import transformers  # noqa: F401  (imported here so its memory is counted apart)

    import qlorakit

    rows = [("imports (torch, transformers, qlorakit)", peak_rss_bytes(), 0.0)]
    start = time.perf_counter()
    model = qlorakit.load_packed(packed)
    rows.append(("after load_packed", peak_rss_bytes(), time.perf_counter() - start))
    start = time.perf_counter()
    with torch.no_grad():
        model(torch.arange(tokens).unsqueeze(0))
    rows.append((f"after a forward pass ({tokens} tokens)", peak_rss_bytes(), time.perf_counter() - start))

    print(f"packed checkpoint: {packed} ({size / 1e9:.3f} GB of safetensors)")
    print(f"{'stage':<42} {'peak RSS GB':>12} {'x packed':>9} {'seconds':>8}")
    for stage, rss, seconds in rows:
        print(f"{stage:<42} {rss / 1e9:12.3f} {rss / size:9.2f} {seconds:8.2f}")
    ratio = rows[-1][1] / size
    added = (rows[-1][1] - rows[0][1]) / size
    print(f"target: peak < 1.25x packed size -> {ratio:.2f}x {'PASS' if ratio < 1.25 else 'MISS'} as measured;")
    print(f"        {added:.2f}x counting only what loading and the forward pass added to the imports' memory")
    return 0


def child(route: str, source: Path, tokens: int) -> int:
    """One route in this (fresh) process; prints its measurements as one JSON line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import configure_threads

    configure_threads(None)
    started = time.perf_counter()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    imports_rss = current_rss_bytes()
    # transformers imports its modeling code (and a quantizer its backend) on first use, seconds on a
    # small machine and the same for both routes: done here, timed apart from the load.
    model_class = getattr(transformers, json.loads((source / "config.json").read_text())["architectures"][0])
    import transformers.modeling_utils  # noqa: F401

    if route == "qlorakit":
        import qlorakit
        import qlorakit.hf_quantizer  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401
    del model_class
    modeling_imports = time.perf_counter() - started
    modeling_rss = current_rss_bytes()
    start = time.perf_counter()
    if route == "qlorakit":
        model = qlorakit.from_pretrained(source)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=config, device_map="cpu")
    seconds = time.perf_counter() - start
    load_peak = peak_rss_bytes()
    after_load = current_rss_bytes()
    storages: dict[int, int] = {}
    for tensor in model.state_dict().values():
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    with torch.no_grad():
        logits = model(torch.arange(tokens).unsqueeze(0)).logits
    forward_peak = peak_rss_bytes()
    result = {
        "route": route,
        "seconds": seconds,
        "import_seconds": modeling_imports,
        "imports_rss": imports_rss,
        "modeling_rss": modeling_rss,
        "load_peak_rss": load_peak,
        "after_load_rss": after_load,
        "forward_peak_rss": forward_peak,
        "model_bytes": sum(storages.values()),
        "finite": bool(torch.isfinite(logits).all()),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


def warm_page_cache(source: Path) -> float:
    """Reads every file of ``source`` once; returns its size in bytes."""
    size = 0
    for path in sorted(source.iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    size += len(chunk)
    return size


def quantize_on_load(source: Path, tokens: int, repeat: int) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import cpu_model

    source_bytes = warm_page_cache(source)
    results: dict[str, dict] = {}

    def run_child(route: str, cache: str) -> dict | None:
        env = {**os.environ, "QLORAKIT_CACHE": cache}
        command = [sys.executable, __file__, "--child", route, str(source), "--tokens", str(tokens)]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(f"{route} failed (exit {run.returncode}):\n{run.stderr[-4000:]}", file=sys.stderr)
            return None
        return json.loads(run.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="bench-load-cache-kept-") as kept_cache:
        if run_child("qlorakit", kept_cache) is None:  # untimed: fills the kept plan cache
            return 1
        for attempt in range(repeat):
            for label, route, cache in (
                # A fresh plan cache: qlorakit's time includes deciding the selection (a checkpoint's first load).
                *((r, r, None) for r in ROUTES),
                # The plan cached by the run before (every later load of the same checkpoint).
                (CACHED, "qlorakit", kept_cache),
            ):
                with tempfile.TemporaryDirectory(prefix="bench-load-cache-") as fresh:
                    result = run_child(route, cache or fresh)
                if result is None:
                    return 1
                print(f"run {attempt + 1}/{repeat} {label}: {result['seconds']:.2f} s", file=sys.stderr)
                if label not in results or result["seconds"] < results[label]["seconds"]:
                    results[label] = result

    ours, theirs = results["qlorakit"], results["bitsandbytes"]
    packed = ours["model_bytes"]
    print(
        f"source: {source} ({source_bytes / 1e9:.3f} GB, page cache warmed); CPU: {cpu_model()}, "
        f"{len(os.sched_getaffinity(0))} cores; torch threads {ours['torch_threads']}"
    )
    print(f"packed size (the qlorakit model's tensors = the packed checkpoint's): {packed / 1e9:.3f} GB")
    print(
        f"{'route':<14} {'load s':>7} {'+imports s':>10} {'RSS torch+tf':>12} {'+modeling':>10} {'peak RSS':>9} "
        f"{'peak-torch+tf':>13} forward ok"
    )
    for route in (*ROUTES, CACHED):
        r = results[route]
        print(
            f"{route:<14} {r['seconds']:7.2f} {r['seconds'] + r['import_seconds']:10.2f} "
            f"{r['imports_rss'] / 1e9:12.3f} {r['modeling_rss'] / 1e9:10.3f} {r['load_peak_rss'] / 1e9:9.3f} "
            f"{(r['load_peak_rss'] - r['imports_rss']) / 1e9:13.3f} {'yes' if r['finite'] else 'NO'}"
        )
    print("(seconds: the from_pretrained call, fastest of the runs; +imports: with transformers' modeling code and the")
    print(" quantizer's backend, imported first, the same for both routes; RSS in GB; peak RSS: the process's peak up")
    print(" to the end of the load; after a forward pass, which touches every weight:", end="")
    print("".join(f" {route} {results[route]['forward_peak_rss'] / 1e9:.3f}" for route in ROUTES) + ")")
    speedup = theirs["seconds"] / ours["seconds"]
    cached_speedup = theirs["seconds"] / results[CACHED]["seconds"]
    with_imports = (theirs["seconds"] + theirs["import_seconds"]) / (ours["seconds"] + ours["import_seconds"])
    added = ours["load_peak_rss"] - ours["imports_rss"]
    budget = packed + RSS_MARGIN_BYTES
    print(
        f"speed: qlorakit {speedup:.1f}x faster than transformers + bitsandbytes "
        f"(target >= {SPEED_TARGET:.0f}x: {'PASS' if speedup >= SPEED_TARGET else 'MISS'}); "
        f"{with_imports:.1f}x counting the modeling imports; with the plan cached (later loads of a checkpoint) "
        f"{cached_speedup:.1f}x ({'PASS' if cached_speedup >= SPEED_TARGET else 'MISS'})"
    )
    print(
        f"memory: qlorakit peak {added / 1e9:.3f} GB above torch + transformers imported, budget packed + 0.5 GB = "
        f"{budget / 1e9:.3f} GB ({'PASS' if added <= budget else 'MISS'})"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="packed checkpoint directory (or, with --quantize-on-load, a source)")
    parser.add_argument("--quantize-on-load", action="store_true", help="PATH is full precision: compare both routes")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the forward pass")
    parser.add_argument("--repeat", type=int, default=1, help="quantize on load: runs per route (the fastest is shown)")
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.path, args.tokens)
    if args.quantize_on_load:
        return quantize_on_load(args.path, args.tokens, args.repeat)
    return packed_load(args.path, args.tokens)


if __name__ == "__main__":
    sys.exit(main())
