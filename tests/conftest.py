"""Fixtures and hooks: bitsandbytes as the reference, the real MiniLM checkpoint's weights, one torch thread;
GPU test skipping. Shared helpers that tests import live in ``tests/helpers/``."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator

# bitsandbytes wraps its torch-backend helpers in torch.compile; the tests call them
# with many shapes, so run them eagerly instead of recompiling each time.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# The bit-exact comparisons with bitsandbytes (which multiplies in the compute dtype) need the same dense matmul on
# every CPU: qlorakit's float32 route for CPUs without oneDNN bf16 (qlorakit.nn.cpu_matmul) is tested on its own in
# test_cpu_matmul.py and on whole models in test_linear4bit.py, which set QLORAKIT_CPU_MATMUL themselves.
os.environ.setdefault("QLORAKIT_CPU_MATMUL", "native")
# Plans qlorakit quantize caches go to a directory of this run, not the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("QLORAKIT_CACHE", tempfile.mkdtemp(prefix="qlorakit-test-plans-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.bnb_reference import use_exact_bnb_layers  # noqa: E402
from helpers.checkpoints import minilm_dir  # noqa: E402

# bitsandbytes logs a warning about an optional 'kernels' package on import; quiet it.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# bitsandbytes' layers compute the same on every CPU (no AVX512-BF16 eval kernel): see use_exact_bnb_layers.
use_exact_bnb_layers()


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


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """Every 2-D weight of the real checkpoint, by name."""
    from safetensors.torch import load_file

    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    weights = {name: t for name, t in tensors.items() if t.dim() == 2}
    assert len(weights) >= 30, f"expected the MiniLM checkpoint's 2-D weights, found {len(weights)}"
    return weights
