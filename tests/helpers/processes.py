"""Running qlorakit's CLI and the ``tools/`` scripts from tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType


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


#: The FSDP2 / DDP example script, run by the distributed tests (CPU and GPU).
TRAIN_FSDP = Path(__file__).resolve().parents[2] / "tools" / "train_fsdp.py"
#: The example accelerate FSDP2 config.
ACCELERATE_FSDP2_CONFIG = TRAIN_FSDP.with_name("accelerate_fsdp2.yaml")
#: Lifts accelerate's GPU-only FSDP gate on a CPU-only machine (see the module).
ACCELERATE_FSDP_CPU = Path(__file__).with_name("accelerate_fsdp_cpu.py")


def run_train_fsdp(
    packed: Path, out: Path, *args: str, ranks: int = 1, accelerate: tuple[str, ...] | None = None
) -> dict:
    """``tools/train_fsdp.py PACKED --out OUT ARGS``: with torchrun over ``ranks`` processes (one process without
    a launcher when ``ranks`` is 1), or with ``accelerate launch ACCELERATE`` when that is given (through
    :data:`ACCELERATE_FSDP_CPU` without CUDA); asserts every process exited 0 and returns its ``result.json``."""
    if accelerate is not None:
        shim = [] if _has_cuda() else [str(ACCELERATE_FSDP_CPU)]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *accelerate, *shim]
    elif ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
    else:
        launcher = [sys.executable]
    done = subprocess.run(
        [*launcher, str(TRAIN_FSDP), str(packed), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
