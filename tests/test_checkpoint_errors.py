"""Bad input gets a clear error and loses nothing (SPEC §4, §5, §8).

Every bad checkpoint goes through ``qlorakit quantize SRC DST`` (a real subprocess) and
through ``qlorakit.quantize_checkpoint``: the CLI must exit 1 with one stderr line
``qlorakit: error: ...`` naming the file (and the tensor), the API must raise
``CheckpointError`` with the same message, DST must not exist afterwards, no staging
directory may be left next to it, and every source file must be byte-for-byte unchanged.
Also: an existing DST without / with ``--force``, a usage error, a full disk (a 256 KiB
tmpfs), interrupted runs (SIGINT and SIGTERM in the middle of the work, made
deterministic by a full stderr pipe), a stale staging directory, and ``verify`` /
``inspect`` on a packed checkpoint with a flipped byte.

Some CLI commands (``verify``, ``inspect``) pay over a second of CPU importing torch, so
the fixture ``batch`` prepares every scenario first and runs all of their CLI commands in
parallel; the tests then check the results.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import qlorakit
from helpers.processes import run_cli
from qlorakit import CheckpointError, QlorakitError

WEIGHT = "model.layers.0.mlp.up_proj.weight"
BIAS = "model.layers.0.mlp.up_proj.bias"
NORM = "model.norm.weight"
WEIGHT_1 = "model.layers.1.mlp.down_proj.weight"
INDEX = "model.safetensors.index.json"
PROGRESS_LINE = re.compile(r"^\[[#-]+\] \d+/\d+ tensors ")
CLI_TIMEOUT_S = 120


# ---------------------------------------------------------------- building checkpoints


def small_model(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One quantizable weight (name-based rule: no config.json) and two kept tensors."""
    generator = torch.Generator().manual_seed(0)
    return {
        WEIGHT: torch.randn(64, 128, generator=generator).to(dtype),
        BIAS: torch.randn(64, generator=generator).to(dtype),
        NORM: torch.ones(128, dtype=dtype),
    }


def two_weight_model() -> dict[str, torch.Tensor]:
    tensors = small_model()
    tensors[WEIGHT_1] = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    return tensors


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def save_sharded(directory: Path, shards: list[dict[str, torch.Tensor]]) -> list[Path]:
    """``model-0000i-of-0000n.safetensors`` plus the index naming them."""
    files, weight_map = [], {}
    for number, tensors in enumerate(shards, 1):
        file = save(tensors, directory / f"model-{number:05d}-of-{len(shards):05d}.safetensors")
        files.append(file)
        weight_map.update(dict.fromkeys(tensors, file.name))
    index = {"metadata": {"total_size": sum(f.stat().st_size for f in files)}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index))
    return files


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data buffer) of a safetensors file."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = read_raw(path)
    edit(header)
    write_raw(path, header, data)


def data_offset(path: Path, tensor: str) -> tuple[int, int]:
    """Absolute [begin, end) of a tensor's bytes in the file."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    begin, end = json.loads(blob[8 : 8 + length])[tensor]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def flip_byte(path: Path, position: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[position] ^= 0xFF
    path.write_bytes(bytes(blob))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), by relative path."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): sha256(p) for p in files}


# ---------------------------------------------------------------- the bad inputs


@dataclass(frozen=True)
class BadInput:
    src: Path  # what is passed as SRC
    mentions: tuple[str, ...]  # the error message must contain each of these
    mid_run: bool = False  # fails after some tensors were done: progress lines may come first


BAD_INPUTS: dict[str, Callable[[Path], BadInput]] = {}


def bad_input(name: str) -> Callable:
    def register(build: Callable[[Path], BadInput]) -> Callable[[Path], BadInput]:
        BAD_INPUTS[name] = build
        return build

    return register


def truncate_mid_last_tensor(file: Path) -> str:
    """Cuts the file in the middle of the data of its last tensor; returns that tensor."""
    header, data = read_raw(file)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    blob = file.read_bytes()
    file.write_bytes(blob[: len(blob) - len(data) + (begin + end) // 2])
    return last


@bad_input("truncated")
def _truncated(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    return BadInput(src, (str(file), truncate_mid_last_tensor(file), "truncated"))


@bad_input("truncated-file-as-src")
def _truncated_file(src: Path) -> BadInput:
    file = save(small_model(), src / "weights.safetensors")
    return BadInput(file, (str(file), truncate_mid_last_tensor(file)))


@bad_input("shorter-than-8-bytes")
def _short(src: Path) -> BadInput:
    src.mkdir(parents=True)
    file = src / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00")
    return BadInput(src, (str(file),))


@bad_input("header-length-beyond-file")
def _header_too_long(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    blob = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(blob) + 1000) + blob[8:])
    return BadInput(src, (str(file), "header length"))


@bad_input("header-not-json")
def _header_not_json(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    _, data = read_raw(file)
    write_raw(file, b'{"model.norm.weight": {"dtype": "F32", "shape": [128], ', data)
    return BadInput(src, (str(file), "JSON"))


@bad_input("header-not-object")
def _header_not_object(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    _, data = read_raw(file)
    write_raw(file, b"[1, 2, 3]", data)
    return BadInput(src, (str(file), "not an object"))


@bad_input("overlapping-offsets")
def _overlap(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")

    def edit(header: dict) -> None:
        begin = header[WEIGHT]["data_offsets"][0]
        header[BIAS]["data_offsets"] = [begin, begin + 64 * 4]

    edit_header(file, edit)
    return BadInput(src, (str(file), WEIGHT, BIAS, "overlaps"))


@bad_input("offsets-out-of-range")
def _out_of_range(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    size = len(read_raw(file)[1])
    edit_header(file, lambda header: header[BIAS].update(data_offsets=[size, size + 64 * 4]))
    return BadInput(src, (str(file), BIAS))


@bad_input("shape-offsets-mismatch")
def _shape_mismatch(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    edit_header(file, lambda header: header[BIAS].update(shape=[65]))
    return BadInput(src, (str(file), BIAS, "[65]"))


@bad_input("unknown-dtype")
def _unknown_dtype(src: Path) -> BadInput:
    file = save(small_model(), src / "model.safetensors")
    edit_header(file, lambda header: header[BIAS].update(dtype="Q4"))
    return BadInput(src, (str(file), BIAS, "Q4"))


@bad_input("missing-shard")
def _missing_shard(src: Path) -> BadInput:
    tensors = small_model()
    files = save_sharded(src, [{WEIGHT: tensors[WEIGHT]}, {BIAS: tensors[BIAS], NORM: tensors[NORM]}])
    files[1].unlink()
    return BadInput(src, (str(src / INDEX), files[1].name))


@bad_input("index-not-json")
def _index_not_json(src: Path) -> BadInput:
    tensors = small_model()
    save_sharded(src, [{WEIGHT: tensors[WEIGHT]}, {BIAS: tensors[BIAS], NORM: tensors[NORM]}])
    (src / INDEX).write_text('{"weight_map": {"model.norm.weight": ')
    return BadInput(src, (str(src / INDEX), "JSON"))


@bad_input("nan-in-weight")
def _nan(src: Path) -> BadInput:
    tensors = small_model()
    tensors[WEIGHT][17, 33] = float("nan")
    file = save(tensors, src / "model.safetensors")
    return BadInput(src, (str(file), WEIGHT))


@bad_input("nan-in-second-weight-after-progress")
def _nan_later(src: Path) -> BadInput:
    generator = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(256, 256, generator=generator) for name in (WEIGHT, WEIGHT_1)}
    tensors[WEIGHT_1][255, 255] = float("nan")
    file = save(tensors, src / "model.safetensors")
    return BadInput(src, (str(file), WEIGHT_1, "NaN"), mid_run=True)


@bad_input("inf-in-weight-of-second-shard")
def _inf(src: Path) -> BadInput:
    tensors = small_model(torch.bfloat16)
    tensors[WEIGHT][63, 127] = float("-inf")
    files = save_sharded(src, [{BIAS: tensors[BIAS], NORM: tensors[NORM]}, {WEIGHT: tensors[WEIGHT]}])
    return BadInput(src, (str(files[1]), WEIGHT))


@bad_input("tensor-in-two-shards")
def _duplicate(src: Path) -> BadInput:
    tensors = small_model()
    files = save_sharded(
        src, [{WEIGHT: tensors[WEIGHT], NORM: tensors[NORM]}, {BIAS: tensors[BIAS], NORM: tensors[NORM]}]
    )
    return BadInput(src, (str(files[0]), str(files[1]), NORM))


@bad_input("no-checkpoint")
def _no_checkpoint(src: Path) -> BadInput:
    src.mkdir(parents=True)
    (src / "README.md").write_text("no weights here\n")
    return BadInput(src, (str(src),))


# ---------------------------------------------------------------- running the CLI


def run_parallel(jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        futures = {name: pool.submit(run_cli, *args, timeout=CLI_TIMEOUT_S) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def error_line(stderr: str, *, allow_progress: bool = False) -> str:
    """The single ``qlorakit: error:`` line of ``stderr``. Failures that happen mid-run may
    follow progress-bar lines (the bar is on unless ``--quiet``); nothing else may be there."""
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    if allow_progress:
        assert all(PROGRESS_LINE.match(line) for line in lines[:-1]), stderr
    else:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[-1].startswith("qlorakit: error: "), stderr
    return lines[-1]


def assert_nothing_written(out: Path) -> None:
    """``out`` is DST's parent, created empty: no DST, no staging or backup sibling."""
    assert sorted(p.name for p in out.iterdir()) == []


@dataclass
class Prepared:
    bad: BadInput
    before: dict[str, str]
    out_cli: Path
    out_api: Path


@dataclass
class Batch:
    root: Path
    bad: dict[str, Prepared]
    results: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """Builds every scenario, then runs all of their CLI commands in parallel."""
    root = tmp_path_factory.mktemp("checkpoint-errors").resolve()
    jobs: dict[str, list[str]] = {}
    prepared: dict[str, Prepared] = {}
    for name, build in BAD_INPUTS.items():
        base = root / "bad" / name
        bad = build(base / "src")
        out_cli, out_api = base / "out-cli", base / "out-api"
        out_cli.mkdir()
        out_api.mkdir()
        prepared[name] = Prepared(bad, snapshot(base / "src"), out_cli, out_api)
        jobs[name] = ["quantize", str(bad.src), str(out_cli / "dst")]

    good = root / "good-src"
    save(two_weight_model(), good / "model.safetensors")
    for variant in ("exists", "force", "force-api"):
        dst = root / variant / "dst"
        dst.mkdir(parents=True)
        (dst / "marker.txt").write_text("keep me\n")
    jobs["exists"] = ["quantize", str(good), str(root / "exists" / "dst")]
    jobs["force"] = ["quantize", str(good), str(root / "force" / "dst"), "--force"]

    nan_src = root / "nan-src"
    nan_model = two_weight_model()
    nan_model[WEIGHT_1][0, 0] = float("nan")
    save(nan_model, nan_src / "model.safetensors")
    for variant in ("force-failing", "force-failing-api"):
        dst = root / variant / "dst"
        dst.mkdir(parents=True)
        (dst / "marker.txt").write_text("keep me\n")
    jobs["force-failing"] = ["quantize", str(nan_src), str(root / "force-failing" / "dst"), "--force"]

    for variant in ("src-inside-dst", "src-inside-dst-api"):
        save(two_weight_model(), root / variant / "parent" / "src" / "model.safetensors")
        (root / variant / "parent" / "notes.txt").write_text("precious\n")
    jobs["src-inside-dst"] = [
        "quantize",
        str(root / "src-inside-dst" / "parent" / "src"),
        str(root / "src-inside-dst" / "parent"),
        "--force",
    ]
    (root / "usage").mkdir()
    jobs["blocksize-100"] = ["quantize", str(good), str(root / "usage" / "dst"), "--blocksize", "100"]

    packed = root / "packed"
    qlorakit.quantize_checkpoint(good, packed)
    corrupt = root / "corrupt"
    shutil.copytree(packed, corrupt)
    begin, end = data_offset(corrupt / "model.safetensors", WEIGHT_1)
    flip_byte(corrupt / "model.safetensors", (begin + end) // 2)
    jobs["verify-ok"] = ["verify", str(packed), "--against", str(good)]
    jobs["verify-corrupt"] = ["verify", str(corrupt)]
    jobs["inspect"] = ["inspect", str(packed)]

    return Batch(root, prepared, run_parallel(jobs))


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_and_loses_nothing(batch: Batch, name: str) -> None:
    case = batch.bad[name]
    proc = batch.results[name]
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    line = error_line(proc.stderr, allow_progress=case.bad.mid_run)
    for needle in case.bad.mentions:
        assert needle in line, f"{needle!r} not in {line!r}"

    with pytest.raises(CheckpointError) as info:
        qlorakit.quantize_checkpoint(case.bad.src, case.out_api / "dst")
    assert isinstance(info.value, QlorakitError)
    assert line == f"qlorakit: error: {info.value}"

    assert_nothing_written(case.out_cli)
    assert_nothing_written(case.out_api)
    assert snapshot(case.bad.src.parent if case.bad.src.is_file() else case.bad.src) == case.before


# ---------------------------------------------------------------- DST handling, usage


def test_existing_dst_is_kept_without_force(batch: Batch) -> None:
    dst = batch.root / "exists" / "dst"
    proc = batch.results["exists"]
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert str(dst) in line and "--force" in line
    with pytest.raises(FileExistsError, match="force"):
        qlorakit.quantize_checkpoint(batch.root / "good-src", dst)
    assert [p.name for p in dst.iterdir()] == ["marker.txt"]
    assert (dst / "marker.txt").read_text() == "keep me\n"
    assert [p.name for p in dst.parent.iterdir()] == ["dst"]


@pytest.mark.parametrize("via", ["cli", "api"])
def test_force_replaces_dst(batch: Batch, via: str) -> None:
    if via == "cli":
        dst = batch.root / "force" / "dst"
        proc = batch.results["force"]
        assert proc.returncode == 0, proc.stderr
    else:
        dst = batch.root / "force-api" / "dst"
        qlorakit.quantize_checkpoint(batch.root / "good-src", dst, force=True)
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors"]
    assert [p.name for p in dst.parent.iterdir()] == ["dst"], "a staging or previous directory was left"
    report = qlorakit.verify_checkpoint(dst, against=batch.root / "good-src")
    assert report.ok, report.problems
    assert report.weights_decoded == 2


def test_force_keeps_the_old_dst_when_the_run_fails(batch: Batch) -> None:
    proc = batch.results["force-failing"]
    assert proc.returncode == 1, proc.stderr
    assert f"'{WEIGHT_1}'" in error_line(proc.stderr, allow_progress=True)
    with pytest.raises(CheckpointError, match="NaN"):
        qlorakit.quantize_checkpoint(batch.root / "nan-src", batch.root / "force-failing-api" / "dst", force=True)
    for variant in ("force-failing", "force-failing-api"):
        dst = batch.root / variant / "dst"
        assert [p.name for p in dst.parent.iterdir()] == ["dst"]
        assert [p.name for p in dst.iterdir()] == ["marker.txt"]


def test_force_never_deletes_a_src_inside_dst(batch: Batch) -> None:
    """``quantize parent/src parent --force`` would replace ``parent`` and with it SRC."""
    expected = sha256(batch.root / "good-src" / "model.safetensors")
    proc = batch.results["src-inside-dst"]
    parent = batch.root / "src-inside-dst" / "parent"
    assert (parent / "src" / "model.safetensors").is_file(), f"SRC was deleted (exit {proc.returncode})"
    assert (parent / "notes.txt").read_text() == "precious\n"
    assert proc.returncode == 1, proc.stderr
    assert str(parent) in error_line(proc.stderr)

    parent = batch.root / "src-inside-dst-api" / "parent"
    with pytest.raises((ValueError, CheckpointError)):
        qlorakit.quantize_checkpoint(parent / "src", parent, force=True)
    assert (parent / "notes.txt").read_text() == "precious\n"
    assert sha256(parent / "src" / "model.safetensors") == expected


def test_invalid_blocksize_is_a_usage_error(batch: Batch) -> None:
    proc = batch.results["blocksize-100"]
    assert proc.returncode == 2, proc.stderr
    assert "--blocksize" in proc.stderr and "invalid choice: 100" in proc.stderr
    with pytest.raises(ValueError, match="blocksize"):
        qlorakit.quantize_checkpoint(batch.root / "good-src", batch.root / "usage" / "dst", blocksize=100)
    assert_nothing_written(batch.root / "usage")


# ---------------------------------------------------------------- verify / inspect


def test_verify_passes_an_intact_checkpoint(batch: Batch) -> None:
    proc = batch.results["verify-ok"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "OK"
    assert WEIGHT in proc.stdout and WEIGHT_1 in proc.stdout  # per-weight error vs the source


def test_verify_detects_a_flipped_byte(batch: Batch) -> None:
    proc = batch.results["verify-corrupt"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, proc.stderr
    assert str(batch.root / "corrupt" / "model.safetensors") in problems[0]
    assert f"'{WEIGHT_1}'" in problems[0] and "checksum" in problems[0]
    assert proc.stdout.splitlines()[-1].startswith("FAILED")


@pytest.mark.parametrize("tensor", [f"{WEIGHT}.absmax", f"{WEIGHT}.nested_absmax", f"{WEIGHT}.quant_map"])
def test_verify_api_detects_a_flipped_byte_anywhere(batch: Batch, tmp_path: Path, tensor: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(batch.root / "packed", copy)
    begin, end = data_offset(copy / "model.safetensors", tensor)
    flip_byte(copy / "model.safetensors", begin + (end - begin) // 3)
    report = qlorakit.verify_checkpoint(copy)
    assert not report.ok
    assert any(f"'{tensor}'" in problem for problem in report.problems), report.problems


def test_inspect_reports_format_and_quantized_weights(batch: Batch) -> None:
    proc = batch.results["inspect"]
    assert proc.returncode == 0, proc.stderr
    assert "format 1" in proc.stdout
    assert "quantized weights: 2 " in proc.stdout
    info = qlorakit.inspect_checkpoint(batch.root / "packed")
    assert info["format_version"] == "1" and info["quantized_weights"] == 2


# ---------------------------------------------------------------- full disk


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount(8) in this environment, so no small filesystem to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_fails_cleanly(tiny_tmpfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tensors = small_model()
    tensors["model.embed_tokens.weight"] = torch.randn(1024, 256)  # 1 MiB, kept as is
    save(tensors, src / "model.safetensors")
    before = snapshot(src)

    proc = run_cli("quantize", str(src), str(tiny_tmpfs / "dst"), timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr, allow_progress=True)
    assert "No space left" in line and str(tiny_tmpfs) in line
    assert_nothing_written(tiny_tmpfs)

    with pytest.raises(CheckpointError, match="No space left"):
        qlorakit.quantize_checkpoint(src, tiny_tmpfs / "dst")
    assert_nothing_written(tiny_tmpfs)
    assert snapshot(src) == before


# ---------------------------------------------------------------- interrupted runs


def full_pipe() -> tuple[int, int, int]:
    """A pipe whose buffer is already full: (read end, blocking write end, bytes queued).
    A child writing to it blocks until the read end is drained."""
    read_end, write_end = os.pipe()
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    queued = 0
    for chunk in (b"\0" * 4096, b"\0"):
        try:
            while True:
                queued += os.write(write_end, chunk)
        except BlockingIOError:
            pass
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags)
    return read_end, write_end, queued


def drain(read_end: int) -> bytes:
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    return b"".join(chunks)


def blocked_in_pipe_write(pid: int) -> bool:
    """Whether a thread of ``pid`` sleeps in a pipe write (Linux ``/proc``: wchan is
    ``pipe_write``, ``anon_pipe_write`` on newer kernels)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            if "pipe_write" in Path(f"/proc/{pid}/task/{task}/wchan").read_text():
                return True
        except OSError:
            continue
    return False


def start_blocked_run(src: Path, dst: Path) -> tuple[subprocess.Popen, int, int, bool]:
    """Starts ``qlorakit quantize`` with stderr on a full pipe. Its first progress line
    (written after the first tensor, long before the rename) blocks until the pipe is
    drained; this waits until the child is stuck there, so a signal sent before draining
    lands in the middle of the run. Returns (process, read end, bytes queued, whether the
    block was seen: /proc may not tell, and then the caller only gets "a while after the
    staging directory appeared")."""
    read_end, write_end, queued = full_pipe()
    # A harness that started us in the background may have SIGINT ignored, which the
    # child would inherit; a handled signal is reset to the default by exec instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qlorakit", "quantize", str(src), str(dst), "--threads", "1"],
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(write_end)
    staging = dst.parent / f".{dst.name}.qlorakit-partial-{proc.pid}"
    # An early error would block on the full pipe too, so do not wait for long.
    deadline = time.monotonic() + 30
    while not staging.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = drain(read_end)[queued:].decode(errors="replace")
            pytest.fail(f"no staging directory appeared (exit {proc.wait()}):\n{output}")
        time.sleep(0.002)
    deadline = time.monotonic() + 10
    while not (blocked := blocked_in_pipe_write(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.002)
    return proc, read_end, queued, blocked


def interruptible_model(src: Path) -> None:
    """~6 MB in six weights: each is more than a tenth of the bytes, so the progress bar
    writes its first line after the first tensor."""
    generator = torch.Generator().manual_seed(2)
    save(
        {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 512, generator=generator) for i in range(6)},
        src / "model.safetensors",
    )


def test_sigint_mid_run_leaves_no_dst_and_no_staging(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    interruptible_model(src)
    out.mkdir()
    before = snapshot(src)
    proc, read_end, queued, mid_run = start_blocked_run(src, out / "dst")
    proc.send_signal(signal.SIGINT)
    stderr = drain(read_end)[queued:].decode()
    assert proc.wait(CLI_TIMEOUT_S) == 130, stderr
    lines = stderr.splitlines()
    if mid_run:
        # The child was blocked writing its first progress line (mid-run by construction);
        # SIGINT may interrupt that very write, so the line may or may not have come out.
        assert PROGRESS_LINE.match(lines[0]) or lines[0].startswith("qlorakit: interrupted"), stderr
    assert lines[-1].startswith("qlorakit: interrupted"), stderr
    assert_nothing_written(out)
    assert snapshot(src) == before


def test_sigint_stops_the_run_within_a_tensor(tmp_path: Path) -> None:
    """Ctrl-C must not wait for the rest of the model (minutes on a big one): the run
    stops at the next tensor boundary after the signal."""
    src, out = tmp_path / "src", tmp_path / "out"
    interruptible_model(src)
    out.mkdir()
    proc, read_end, queued, _ = start_blocked_run(src, out / "dst")
    proc.send_signal(signal.SIGINT)
    stderr = drain(read_end)[queued:].decode()
    assert proc.wait(CLI_TIMEOUT_S) == 130, stderr
    done = [int(n) for n in re.findall(r"^\[[#-]+\] (\d+)/6 tensors", stderr, re.MULTILINE)]
    # At most the progress line the child was blocked on (which SIGINT may cut) and one more.
    assert max(done, default=0) <= 2, f"after SIGINT (during tensor 1 of 6) the run went on:\n{stderr}"
    assert_nothing_written(out)


def test_killed_run_leaves_no_dst_and_a_new_run_succeeds(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    interruptible_model(src)
    out.mkdir()
    before = snapshot(src)
    proc, read_end, _, _ = start_blocked_run(src, out / "dst")
    proc.send_signal(signal.SIGTERM)  # no handler: the process dies where it stands
    drain(read_end)
    assert proc.wait(CLI_TIMEOUT_S) == -signal.SIGTERM
    assert not (out / "dst").exists()
    leftovers = [p.name for p in out.iterdir()]
    assert all(name.startswith(".dst.qlorakit-partial-") for name in leftovers), leftovers

    qlorakit.quantize_checkpoint(src, out / "dst")
    assert qlorakit.verify_checkpoint(out / "dst", against=src).ok
    assert snapshot(src) == before


def test_stale_staging_directory_does_not_look_complete(tmp_path: Path) -> None:
    """What a run killed with SIGKILL (or a power cut) leaves: a hidden partial sibling."""
    src, out = tmp_path / "src", tmp_path / "out"
    save(small_model(), src / "model.safetensors")
    stale = out / ".dst.qlorakit-partial-99999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 64)  # header never written
    assert not (out / "dst").exists()
    with pytest.raises(CheckpointError):
        qlorakit.inspect_checkpoint(out / "dst")

    qlorakit.quantize_checkpoint(src, out / "dst")
    assert sorted(p.name for p in (out / "dst").iterdir()) == ["model.safetensors"]
    assert qlorakit.verify_checkpoint(out / "dst", against=src).ok
