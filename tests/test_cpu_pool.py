"""The per-call CPU kernels on torch's OpenMP threads (the default) or on the core's rayon pool
(``QLORAKIT_CPU_POOL=rayon``): the same bits either way, for the fused kernel (1, 3 and 8 rows) and dequantize on
a weight large enough to be split into parallel tasks, with 1 and 2 torch threads; which pool runs is reported;
a bad value of the variable fails loudly. Each pool runs in its own subprocess (the choice is made once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qlorakit
from qlorakit import cpu_pool
from qlorakit.errors import QlorakitError

PYTHON_DIR = Path(qlorakit.__file__).resolve().parents[1]

#: Prints the pool, the shared runtime, then the outputs' bytes as hex, one line per result.
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import qlorakit
    from qlorakit import _core, cpu_pool
    from qlorakit.nn.dispatch import matvec_weight

    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    packed = qlorakit.quantize(torch.randn(1024, 2048) * 0.05, "nf4", 64, True)  # 2^21 weights: parallel tasks
    results = [qlorakit.dequantize(packed, torch.bfloat16)]
    for rows in (1, 3, 8):
        results.append(matvec_weight(packed, torch.randn(rows, 2048).to(torch.bfloat16)))
    print(cpu_pool.cpu_pool())
    print(_core.shared_openmp_runtime())
    for tensor in results:
        print(tensor.contiguous().view(torch.uint8).numpy().tobytes().hex())
    """
)


def run_pool(pool: str | None, threads: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(PYTHON_DIR)}
    env.pop(cpu_pool.CPU_POOL_ENV, None)
    if pool is not None:
        env[cpu_pool.CPU_POOL_ENV] = pool
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="this torch build has no OpenMP runtime")
def test_torch_threads_and_rayon_give_the_same_bits() -> None:
    default = run_pool(None, 2)
    assert default[0] == "torch"
    assert Path(default[1]).name.startswith(("libgomp", "libomp", "libiomp5")), default[1]
    rayon = run_pool("rayon", 2)
    assert rayon[:2] == ["rayon", "None"]
    assert default[2:] == rayon[2:]
    assert len(default) == 6 and all(len(line) > 0 for line in default[2:])
    one_thread = run_pool("torch", 1)
    assert one_thread[0] == "torch"
    assert one_thread[2:] == default[2:]


def test_the_pool_in_this_process_is_reported() -> None:
    torch_threads = torch.backends.openmp.is_available() and cpu_pool.loaded_openmp_runtime() is not None
    assert cpu_pool.cpu_pool() == ("torch" if torch_threads else "rayon")
    assert (qlorakit._core.shared_openmp_runtime() is not None) == torch_threads


def test_an_unknown_pool_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_pool.CPU_POOL_ENV, "openmpp")
    cpu_pool._choice.cache_clear()
    try:
        with pytest.raises(QlorakitError, match="QLORAKIT_CPU_POOL='openmpp' is not a CPU pool"):
            cpu_pool._choice()
    finally:
        monkeypatch.delenv(cpu_pool.CPU_POOL_ENV)
        cpu_pool._choice.cache_clear()


def test_the_runtime_is_found_among_the_mapped_libraries(tmp_path: Path) -> None:
    def maps(*paths: str) -> Path:
        file = tmp_path / "maps"
        lines = [f"7f00-7f10 r-xp 00000000 08:01 {i} {path}" for i, path in enumerate(paths)]
        file.write_text("\n".join([*lines, "7ffd-7ffe rw-p 00000000 00:00 0 [stack]"]) + "\n")
        return file

    gomp = "/site-packages/torch/lib/libgomp.so.1"
    assert cpu_pool.loaded_openmp_runtime(maps(gomp, gomp, "/usr/lib/libc.so.6")) == gomp
    assert cpu_pool.loaded_openmp_runtime(maps("/usr/lib/libc.so.6")) is None
    # Two different runtimes: which one torch uses is not known, so none is shared.
    assert cpu_pool.loaded_openmp_runtime(maps(gomp, "/opt/intel/libiomp5.so")) is None
    assert cpu_pool.loaded_openmp_runtime(tmp_path / "missing") is None
