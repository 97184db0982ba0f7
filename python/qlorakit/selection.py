"""Which tensors of a checkpoint get quantized, and how.

Default, for a model directory: transformers' own rule (:mod:`qlorakit.hf_rules`). The model
class named in ``config.json`` is built on the meta device; a checkpoint tensor is quantized
exactly when transformers + bitsandbytes would load it into a module they convert to 4-bit:
its key maps (through transformers' renames, not through a fusion) to the ``weight`` of an
``nn.Linear`` or ``Conv1D`` outside transformers' not-to-convert list and the ``--skip``
patterns. ``Conv1D`` weights (stored ``[in, out]``) are quantized transposed, as transformers
does. Every quantized tensor's shape is checked against the module it will load into.

The output's ``llm_int8_skip_modules`` is the full not-to-convert list (transformers'
defaults, ``--skip``, and any linear layer left unquantized), because a list written there
replaces transformers' defaults when it loads the file.

The name rule (2-D float ``*.weight`` tensors other than embeddings, norms and ``lm_head``) is
used only where there is no model to ask: a bare ``.safetensors`` file or a directory without
``config.json``, or on request (``rule="names"``, for a class transformers cannot build).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlorakit.errors import CheckpointError
from qlorakit.formats import SAFETENSORS_FLOAT_DTYPES

if TYPE_CHECKING:
    from torch import nn

#: Name fragments of 2-D weights the name rule never quantizes.
NAME_RULE_SKIP_FRAGMENTS = ("embed", "wte", "wpe", "lm_head", "norm", "ln_", "layernorm", "shared")
RULES = ("transformers", "names")

#: Why a tensor stays in its stored precision, as the summary words it.
KEPT_NOT_LINEAR = "not the weight of a linear layer (embeddings, norms, biases, routers, ...)"
KEPT_BY_TRANSFORMERS = "kept in full precision by transformers (tied or output embeddings, _keep_in_fp32_modules)"
KEPT_SKIPPED = "matched by --skip"
KEPT_LINEAR_SUBCLASS = (
    "a linear layer of a class bitsandbytes does not convert (only nn.Linear and Conv1D; e.g. Falcon's FalconLinear)"
)
KEPT_FUSED = "fused by transformers on load (MoE experts into 3-D parameters), which bitsandbytes does not quantize"


@dataclass
class Selection:
    """Tensors to quantize, modules a loader must leave unconverted, and why the rest stays."""

    quantize: list[str]
    skip_modules: list[str]
    method: str
    #: Quantized tensors stored ``[in, out]`` (``Conv1D``): quantized as their transpose.
    transposed: list[str] = field(default_factory=list)
    #: ``[out, in]`` of the 4-bit layer each quantized tensor loads into.
    expected_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Tensors left as stored, by reason (``KEPT_*``).
    kept: dict[str, list[str]] = field(default_factory=dict)


class Plan:
    """The selection for a checkpoint, decided in a background thread when it takes transformers
    (importing torch and transformers costs seconds), so the Rust pipeline can meanwhile run on
    ``guess``, the name rule's selection. :meth:`final` waits for the decision; when it does the
    same work as the guess (:func:`same_work`, as for Llama-shaped models) the speculative run
    stands, otherwise the caller runs again with it. A decided plan is cached (see
    :data:`CACHE_ENV`): the same checkpoint planned again needs no transformers import."""

    def __init__(
        self, source_dir: Path | None, tensors: Sequence[tuple[str, str, list[int]]], skip: Sequence[str], rule: str
    ) -> None:
        self.seconds = 0.0
        self._final: Selection | None = None
        self._error: BaseException | None = None
        self.cache_path = _plan_cache_path(source_dir, tensors, skip) if rule == "transformers" else None
        cached = _read_cached(self.cache_path)
        if cached is not None:
            self.guess = self._final = cached
            self._thread = None
        elif rule == "transformers" and source_dir is not None and (source_dir / "config.json").is_file():
            self.guess = select_tensors(source_dir, tensors, skip, "names")
            self._thread = threading.Thread(
                target=self._decide, args=(source_dir, tensors, skip), name="qlorakit-plan", daemon=True
            )
            self._thread.start()
        else:
            self.guess = self._final = select_tensors(source_dir, tensors, skip, rule)
            self._thread = None

    def _decide(self, source_dir: Path, tensors: Sequence[tuple[str, str, list[int]]], skip: Sequence[str]) -> None:
        start = time.perf_counter()
        try:
            self._final = select_tensors(source_dir, tensors, skip, "transformers")
            _write_cached(self.cache_path, self._final)
        except BaseException as exc:  # handed to the caller by final()
            self._error = exc
        self.seconds = time.perf_counter() - start

    @property
    def speculative(self) -> bool:
        """Whether the decision was still open when planning started (the guess may be wrong)."""
        return self._thread is not None

    def ready(self) -> bool:
        """Whether :meth:`final` would return at once."""
        return self._thread is None or not self._thread.is_alive()

    def final(self) -> Selection:
        """The selection (waiting for it); raises what deciding it raised."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._final is not None
        return self._final


#: Where decided plans are kept (``QLORAKIT_CACHE``, else ``$XDG_CACHE_HOME/qlorakit`` or
#: ``~/.cache/qlorakit``); ``QLORAKIT_CACHE=off`` disables it.
CACHE_ENV = "QLORAKIT_CACHE"


def cache_root() -> Path | None:
    """qlorakit's cache directory (see :data:`CACHE_ENV`; it may not exist yet), or None when it is off."""
    setting = os.environ.get(CACHE_ENV, "")
    if setting == "off":
        return None
    return Path(setting) if setting else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlorakit"


def _plan_cache_path(
    source_dir: Path | None, tensors: Sequence[tuple[str, str, list[int]]], skip: Sequence[str]
) -> Path | None:
    """The cache file of a transformers plan: keyed by everything the plan depends on (the config,
    every tensor's name, dtype and shape, the skip patterns, the transformers and qlorakit
    versions), so a hit is the plan transformers would give again, without its imports."""
    root = cache_root()
    config_path = source_dir / "config.json" if source_dir is not None else None
    if root is None or config_path is None or not config_path.is_file():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions = [version("transformers"), version("qlorakit")]
    except PackageNotFoundError:
        return None
    key = hashlib.sha256()
    for part in (config_path.read_bytes(), json.dumps([list(t) for t in tensors]), json.dumps(list(skip)), versions):
        key.update(part if isinstance(part, bytes) else str(part).encode())
    return root / "plans" / f"{key.hexdigest()}.json"


def _read_cached(path: Path | None) -> Selection | None:
    if path is None or not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text())
        fields["expected_shapes"] = {k: tuple(v) for k, v in fields["expected_shapes"].items()}
        return Selection(**fields)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # a damaged entry is decided again


def _write_cached(path: Path | None, selection: Selection) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(dataclasses.asdict(selection)))
        os.replace(partial, path)
    except OSError:
        pass  # a read-only or full cache only costs the next run its planning time


def same_work(a: Selection, b: Selection) -> bool:
    """Whether two selections make the pipeline write the same tensors."""
    return set(a.quantize) == set(b.quantize) and set(a.transposed) == set(b.transposed)


def matches_module(name: str, pattern: str) -> bool:
    """transformers' module-pattern rule (``should_convert_module``), for the name rule, which runs
    without transformers: a prefix ending at a module boundary, a regex with the same boundary, or
    a suffix ("fc1" matches "model.decoder.layers.23.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return bool(re.match(rf"(?:{pattern}){boundary}", name)) or name.endswith(pattern)
    except re.error:
        return name.startswith(pattern) or name.endswith(pattern)


def select_tensors(
    source_dir: Path | None,
    tensors: Sequence[tuple[str, str, list[int]]],
    skip: Sequence[str],
    rule: str = "transformers",
) -> Selection:
    """``tensors``: (name, safetensors dtype, shape) of every tensor in the checkpoint.

    Raises :class:`~qlorakit.errors.CheckpointError` when transformers cannot build the model
    class, or when a tensor's shape does not fit the module it would load into."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    by_name = {name: (dtype, shape) for name, dtype, shape in tensors}
    if rule == "names":
        return _select_by_name(by_name, skip, "name rule (asked for)")
    if source_dir is None or not (source_dir / "config.json").is_file():
        return _select_by_name(by_name, skip, "name rule: no config.json to build the model from")
    return _select_with_transformers(source_dir, by_name, skip)


def _quantizable(entry: tuple[str, list[int]] | None) -> bool:
    return entry is not None and entry[0] in SAFETENSORS_FLOAT_DTYPES and len(entry[1]) == 2 and 0 not in entry[1]


def _select_by_name(by_name: dict[str, tuple[str, list[int]]], skip: Sequence[str], method: str) -> Selection:
    selection = Selection([], [], f"{method}; 2-D weights except embeddings, norms, lm_head")
    skipped = set()
    for name, entry in by_name.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or not _quantizable(entry):
            selection.kept.setdefault(KEPT_NOT_LINEAR, []).append(name)
        elif any(f in module.lower() for f in NAME_RULE_SKIP_FRAGMENTS):
            skipped.add(module)
            selection.kept.setdefault(KEPT_NOT_LINEAR, []).append(name)
        elif any(matches_module(module, p) for p in skip):
            skipped.add(module)
            selection.kept.setdefault(KEPT_SKIPPED, []).append(name)
        else:
            selection.quantize.append(name)
            selection.expected_shapes[name] = tuple(entry[1])  # type: ignore[assignment]
    selection.skip_modules = sorted(skipped)
    return selection


def _select_with_transformers(
    source_dir: Path, by_name: dict[str, tuple[str, list[int]]], skip: Sequence[str]
) -> Selection:
    from qlorakit import hf_rules

    try:
        model = hf_rules.build_on_meta(source_dir)
    except CheckpointError:
        raise
    except Exception as exc:  # a config transformers cannot build: say so, do not guess
        raise CheckpointError(
            f"{source_dir / 'config.json'}: transformers cannot build {hf_rules.architecture_name(source_dir)} "
            f"({type(exc).__name__}: {exc}); pass --name-rule to select tensors by name instead "
            "(transformers may then not load the output)"
        ) from None
    defaults = hf_rules.modules_to_not_convert(model, None, add_default_skips=True)
    not_convert = sorted(set(defaults) | set(skip))
    converted = hf_rules.converted_modules(model, not_convert)
    mapping = hf_rules.KeyMapping.of(model)
    selection = Selection([], [], f"transformers {type(model).__name__}: the layers bitsandbytes converts")
    reached: set[str] = set()
    for name, entry in by_name.items():
        target, fused = mapping.target(name)
        module_name = target.removesuffix(".weight") if target.endswith(".weight") else None
        module = converted.get(module_name) if module_name is not None and not fused else None
        if module is None:
            reason = _kept_reason(target, fused, model, defaults, skip)
            selection.kept.setdefault(reason, []).append(name)
            continue
        if not _quantizable(entry) or tuple(entry[1]) != tuple(module.weight.shape):
            raise CheckpointError(
                f"{source_dir}: tensor '{name}' ({entry[0]} {list(entry[1])}) cannot be the weight of "
                f"{type(module).__name__} '{module_name}', which expects a float {list(module.weight.shape)}"
            )
        reached.add(module_name)
        selection.quantize.append(name)
        selection.expected_shapes[name] = hf_rules.linear_shape(module)
        if hf_rules.is_conv1d(module):
            selection.transposed.append(name)
    # A layer transformers would convert but that no tensor fills as-is (absent, or built by a
    # converter) must stay unconverted, or a loader would look for 4-bit data it cannot find.
    selection.skip_modules = sorted(set(not_convert) | (set(converted) - reached))
    return selection


def _kept_reason(target: str, fused: bool, model: nn.Module, defaults: Sequence[str], skip: Sequence[str]) -> str:
    from torch import nn
    from transformers.quantizers.quantizers_utils import should_convert_module

    if fused:
        return KEPT_FUSED
    if not target.endswith(".weight"):
        return KEPT_NOT_LINEAR
    module_name = target.removesuffix(".weight")
    if not should_convert_module(module_name, list(skip)):
        return KEPT_SKIPPED
    if not should_convert_module(module_name, list(defaults)):
        return KEPT_BY_TRANSFORMERS
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return KEPT_NOT_LINEAR
    return KEPT_LINEAR_SUBCLASS if isinstance(module, nn.Linear) else KEPT_NOT_LINEAR


def kept_summary(selection: Selection, params: dict[str, int]) -> list[str]:
    """One line per reason a tensor stayed in its stored precision: how many tensors and parameters."""
    lines = []
    for reason, names in selection.kept.items():
        count = sum(params.get(name, 0) for name in names)
        lines.append(f"kept {len(names)} tensors ({count / 1e6:.2f} M params) as stored: {reason}")
    return lines
