"""Quantize on load without a scratch checkpoint: the packed checkpoint ``qlorakit quantize`` would
write, as a state dict in memory.

:func:`quantize_in_memory` takes ``quantize_checkpoint``'s options and makes its decisions the same
way (the same option checks, the same plan of which tensors to quantize and how, the same shape
checks, the same ``quantization_config``), then runs the same Rust pipeline code, which quantizes
each selected tensor straight into the tensors the loaded model will hold: the bytes a shard would
store, written once, in parallel. The tensors kept as stored are neither read nor copied: they are
handed over as lazy slices of the memory-mapped source files, as transformers reads any checkpoint.
Memory then holds the packed tensors (and the source pages of the one tensor being quantized, which
are released after it), not a full-precision copy and not a second copy in a scratch file.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlorakit import _core
from qlorakit._core import CheckpointError
from qlorakit._native import byte_view
from qlorakit.checkpoint import ProgressCallback, pipeline_option_values, run_planned
from qlorakit.formats import DEFAULT_BLOCKSIZE, DEFAULT_MAX_SHARD_SIZE, QUANT_STATE_MARKER
from qlorakit.hf_files import COMPUTE_DTYPES, quantization_config
from qlorakit.packed import serialized
from qlorakit.progress import ProgressBar
from qlorakit.quantization import empty_buffers
from qlorakit.selection import Plan, Selection

if TYPE_CHECKING:
    from qlorakit.calibration import Hessians


@dataclass
class PackedState:
    """A packed checkpoint in memory: what loading its directory would read."""

    #: Every tensor under its checkpoint key, in key order: the quantized weights' bitsandbytes
    #: serialization (torch tensors), the rest as slices of the source files (``safe_open``'s lazy
    #: ``get_slice``, which transformers reads as it reads a file's).
    state_dict: dict[str, Any]
    #: The ``quantization_config`` its ``config.json`` would record.
    quantization_config: dict
    selection: Selection
    report: _core.CheckpointReport
    seconds: float
    _files: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        """Closes the source files (tensors already loaded from them stay valid)."""
        self._files.close()


def quantize_in_memory(
    src: str | os.PathLike,
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
    progress: ProgressCallback | bool = False,
) -> PackedState:
    """The packed checkpoint :func:`qlorakit.quantize_checkpoint` would write for the model
    directory ``src`` with these options (its own; ``max_shard_size`` is checked, and unused: there
    are no shards), as a :class:`PackedState`. Call its ``close()`` once the state dict is loaded.

    Raises :class:`~qlorakit.errors.CheckpointError` naming the file and tensor on bad input,
    ``ValueError`` on bad options.
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
        durable=False,
    )
    source = Path(src).resolve()
    if not source.is_dir():
        raise CheckpointError(f"{source}: not a model directory")
    start = time.perf_counter()
    listing = _core.list_tensors(str(source))
    tensors = [(t.name, t.dtype, t.shape) for t in listing]
    plan = Plan(source, tensors, skip, rule)
    callback = ProgressBar() if progress is True else (progress or None)

    def run(selection: Selection, watch: ProgressCallback) -> tuple[_core.CheckpointReport, dict[str, torch.Tensor]]:
        """The Rust pipeline on ``selection`` into fresh tensors."""
        shapes = {name: shape for name, _, shape in tensors}
        outputs = {name: empty_buffers(math.prod(shapes[name]), blocksize, double_quant) for name in selection.quantize}
        buffers = [
            (
                name,
                byte_view(codes, "codes"),
                byte_view(absmax, "absmax"),
                byte_view(nested, "nested absmax") if nested is not None else None,
            )
            for name, (codes, absmax, nested) in outputs.items()
        ]
        report, states = _core.quantize_in_memory(
            str(source),
            selection.quantize,
            options,
            buffers,
            progress=watch,
            transposed=selection.transposed,
        )
        state_json = dict(states)
        tensors_out: dict[str, torch.Tensor] = {}
        for name, (codes, absmax, nested) in outputs.items():
            quant_state = state_json[f"{name}{QUANT_STATE_MARKER}{quant_type}"]
            tensors_out.update(serialized(name, codes, absmax, nested, quant_type, quant_state))
        return report, tensors_out

    with _hessian_file(hessians) as hessian_file:
        options = pipeline_options
        if hessian_file is not None:
            options = _core.QuantizeOptions(**option_values, hessians=hessian_file)
        (report, quantized_tensors), selection = run_planned(plan, callback, run)
    _check_shapes(source, tensors, selection)
    packed = PackedState(
        state_dict={},
        quantization_config=quantization_config(
            quant_type, double_quant, COMPUTE_DTYPES[compute_dtype], selection.skip_modules
        ),
        selection=selection,
        report=report,
        seconds=0.0,
    )
    try:
        state: dict[str, Any] = dict(quantized_tensors)
        quantized = set(selection.quantize)
        for file, names in _kept_by_file(listing, quantized).items():
            handle = packed._files.enter_context(_open_source(file))
            for name in names:
                state[name] = handle.get_slice(name)
    except BaseException:
        packed.close()
        raise
    packed.state_dict = dict(sorted(state.items()))
    packed.seconds = time.perf_counter() - start
    return packed


def _check_shapes(source: Path, tensors: Sequence[tuple[str, str, list[int]]], selection: Selection) -> None:
    """Every quantized tensor's shape (as quantized: ``[out, in]``) must be that of the 4-bit layer
    its loader builds (what ``quantize_checkpoint`` checks in the shards it wrote)."""
    shapes = {name: tuple(shape) for name, _, shape in tensors}
    transposed = set(selection.transposed)
    for name, expected in selection.expected_shapes.items():
        shape = shapes.get(name)
        if shape is not None and name in transposed:
            shape = shape[::-1]
        if shape != tuple(expected):
            raise CheckpointError(
                f"{source}: tensor '{name}' would be quantized with shape {list(shape or [])} but the 4-bit layer "
                f"its loader builds is {list(expected)} [out, in]"
            )


def _kept_by_file(listing: Sequence[_core.TensorEntry], quantized: set[str]) -> dict[str, list[str]]:
    """The tensors left as stored, by source file (files in order)."""
    by_file: dict[str, list[str]] = {}
    for entry in listing:
        if entry.name not in quantized:
            by_file.setdefault(entry.file, []).append(entry.name)
    return by_file


@contextmanager
def _open_source(file: str) -> Iterator[Any]:
    """``safe_open`` of a source file as transformers opens a checkpoint's (memory-mapped, except on
    Windows, where it reads)."""
    from safetensors import safe_open

    handle = safe_open(file, framework="pt", device="cpu", backend="pread" if sys.platform == "win32" else "mmap")
    try:
        yield handle
    finally:
        handle.__exit__(None, None, None)


@contextmanager
def _hessian_file(hessians: Hessians | str | os.PathLike | None) -> Iterator[str | None]:
    """The file of ``hessians``: as given, or in-memory Hessians saved to a scratch file for the run."""
    if hessians is None or isinstance(hessians, str | os.PathLike):
        yield str(hessians) if hessians is not None else None
        return
    from qlorakit.scratch import scratch_directory

    with scratch_directory() as scratch:
        yield str(hessians.save(scratch / "hessians.safetensors"))
