"""Checkpoint benchmark: ``qlorakit quantize`` vs ``cp -r`` vs transformers + bitsandbytes on the CPU.

Make the source checkpoint once, then run from the repository root with the dev venv active::

    source /work/devenv/bin/activate
    python tools/make_test_checkpoint.py                      # /tmp/qlorakit-tinyllama-1.1b, 2.2 GB bf16
    python tools/bench_checkpoint.py                          # everything (the transformers route takes ~half a minute)
    python tools/bench_checkpoint.py --skip-transformers      # cp and qlorakit only
    python tools/bench_checkpoint.py --src DIR --repeats 5 --slow-repeats 2 --keep

Every command runs as a subprocess, with the page cache warm (each source file is read
once before anything is timed) and an ``os.sync()`` before each run so earlier writes are
not flushed inside the next timing. Wall time is best-of-N (``--repeats``, default 3, for
``cp`` and qlorakit; ``--slow-repeats``, default 1, for the transformers route). Peak
resident memory is the largest over the repeats, from ``os.wait4``, which returns the
rusage of exactly that child (with its own children, for ``sh -c``). A small fresh
interpreter spawns each command, because Linux carries the spawning process's RSS
high-water mark into the child's ``ru_maxrss``; the floor this leaves (the peak RSS of
``true``, ~10 MB) is printed. GB/s is the source shards' bytes over the wall time, so
every row compares with ``cp -r``:

- ``cp -r SRC tmp``: the bandwidth anchor (writes land in the page cache), and
  ``cp -r`` + ``sync FILES`` for an anchor that also pays the fsync qlorakit's atomic write does;
- ``qlorakit --version``: interpreter + import start-up, included in every qlorakit row;
- ``qlorakit quantize SRC DST --force --quiet``: with the plan cache off (every run plans with
  transformers: its imports and the meta model), with a plan cache (the first run fills it, the
  best of N is a cached run), with ``--threads 2``, and ``--name-rule`` (no transformers: the
  pipeline alone, the per-byte cost; on this Llama-shaped source it writes the same tensors), so
  the fixed planning cost is the difference;
- transformers ``from_pretrained(SRC, quantization_config=BitsAndBytesConfig(nf4, double
  quant, compute bf16), device_map="cpu", dtype=bf16)`` + ``save_pretrained(DST)``.

Then it prints the issue's targets as ratios with PASS/MISS (information, not a test), the
issue's reference figures, and a tensor-for-tensor comparison of the outputs: the key sets,
byte equality per tensor, and the expected differences counted rather than failed — nested
absmax codes (bitsandbytes' CPU 8-bit quantizer is only approximately nearest; qlorakit is
exact), ``nested_absmax`` and the quant_state JSON's ``nested_offset`` (bitsandbytes'
``absmax.mean()`` changes with torch's thread count once a weight has > 32768 blocks). If
``qlorakit quantize`` does not exist yet, it says so and runs the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench_common import cpu_model

if TYPE_CHECKING:
    import torch
    from safetensors import safe_open

DEFAULT_SRC = "/tmp/qlorakit-tinyllama-1.1b"
READ_CHUNK = 16 << 20
LOG_TAIL_LINES = 15

# Targets of the issue (2.2 GB bf16 TinyLlama-shaped checkpoint, NF4, double quant, 2 cores).
TARGET_VS_CP = 3.0  # qlorakit wall <= 3x cp -r
TARGET_TRANSFORMERS_VS_QLORAKIT = 10.0  # transformers route >= 10x slower than qlorakit
TARGET_PEAK_RSS_GB = 1.5  # qlorakit peak resident memory < 1.5 GB

# Reference figures quoted by the issue for this kind of machine, same checkpoint.
REFERENCE_SECONDS = (
    ("cp -r (page cache)", 0.64),
    ("transformers + bitsandbytes CPU", 21.0),
    ("llama.cpp llama-quantize Q4_0, 2 threads", 3.8),
)
REFERENCE_BYTES = 2.2e9

# Spawns the measured command from a fresh, small interpreter and reports os.wait4's rusage of
# exactly that child. Not spawned from this process directly: Linux carries the spawning
# process's RSS high-water mark through fork/vfork + exec into the child's ru_maxrss, so
# children of a bench process that has imported torch would all report at least its size.
LAUNCHER = """
import json, os, sys, time
command = sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
report = {"wall": wall, "maxrss_kib": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}
with open(sys.argv[1], "w") as handle:
    json.dump(report, handle)
"""

TRANSFORMERS_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
threads = int(sys.argv[3])
if threads > 0:
    torch.set_num_threads(threads)
imported = time.perf_counter()
config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], quantization_config=config, device_map="cpu", dtype=torch.bfloat16
)
loaded = time.perf_counter()
model.save_pretrained(sys.argv[2])
saved = time.perf_counter()
phases = {"import": imported - start, "load+quantize": loaded - imported, "save": saved - loaded}
print("BENCH_PHASES " + json.dumps({"phases": phases, "torch_threads": torch.get_num_threads()}))
"""


@dataclass
class Row:
    """One measured command: best wall time over its repeats, largest peak RSS."""

    label: str
    walls: list[float] = field(default_factory=list)
    peak_rss: int = 0  # bytes
    failed: str = ""  # why it failed, empty when it ran
    note: str = ""
    moves_source: bool = True  # False for rows that do not process SRC (no GB/s)

    @property
    def wall(self) -> float:
        """Best wall time, seconds."""
        return min(self.walls)

    @property
    def ok(self) -> bool:
        """True when every repeat exited 0."""
        return bool(self.walls) and not self.failed


@dataclass
class Comparison:
    """Tensor-for-tensor comparison of two output directories (A and B)."""

    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    identical: int = 0
    mismatched: list[str] = field(default_factory=list)  # unexpected: dtype, shape or bytes differ
    offset_differs: list[str] = field(default_factory=list)  # weight prefixes whose nested_offset differs
    quant_state_other: list[str] = field(default_factory=list)  # JSON differs beyond nested_offset
    nested_absmax_differs: int = 0
    nested_absmax_total: int = 0
    # nested (uint8) absmax codes, split by whether the weight's nested_offset agrees
    codes_same_offset: list[int] = field(default_factory=lambda: [0, 0, 0])  # [differing, total, tensors]
    codes_other_offset: list[int] = field(default_factory=lambda: [0, 0, 0])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=DEFAULT_SRC, help=f"source checkpoint directory (default {DEFAULT_SRC})")
    parser.add_argument("--skip-transformers", action="store_true", help="skip the (slow) transformers route")
    parser.add_argument("--repeats", type=int, default=3, help="best-of-N for cp and qlorakit (default 3)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="best-of-N for the transformers route (default 1)")
    parser.add_argument(
        "--transformers-threads",
        type=int,
        default=0,
        help="torch threads in the transformers route; 1 makes bitsandbytes' nested_offset match qlorakit's "
        "(default 0: torch's default)",
    )
    parser.add_argument("--qlorakit", default=None, help="qlorakit command (default: the console script of this venv)")
    parser.add_argument("--workdir", default=None, help="where outputs go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs (default: removed at the end)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.slow_repeats < 1:
        parser.error("--repeats and --slow-repeats must be >= 1")
    return args


# ---------------------------------------------------------------- running and measuring


def run_measured(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Runs ``command`` under LAUNCHER, output to ``log_path``; returns (wall s, peak RSS bytes, exit code)."""
    os.sync()  # flush earlier writes now, not inside this timing
    report_path = log_path.with_suffix(".rusage.json")
    remove(report_path)
    launcher = [sys.executable, "-S", "-c", LAUNCHER, str(report_path), *command]
    with log_path.open("wb") as log:
        code = subprocess.run(launcher, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if not report_path.exists():
        return 0.0, 0, code or 1
    report = json.loads(report_path.read_text())
    return report["wall"], report["maxrss_kib"] * 1024, report["code"]  # Linux: ru_maxrss in KiB


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, indented, for failure messages."""
    text = log_path.read_text(errors="replace").strip().splitlines()
    return "\n".join("      " + line for line in text[-lines:])


def measure(
    label: str,
    command: Sequence[str],
    repeats: int,
    logs: Path,
    clear: Path | None = None,
    env: dict[str, str] | None = None,
) -> Row:
    """Runs ``command`` ``repeats`` times (removing ``clear`` before each, untimed) and records the row."""
    row = Row(label)
    for repeat in range(repeats):
        if clear is not None:
            remove(clear)
        log_path = logs / f"{slug(label)}-{repeat}.log"
        wall, peak_rss, code = run_measured(command, log_path, env)
        row.peak_rss = max(row.peak_rss, peak_rss)
        if code != 0:
            row.failed = f"exit code {code}: {shlex.join(command)}\n{log_tail(log_path)}"
            return row
        row.walls.append(wall)
    print(f"  measured {label}: best {row.wall:.2f} s of {len(row.walls)}", flush=True)
    return row


def slug(label: str) -> str:
    """A file-name-safe form of a row label."""
    return "".join(char if char.isalnum() else "-" for char in label).strip("-")


def remove(path: Path) -> None:
    """Removes a file or directory tree if present."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------- the source checkpoint


def source_files(src: Path) -> list[Path]:
    """The checkpoint's files (every regular file in SRC)."""
    return sorted(path for path in src.iterdir() if path.is_file())


def shard_bytes(src: Path) -> int:
    """Bytes of the safetensors shards: the numerator of every GB/s."""
    return sum(path.stat().st_size for path in src.glob("*.safetensors"))


def warm_page_cache(files: Sequence[Path]) -> float:
    """Reads every file once so that no timed run reads from disk; returns the seconds it took."""
    start = time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while handle.read(READ_CHUNK):
                pass
    return time.perf_counter() - start


def check_source(src: Path) -> None:
    """Exits with a hint when SRC is not a safetensors checkpoint directory."""
    if not src.is_dir() or not any(src.glob("*.safetensors")):
        sys.exit(
            f"error: {src} is not a safetensors checkpoint directory.\n"
            f"Make it first:  python tools/make_test_checkpoint.py --out {src}"
        )


# ---------------------------------------------------------------- the three routes


def qlorakit_command(override: str | None) -> list[str]:
    """The qlorakit command: ``--qlorakit``, else this venv's console script, else ``python -m qlorakit``."""
    if override:
        return shlex.split(override)
    script = Path(sys.executable).with_name("qlorakit")
    if script.exists():
        return [str(script)]
    found = shutil.which("qlorakit")
    return [found] if found else [sys.executable, "-m", "qlorakit"]


def qlorakit_quantize_available(command: Sequence[str]) -> tuple[bool, str]:
    """Whether ``qlorakit quantize --help`` works; with the reason when it does not."""
    try:
        done = subprocess.run([*command, "quantize", "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    output = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, "\n".join("      " + line for line in output[-4:])


def bench_cp(src: Path, work: Path, logs: Path, repeats: int) -> list[Row]:
    """``cp -r`` into the page cache, and ``cp -r`` followed by fsync of the copied files."""
    target = work / "cp-copy"
    plain = measure("cp -r", ["cp", "-r", str(src), str(target)], repeats, logs, clear=target)
    synced_command = ["sh", "-c", 'cp -r "$1" "$2" && sync -- "$2"/*', "sh", str(src), str(target)]
    synced = measure("cp -r + sync", synced_command, repeats, logs, clear=target)
    remove(target)
    return [plain, synced]


def bench_qlorakit(command: Sequence[str], src: Path, work: Path, logs: Path, repeats: int) -> dict[str, Row]:
    """qlorakit start-up, then ``quantize`` with default threads and with ``--threads 2``."""
    rows = {"startup": measure("qlorakit --version", [*command, "--version"], repeats, logs)}
    rows["startup"].moves_source = False
    available, why = qlorakit_quantize_available(command)
    if not available:
        message = f"`{shlex.join(command)} quantize` is not available yet:\n{why}"
        print(f"  SKIPPED qlorakit quantize: {message}", flush=True)
        rows["default"] = Row("qlorakit quantize", failed=message)
        return rows
    cache = work / "plan-cache"
    variants = (
        ("cold", [], "off", " (plan cache off)"),
        ("default", [], str(cache), ""),
        ("threads2", ["--threads", "2"], str(cache), ""),
        ("names", ["--name-rule"], "off", ""),
    )
    for key, extra, cache_setting, note in variants:
        dst = work / f"qlorakit-{key}"
        label = " ".join(["qlorakit quantize", *extra]) + note
        quantize = [*command, "quantize", str(src), str(dst), "--force", "--quiet", *extra]
        env = {**os.environ, "QLORAKIT_CACHE": cache_setting}
        rows[key] = measure(label, quantize, repeats, logs, clear=dst, env=env)
    return rows


def bench_transformers(src: Path, work: Path, logs: Path, repeats: int, threads: int) -> Row:
    """transformers quantize-on-load (bitsandbytes CPU) + ``save_pretrained``, as a subprocess."""
    dst = work / "transformers"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-c", TRANSFORMERS_SCRIPT, str(src), str(dst), str(threads)]
    label = "transformers + bitsandbytes"
    row = measure(label, command, repeats, logs, clear=dst, env=env)
    if row.ok:
        best = row.walls.index(row.wall)
        row.note = "best run: " + transformers_phases(logs / f"{slug(label)}-{best}.log")
    return row


def transformers_phases(log_path: Path) -> str:
    """The phase times the transformers script printed, as one line."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("BENCH_PHASES "):
            report = json.loads(line.removeprefix("BENCH_PHASES "))
            phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report["phases"].items())
            return f"{phases}; torch threads {report['torch_threads']}"
    return ""


# ---------------------------------------------------------------- reporting


def gb(num_bytes: float) -> float:
    """Bytes to GB (1e9)."""
    return num_bytes / 1e9


def print_table(rows: Sequence[Row], source_bytes: int) -> None:
    """The measured rows: wall, GB/s of source bytes, peak RSS."""
    print(f"\n{'command':<34} {'wall s':>8} {'GB/s':>7} {'peak RSS GB':>12}  runs")
    for row in rows:
        if not row.ok:
            first_line = row.failed.splitlines()[0] if row.failed else "not run"
            print(f"{row.label:<34} {'-':>8} {'-':>7} {'-':>12}  FAILED/SKIPPED: {first_line}")
            continue
        walls = " ".join(f"{wall:.2f}" for wall in row.walls)
        rate = f"{gb(source_bytes) / row.wall:7.2f}" if row.moves_source else f"{'-':>7}"
        print(f"{row.label:<34} {row.wall:8.2f} {rate} {gb(row.peak_rss):12.2f}  [{walls}]")
        if row.note:
            print(f"{'':<34}   {row.note}")


def verdict(passed: bool) -> str:
    """PASS or MISS."""
    return "PASS" if passed else "MISS"


def print_targets(cp: Row, qlorakit_rows: Sequence[Row], transformers: Row | None) -> None:
    """The issue's targets, as ratios measured in this run."""
    print("\ntargets of the issue (information, not a test):")
    measured = [row for row in qlorakit_rows if row.ok]
    if not measured:
        print("  qlorakit quantize not measured: no qlorakit ratios")
    for row in measured:
        ratio = row.wall / cp.wall
        print(
            f"  {row.label} / cp -r wall: {ratio:.2f}x (target <= {TARGET_VS_CP:g}x) {verdict(ratio <= TARGET_VS_CP)}"
        )
        rss = gb(row.peak_rss)
        print(
            f"  {row.label} peak RSS: {rss:.2f} GB "
            f"(target < {TARGET_PEAK_RSS_GB:g} GB) {verdict(rss < TARGET_PEAK_RSS_GB)}"
        )
        if transformers is not None and transformers.ok:
            speedup = transformers.wall / row.wall
            print(
                f"  transformers route / {row.label} wall: {speedup:.1f}x "
                f"(target >= {TARGET_TRANSFORMERS_VS_QLORAKIT:g}x) "
                f"{verdict(speedup >= TARGET_TRANSFORMERS_VS_QLORAKIT)}"
            )
    if transformers is not None and transformers.ok:
        print(f"  transformers route / cp -r wall: {transformers.wall / cp.wall:.1f}x")
    by_label = {row.label: row for row in measured}
    names = by_label.get("qlorakit quantize --name-rule")
    for label, what in (("qlorakit quantize (plan cache off)", "cold"), ("qlorakit quantize", "plan cached")):
        planned = by_label.get(label)
        if planned is not None and names is not None:
            print(
                f"  fixed cost of planning with transformers, {what} ({label} - --name-rule): "
                f"{planned.wall - names.wall:.2f} s (target about 3 s; it runs beside the pipeline)"
            )


def print_references(cp: Row, transformers: Row | None) -> None:
    """The issue's reference figures, next to this run's."""
    print("\nreference figures from the issue (same 2.2 GB checkpoint, this kind of machine):")
    measured = {"cp -r (page cache)": cp, "transformers + bitsandbytes CPU": transformers}
    for label, seconds in REFERENCE_SECONDS:
        line = f"  {label:<42} {seconds:6.2f} s  {gb(REFERENCE_BYTES) / seconds:5.2f} GB/s"
        row = measured.get(label)
        if row is not None and row.ok:
            line += f"   (this run: {row.wall:.2f} s)"
        print(line)


def package_version(name: str) -> str:
    """An installed distribution's version, without importing it (this process stays small)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def print_environment(src: Path, source_bytes: int, files: int, qlorakit: Sequence[str]) -> None:
    """Machine, versions and the source."""
    cpu = cpu_model(fallback=platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, {memory / 2**30:.1f} GiB RAM")
    print(
        f"python {platform.python_version()}, torch {package_version('torch')}, "
        f"transformers {package_version('transformers')}, bitsandbytes {package_version('bitsandbytes')}"
    )
    print(f"qlorakit command: {shlex.join(qlorakit)}")
    print(f"source: {src} ({files} files, {gb(source_bytes):.3f} GB of safetensors shards)")


# ---------------------------------------------------------------- comparing outputs


class Checkpoint:
    """The tensors of an output directory, opened lazily (one tensor in memory at a time)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        self.handles: list[safe_open] = [safe_open(str(path), "pt") for path in sorted(directory.glob("*.safetensors"))]
        self.where = {key: handle for handle in self.handles for key in handle.keys()}

    def keys(self) -> set[str]:
        """Every tensor name over all shards."""
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        """One tensor."""
        return self.where[key].get_tensor(key)

    def quantization_config(self) -> dict:
        """config.json's quantization_config (empty when absent)."""
        config = self.directory / "config.json"
        return json.loads(config.read_text()).get("quantization_config", {}) if config.exists() else {}


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (so -0.0 != 0.0 and NaN payloads count)."""
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a), raw_bytes(b))


def quant_state_prefix(key: str) -> str | None:
    """``X.weight`` for ``X.weight.quant_state.bitsandbytes__nf4|fp4``; None for other keys."""
    from qlorakit.formats import QUANT_STATE_MARKER  # imported late: this process stays small until it compares

    return key.split(QUANT_STATE_MARKER)[0] if QUANT_STATE_MARKER in key else None


def decode_quant_state(tensor: torch.Tensor) -> dict:
    """The quant_state JSON of a uint8 tensor."""
    return json.loads(bytes(tensor.tolist()).decode())


def compare_quant_states(a: Checkpoint, b: Checkpoint, keys: Sequence[str], result: Comparison) -> set[str]:
    """Compares the quant_state JSONs; returns the weight prefixes whose nested_offset differs."""
    offset_differs: set[str] = set()
    for key in keys:
        prefix = quant_state_prefix(key)
        if prefix is None:
            continue
        state_a, state_b = decode_quant_state(a.get(key)), decode_quant_state(b.get(key))
        if state_a == state_b:
            result.identical += 1
            continue
        offset_a, offset_b = state_a.pop("nested_offset", None), state_b.pop("nested_offset", None)
        if state_a != state_b:
            result.quant_state_other.append(key)
        if offset_a != offset_b:
            offset_differs.add(prefix)
    result.offset_differs = sorted(offset_differs)
    return offset_differs


def compare_tensor(key: str, a: torch.Tensor, b: torch.Tensor, offset_differs: set[str], result: Comparison) -> None:
    """Compares one (non-quant_state) tensor, counting the expected kinds of difference."""
    import torch

    codes = key.endswith(".absmax") and a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
    tally = result.codes_other_offset if key.removesuffix(".absmax") in offset_differs else result.codes_same_offset
    if codes:
        tally[1] += a.numel()
    if key.endswith(".nested_absmax"):
        result.nested_absmax_total += 1
    if same_bytes(a, b):
        result.identical += 1
    elif codes:
        tally[0] += int((a != b).sum())
        tally[2] += 1
    elif key.endswith(".nested_absmax") and a.dtype == b.dtype and a.shape == b.shape:
        result.nested_absmax_differs += 1
    elif a.dtype != b.dtype or a.shape != b.shape:
        result.mismatched.append(f"{key}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
    else:
        result.mismatched.append(f"{key}: bytes differ")


def compare_outputs(dir_a: Path, dir_b: Path) -> Comparison:
    """Tensor-for-tensor comparison of two output directories."""
    a, b = Checkpoint(dir_a), Checkpoint(dir_b)
    keys_a, keys_b = a.keys(), b.keys()
    result = Comparison(only_a=sorted(keys_a - keys_b), only_b=sorted(keys_b - keys_a))
    common = sorted(keys_a & keys_b)
    offset_differs = compare_quant_states(a, b, common, result)
    for key in common:
        if quant_state_prefix(key) is None:
            compare_tensor(key, a.get(key), b.get(key), offset_differs, result)
    return result


def print_comparison(name_a: str, name_b: str, result: Comparison, config_a: dict, config_b: dict) -> None:
    """The comparison, expected differences counted, unexpected ones listed."""
    print(f"\noutputs: {name_a} (A) vs {name_b} (B)")
    print(
        f"  keys: {len(result.only_a)} only in A, {len(result.only_b)} only in B; "
        f"{result.identical} tensors byte-identical"
    )
    for key in (result.only_a + result.only_b)[:10]:
        print(f"    key not in both: {key}")
    print(f"  weights whose quant_state nested_offset differs: {len(result.offset_differs)}")
    print(f"  nested_absmax tensors differing: {result.nested_absmax_differs} of {result.nested_absmax_total}")
    for label, tally in (("agrees", result.codes_same_offset), ("differs", result.codes_other_offset)):
        differing, codes, tensors = tally
        share = f" ({100 * differing / codes:.3f}%)" if codes else ""
        print(
            f"  uint8 absmax codes differing, weights whose nested_offset {label}: "
            f"{differing} of {codes}{share}, in {tensors} tensors"
        )
    unexpected = result.mismatched + [f"{key}: JSON differs beyond nested_offset" for key in result.quant_state_other]
    print(f"  unexpected differences: {len(unexpected)}")
    for line in unexpected[:20]:
        print(f"    {line}")
    differing_config = sorted(
        key for key in config_a.keys() | config_b.keys() if config_a.get(key) != config_b.get(key)
    )
    for key in differing_config:
        print(f"  config.json quantization_config[{key!r}]: A {config_a.get(key)!r} vs B {config_b.get(key)!r}")
    if not differing_config:
        print("  config.json quantization_config: identical")


def compare_and_print(name_a: str, dir_a: Path, name_b: str, dir_b: Path) -> None:
    """Compares two output directories if both exist, and prints the result."""
    if not (dir_a.is_dir() and dir_b.is_dir()):
        print(f"\noutputs: {name_a} vs {name_b}: not compared (an output is missing)")
        return
    result = compare_outputs(dir_a, dir_b)
    print_comparison(
        name_a, name_b, result, Checkpoint(dir_a).quantization_config(), Checkpoint(dir_b).quantization_config()
    )


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Warms the cache, measures every route, prints the table, targets, references and comparisons."""
    args = parse_args(argv)
    src = Path(args.src)
    check_source(src)
    files = source_files(src)
    source_bytes = shard_bytes(src)
    qlorakit = qlorakit_command(args.qlorakit)
    print_environment(src, source_bytes, len(files), qlorakit)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qlorakit-bench-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 3 * source_bytes:
        print(f"warning: only {gb(free):.1f} GB free under {work}")
    print(f"outputs and logs: {work}")
    print(f"page cache warmed: {len(files)} files read in {warm_page_cache(files):.2f} s")
    _, floor_rss, _ = run_measured(["true"], logs / "floor.log")
    print(f"peak RSS floor of a measured command (`true`): {floor_rss / 1e6:.1f} MB")
    try:
        cp_rows = bench_cp(src, work, logs, args.repeats)
        qlorakit_rows = bench_qlorakit(qlorakit, src, work, logs, args.repeats)
        transformers = None
        if not args.skip_transformers:
            transformers = bench_transformers(src, work, logs, args.slow_repeats, args.transformers_threads)
        rows = [*cp_rows, *qlorakit_rows.values()] + ([transformers] if transformers else [])
        print_table(rows, source_bytes)
        for row in rows:
            if row.failed:
                print(f"\n{row.label} failed: {row.failed}")
        quantize_rows = [row for key, row in qlorakit_rows.items() if key != "startup"]
        print_targets(cp_rows[0], quantize_rows, transformers)
        print_references(cp_rows[0], transformers)
        if qlorakit_rows["default"].ok and transformers is not None and transformers.ok:
            compare_and_print("qlorakit", work / "qlorakit-default", "transformers", work / "transformers")
        if qlorakit_rows["default"].ok and qlorakit_rows.get("threads2", Row("")).ok:
            compare_and_print("qlorakit", work / "qlorakit-default", "qlorakit --threads 2", work / "qlorakit-threads2")
    finally:
        if args.keep:
            print(f"\nkept outputs and logs in {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
