"""Whole checkpoints: ``quantize_checkpoint`` (what ``qlorakit quantize`` runs),
``inspect_checkpoint`` and ``verify_checkpoint``.

The output directory is written atomically: everything goes into a hidden sibling
directory, is synced to disk, and only then renamed to the destination; a failed or
interrupted run leaves no destination behind, and an existing destination is replaced
only with ``force=True``. The source is only read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qlorakit import _core
from qlorakit._core import CheckpointError, __version__
from qlorakit.directories import replace_directory
from qlorakit.formats import DEFAULT_BLOCKSIZE, DEFAULT_MAX_SHARD_SIZE, QUANT_STATE_MARKER
from qlorakit.hf_files import COMPUTE_DTYPES, copy_other_files, quantization_config, write_config
from qlorakit.progress import ProgressBar, human_bytes
from qlorakit.selection import Plan, Selection, kept_summary, same_work

#: Version of qlorakit's own metadata in the safetensors headers.
FORMAT_VERSION = "1"
METADATA_PREFIX = "qlorakit."

if TYPE_CHECKING:
    import torch

    from qlorakit.calibration import Hessians

ProgressCallback = Callable[[int, int, int, int, str], None]
#: What a pipeline run returns (:func:`run_planned`).
_Outcome = TypeVar("_Outcome")


@dataclass
class ScaleSearchReport:
    """Scale search's effect: exact squared reconstruction errors over every quantized
    element, of the written result and of plain absmax quantization (bitsandbytes' own
    output) with the same options; importance-weighted for the tensors that had a vector."""

    squared_error: float
    absmax_squared_error: float
    squared_norm: float
    tensors_kept_absmax: int
    tensors_weighted: int

    @property
    def reduction(self) -> float:
        """Fractional error reduction against absmax (0.12 = 12% lower)."""
        return 1.0 - self.squared_error / self.absmax_squared_error if self.absmax_squared_error else 0.0

    def summary(self) -> str:
        weighted = f", importance-weighted on {self.tensors_weighted} tensors" if self.tensors_weighted else ""
        kept = f"; absmax kept on {self.tensors_kept_absmax} tensors" if self.tensors_kept_absmax else ""
        relative = math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm else 0.0
        absmax_relative = math.sqrt(self.absmax_squared_error / self.squared_norm) if self.squared_norm else 0.0
        return (
            f"scale search: relative error {relative:.4f} vs {absmax_relative:.4f} with absmax scales "
            f"(squared error {100 * self.reduction:.1f}% lower{weighted}{kept})"
        )


@dataclass
class GptqReport:
    """GPTQ's effect on the calibrated tensors: output errors ``tr((W - Q) H (W - Q)^T)`` on
    the calibration inputs, summed over the tensors, of what was written, of bitsandbytes'
    absmax quantization and of the scale search alone."""

    output_error: float
    absmax_output_error: float
    searched_output_error: float
    tensors: int
    #: Tensors where a baseline beat GPTQ and was written instead (the fallback).
    tensors_fell_back: int
    per_tensor: dict[str, _core.GptqReport] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        """Fractional output-error reduction against absmax (0.4 = 40% lower)."""
        return 1.0 - self.output_error / self.absmax_output_error if self.absmax_output_error else 0.0

    @property
    def search_reduction(self) -> float:
        """Fractional output-error reduction against the scale search alone."""
        return 1.0 - self.output_error / self.searched_output_error if self.searched_output_error else 0.0

    def summary(self) -> str:
        fell_back = f"; a baseline kept on {self.tensors_fell_back}" if self.tensors_fell_back else ""
        return (
            f"GPTQ on {self.tensors} calibrated tensors: output error on the calibration text "
            f"{100 * self.reduction:.1f}% lower than absmax, {100 * self.search_reduction:.1f}% lower than "
            f"the scale search alone{fell_back}"
        )


@dataclass
class QuantizeReport:
    """What ``quantize_checkpoint`` did."""

    source: str
    destination: str
    tensors_quantized: int
    tensors_kept: int
    params_quantized: int
    params_kept: int
    bytes_in: int
    bytes_out: int
    mean_relative_error: float
    seconds: float
    selection_method: str
    shards: list[tuple[str, int]] = field(default_factory=list)
    per_tensor_error: dict[str, float] = field(default_factory=dict)
    search: ScaleSearchReport | None = None
    gptq: GptqReport | None = None
    #: One line per reason tensors stayed in their stored precision.
    kept: list[str] = field(default_factory=list)
    #: Seconds spent deciding what to quantize with transformers (imports, the meta model), in a
    #: thread beside the pipeline.
    planning_seconds: float = 0.0

    @property
    def bits_per_param(self) -> float:
        params = self.params_quantized + self.params_kept
        return 8 * self.bytes_out / params if params else 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / self.seconds / 1e9 if self.seconds else 0.0

    def summary(self) -> str:
        """The summary the CLI prints."""
        return "\n".join(
            [
                f"quantized {self.tensors_quantized} tensors ({self.params_quantized / 1e6:.1f} M params), "
                f"kept {self.tensors_kept} ({self.params_kept / 1e6:.1f} M params) [{self.selection_method}]",
                *[f"  {line}" for line in self.kept],
                f"size {human_bytes(self.bytes_in)} -> {human_bytes(self.bytes_out)} "
                f"in {len(self.shards)} file(s), {self.bits_per_param:.3f} bits/parameter",
                f"mean relative reconstruction error {self.mean_relative_error:.4f} "
                f"(sampled on 1 block in {_core.ERROR_SAMPLE_STRIDE})",
                *([self.search.summary()] if self.search else []),
                *([self.gptq.summary()] if self.gptq else []),
                f"wall time {self.seconds:.2f} s ({self.planning_seconds:.2f} s planning with transformers "
                f"beside it), {self.gb_per_s:.2f} GB/s -> {self.destination}",
            ]
        )


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``1000`` → bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise ValueError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


def pipeline_option_values(
    *,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: str,
    max_shard_size: str | int,
    threads: int | None,
    scale_search: bool,
    importance: str | os.PathLike | None,
    hessians: Hessians | str | os.PathLike | None,
    gptq_damp: float,
    durable: bool,
) -> tuple[dict[str, Any], _core.QuantizeOptions]:
    """The Rust pipeline's options, as ``_core.QuantizeOptions`` keywords and built: Rust validates its own
    (``ValueError`` naming the option); here the compute dtype, and that an importance or Hessian file given
    exists (:class:`CheckpointError`). A caller with in-memory Hessians adds the file once it is saved."""
    values: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "max_shard_bytes": parse_size(max_shard_size),
        "threads": threads,
        "scale_search": scale_search,
        "importance": str(importance) if importance is not None else None,
        "durable": durable,
        "gptq_damp": gptq_damp,
    }
    options = _core.QuantizeOptions(**values)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if importance is not None and not Path(importance).is_file():
        raise CheckpointError(f"{importance}: no such importance file")
    if isinstance(hessians, str | os.PathLike) and not Path(hessians).is_file():
        raise CheckpointError(f"{hessians}: no such Hessian file")
    return values, options


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    quant_type: str = "nf4",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: str = "bf16",
    skip: Sequence[str] = (),
    rule: str = "transformers",
    scale_search: bool = False,
    importance: str | os.PathLike | None = None,
    hessians: Hessians | str | os.PathLike | None = None,
    gptq_damp: float = 0.01,
    threads: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: ProgressCallback | bool = False,
    durable: bool = True,
) -> QuantizeReport:
    """Quantizes the safetensors checkpoint at ``src`` (a model directory or one
    ``.safetensors`` file) into a bitsandbytes-format 4-bit model directory ``dst``.

    Which tensors are quantized: exactly those transformers + bitsandbytes would load into the
    4-bit layers they convert, minus ``skip`` patterns (the model class of ``config.json`` is
    built on the meta device and asked; see :mod:`qlorakit.selection`). ``rule="names"``
    selects 2-D weights by name instead (also the only choice for a bare ``.safetensors`` file).

    ``scale_search``: error-optimal block scales instead of absmax (same format; lower
    error; not byte-equal to bitsandbytes' own quantization). ``importance``: with it, a
    safetensors file of float32 vectors, one per weight name, of shape ``[in_features]``
    (e.g. from :func:`qlorakit.collect_importance`), weighting the error per input column.

    ``hessians``: calibration for error-compensating quantization (GPTQ): a
    :class:`qlorakit.calibration.Hessians` (e.g. from :func:`qlorakit.collect_hessians`) or
    the safetensors file one saves. Every tensor it covers gets the codes that minimize its
    layer's output error on the calibration inputs (block scales from the scale search when
    ``scale_search``, else absmax; never worse on that error than either, per tensor);
    ``gptq_damp`` is the relative damping of ``H``.

    ``durable=False`` skips syncing the output to disk (it is still renamed into place only when
    complete): for a scratch output that is read back at once and deleted, as
    :func:`qlorakit.from_pretrained` does.

    Raises :class:`~qlorakit.errors.CheckpointError` naming the file and tensor on bad
    input or a failed write (``dst`` is then left untouched), ``FileExistsError`` if
    ``dst`` exists and ``force`` is not set, ``ValueError`` on bad options.
    """
    option_values, pipeline_options = pipeline_option_values(
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        max_shard_size=max_shard_size,
        threads=threads,
        scale_search=scale_search,
        importance=importance,
        hessians=hessians,
        gptq_damp=gptq_damp,
        durable=durable,
    )
    source = Path(src).resolve()
    destination = Path(dst).resolve()
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    if destination == source or source in destination.parents or destination in source.parents:
        # Replacing a destination that holds the source would delete the source.
        raise ValueError(f"destination {destination} must not be the source, inside it, or contain it")
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} exists; replace it with --force (force=True in Python)")
    source_dir = source if source.is_dir() else None
    start = time.perf_counter()
    tensors = [(t.name, t.dtype, t.shape) for t in _core.list_tensors(str(source))]
    plan = Plan(source_dir, tensors, skip, rule)
    options = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "compute_dtype": COMPUTE_DTYPES[compute_dtype],
        "scale_search": scale_search,
        "importance": importance is not None,
        **({"gptq": True, "gptq_damp": gptq_damp} if hessians is not None else {}),
    }
    callback = ProgressBar() if progress is True else (progress or None)

    def run(selection: Selection, watch: ProgressCallback) -> _core.CheckpointReport:
        """The Rust pipeline on ``selection`` into the staging directory."""
        metadata = {
            "format": "pt",
            f"{METADATA_PREFIX}format_version": FORMAT_VERSION,
            f"{METADATA_PREFIX}version": __version__,
            f"{METADATA_PREFIX}options": json.dumps({**options, "transposed": selection.transposed}, sort_keys=True),
        }
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return _core.quantize_checkpoint(
            str(source),
            str(staging),
            selection.quantize,
            pipeline_options,
            metadata,
            progress=watch,
            transposed=selection.transposed,
        )

    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(destination)
    staging = destination.parent / f"{_staging_prefix(destination)}{os.getpid()}"
    # In-memory Hessians go to a scratch file beside the staging directory, removed afterwards.
    scratch = None if hessians is None or isinstance(hessians, str | os.PathLike) else hessians
    hessian_file = str(hessians) if scratch is None and hessians is not None else None
    if scratch is not None:
        hessian_file = str(scratch.save(destination.parent / f"{staging.name}.hessians.safetensors"))
    if hessian_file is not None:
        pipeline_options = _core.QuantizeOptions(**option_values, hessians=hessian_file)
    try:
        raw, selection = run_planned(plan, callback, run)
        _check_written_shapes(staging, selection)
        quant_config = quantization_config(quant_type, double_quant, options["compute_dtype"], selection.skip_modules)
        write_config(source_dir, staging, quant_config)
        copy_other_files(source_dir, staging)
        if durable:
            _sync_tree(staging)
        replace_directory(staging, destination)
    except CheckpointError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        # Name the destination the user gave, not the staging directory (gone by now).
        raise CheckpointError(str(exc).replace(str(staging), str(destination))) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if scratch is not None and hessian_file is not None:
            Path(hessian_file).unlink(missing_ok=True)
    report = _report(source, destination, raw, selection, time.perf_counter() - start)
    report.planning_seconds = plan.seconds
    return report


class _PlanChanged(Exception):
    """Stops a speculative pipeline run whose selection the plan does not confirm."""


def run_planned(
    plan: Plan, callback: ProgressCallback | None, run: Callable[[Selection, ProgressCallback], _Outcome]
) -> tuple[_Outcome, Selection]:
    """``run(selection, watch)`` on the plan's final selection, and that selection. While transformers is
    imported to decide the plan, the pipeline runs on the name rule's guess: it is kept when the plan agrees,
    stopped (``watch`` raises) as soon as the plan is known to differ, and run again on the plan then.
    ``watch`` passes every progress event on to ``callback``."""

    def attempt(selection: Selection, speculative: bool) -> _Outcome:
        def watch(*event: object) -> None:
            if speculative and plan.ready() and not same_work(plan.final(), selection):
                raise _PlanChanged
            if callback is not None:
                callback(*event)

        return run(selection, watch)

    try:
        outcome: _Outcome | None = attempt(plan.guess, plan.speculative)
    except _PlanChanged:
        outcome = None
    selection = plan.final()
    if outcome is None or not same_work(selection, plan.guess):
        outcome = attempt(selection, False)
    return outcome, selection


def _check_written_shapes(directory: Path, selection: Selection) -> None:
    """Every quantized tensor's recorded shape must be that of the 4-bit layer its loader builds:
    a mismatch would load silently wrong (or not at all), so it fails the run instead."""
    written = _quant_states(_headers(sorted(directory.glob("*.safetensors"))))
    for name, expected in selection.expected_shapes.items():
        state = written.get(name)
        shape = tuple(state["shape"]) if state is not None else None
        if shape != tuple(expected):
            raise CheckpointError(
                f"{directory}: tensor '{name}' was written with shape {list(shape or [])} but the 4-bit layer "
                f"its loader builds is {list(expected)} [out, in]"
            )


def _report(
    source: Path, destination: Path, raw: _core.CheckpointReport, selection: Selection, seconds: float
) -> QuantizeReport:
    tensors = raw.tensors
    quantized = [t for t in tensors if t.quantized]
    kept = [t for t in tensors if not t.quantized]
    error = sum(t.squared_error for t in quantized)
    norm = sum(t.squared_norm for t in quantized)
    searched = [t.search for t in quantized if t.search is not None]
    calibrated = {t.name: t.gptq for t in quantized if t.gptq is not None}
    return QuantizeReport(
        source=str(source),
        destination=str(destination),
        tensors_quantized=len(quantized),
        tensors_kept=len(kept),
        params_quantized=sum(t.params for t in quantized),
        params_kept=sum(t.params for t in kept),
        bytes_in=sum(t.bytes_in for t in tensors),
        bytes_out=sum(size for _, size in raw.shards),
        mean_relative_error=math.sqrt(error / norm) if norm else 0.0,
        seconds=seconds,
        selection_method=selection.method,
        shards=list(raw.shards),
        per_tensor_error={
            t.name: math.sqrt(t.squared_error / t.squared_norm) if t.squared_norm else 0.0 for t in quantized
        },
        search=_search_report(searched) if searched else None,
        gptq=_gptq_report(calibrated) if calibrated else None,
        kept=kept_summary(selection, {t.name: t.params for t in kept}),
    )


def _search_report(per_tensor: Sequence[_core.SearchReport]) -> ScaleSearchReport:
    return ScaleSearchReport(
        squared_error=sum(r.squared_error for r in per_tensor),
        absmax_squared_error=sum(r.absmax_squared_error for r in per_tensor),
        squared_norm=sum(r.squared_norm for r in per_tensor),
        tensors_kept_absmax=sum(r.kept_absmax for r in per_tensor),
        tensors_weighted=sum(r.weighted for r in per_tensor),
    )


def _gptq_report(per_tensor: dict[str, _core.GptqReport]) -> GptqReport:
    rows = per_tensor.values()
    return GptqReport(
        output_error=sum(r.output_error for r in rows),
        absmax_output_error=sum(r.absmax_output_error for r in rows),
        searched_output_error=sum(r.searched_output_error for r in rows),
        tensors=len(per_tensor),
        tensors_fell_back=sum(r.chosen != "gptq" for r in rows),
        per_tensor=dict(per_tensor),
    )


def _staging_prefix(destination: Path) -> str:
    return f".{destination.name}.qlorakit-partial-"


def _remove_stale_staging(destination: Path) -> None:
    """Deletes staging directories that killed runs left beside ``destination``
    (those whose process no longer exists)."""
    prefix = _staging_prefix(destination)
    for leftover in destination.parent.glob(f"{prefix}*"):
        pid = leftover.name.removeprefix(prefix)
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _sync_tree(directory: Path) -> None:
    """fsyncs every file (shards are synced as written) and the directories."""
    paths = list(directory.rglob("*"))
    for path in paths:
        if path.is_file() and not path.name.endswith(".safetensors"):
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    for folder in [directory, *[p for p in paths if p.is_dir()]]:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    return files


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """What a (packed or ordinary) checkpoint holds: format, options, tensors, bits/param."""
    root = Path(path)
    files = _safetensors_files(root)
    headers = _headers(files)
    metadata = headers[0].metadata
    by_weight = _quant_states(headers)
    states, quantized = set(by_weight), list(by_weight.values())
    dtypes: dict[str, int] = {}
    params = payload = tensors = 0
    for header in headers:
        for entry in header.tensors:
            tensors += 1
            dtypes[entry.dtype] = dtypes.get(entry.dtype, 0) + 1
            payload += entry.end - entry.begin
            owner = entry.name if entry.name in states else entry.name.rsplit(".", 1)[0]
            if owner not in states and ".quant_state." not in entry.name:
                params += math.prod(entry.shape)
    params += sum(math.prod(q["shape"]) for q in quantized)
    return {
        "path": str(root),
        "files": [f.name for f in files],
        "format_version": metadata.get(f"{METADATA_PREFIX}format_version"),
        "written_by": metadata.get(f"{METADATA_PREFIX}version"),
        "options": json.loads(metadata.get(f"{METADATA_PREFIX}options", "null")),
        "tensors": tensors,
        "dtypes": dtypes,
        "quantized_weights": len(quantized),
        "quant_types": sorted({q["quant_type"] for q in quantized}),
        "blocksizes": sorted({q["blocksize"] for q in quantized}),
        "double_quant": sorted({"nested_offset" in q for q in quantized}),
        "parameters": params,
        "bytes": payload,
        "bits_per_param": 8 * payload / params if params else 0.0,
    }


def _headers(files: Sequence[Path]) -> list[_core.SafetensorsHeader]:
    """The header of each safetensors file (``_core.read_header``)."""
    return [_core.read_header(str(file)) for file in files]


def _quant_states(headers: Sequence[_core.SafetensorsHeader]) -> dict[str, dict]:
    """The quant_state JSON of every 4-bit weight in the files of ``headers`` (:func:`_headers`), by
    weight name, read straight from the bytes (no torch import: this runs in the CLI)."""
    states: dict[str, dict] = {}
    for header in headers:
        wanted = [entry for entry in header.tensors if QUANT_STATE_MARKER in entry.name]
        if not wanted:
            continue
        with open(header.file, "rb") as handle:
            data_start = 8 + int.from_bytes(handle.read(8), "little")
            for entry in wanted:
                handle.seek(data_start + entry.begin)
                state = handle.read(entry.end - entry.begin)
                states[entry.name.split(QUANT_STATE_MARKER)[0]] = json.loads(state.decode())
    return states


@dataclass
class VerifyReport:
    """Outcome of ``verify_checkpoint``: problems found (empty means the checkpoint is good)."""

    files: int
    tensors_checked: int
    weights_decoded: int
    problems: list[str]
    per_tensor_error: dict[str, float]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_checkpoint(path: str | os.PathLike, against: str | os.PathLike | None = None) -> VerifyReport:
    """Re-checks every tensor's CRC-32 against the header metadata, decodes every
    quantized weight (it must load and give finite values), and with ``against`` (the
    source checkpoint) measures each weight's relative reconstruction error."""
    import torch
    from safetensors import safe_open

    from qlorakit.packed import PackedWeight
    from qlorakit.quantization import dequantize

    files = _safetensors_files(Path(path))
    problems: list[str] = []
    checked = decoded = 0
    errors: dict[str, float] = {}
    source_tensors = _source_index(Path(against)) if against is not None else {}
    for file in files:
        metadata = _core.read_header(str(file)).metadata
        transposed = set(json.loads(metadata.get(f"{METADATA_PREFIX}options", "{}")).get("transposed", []))
        recorded = json.loads(metadata.get(_core.CHECKSUMS_KEY, "{}"))
        if not recorded:
            problems.append(f"{file}: no qlorakit checksums in the header (not written by qlorakit?)")
        actual = _core.tensor_checksums(str(file))
        for name, crc in actual.items():
            checked += 1
            if recorded and recorded.get(name) != crc:
                problems.append(
                    f"{file}: tensor '{name}': checksum {crc} does not match the recorded {recorded.get(name)}"
                )
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names}
        for name in names:
            if QUANT_STATE_MARKER not in name:
                continue
            prefix = name.split(QUANT_STATE_MARKER)[0]
            try:
                weight = dequantize(PackedWeight.from_state_dict(tensors, prefix), torch.float32)
            except Exception as exc:  # report every undecodable weight, not just the first
                problems.append(f"{file}: tensor '{prefix}': cannot be decoded: {exc}")
                continue
            decoded += 1
            if not torch.isfinite(weight).all():
                problems.append(f"{file}: tensor '{prefix}': decodes to non-finite values")
            if prefix in source_tensors:
                reference = _load_source_tensor(source_tensors[prefix], prefix).float()
                if prefix in transposed:  # a Conv1D weight, quantized as its [out, in] transpose
                    reference = reference.T
                errors[prefix] = float((weight - reference).norm() / reference.norm().clamp_min(1e-30))
            elif against is not None:
                problems.append(f"{file}: tensor '{prefix}': not found in {against}")
    return VerifyReport(len(files), checked, decoded, problems, errors)


def _source_index(source: Path) -> dict[str, str]:
    return {entry.name: entry.file for entry in _core.list_tensors(str(source))}


def _load_source_tensor(file: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(name)
