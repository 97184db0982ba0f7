"""Running qlorakit's CLI and the ``tools/`` scripts from tests."""

from __future__ import annotations

import importlib.util
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
