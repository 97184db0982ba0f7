"""Compiles every CUDA kernel of qlorakit with NVRTC, for every architecture and variant; no GPU or driver needed.

    python tools/check_kernels.py                  # NVRTC 12 and 13, sm_80 and sm_90 (what CI runs)
    python tools/check_kernels.py --nvrtc 13 --arch sm_90

Each ``qlorakit/kernels/cuda/*.cu`` file (``qlorakit.kernels.kernel_files()``, so a new file needs no
registration) is compiled once per ``// qlorakit: variant`` line, architecture and NVRTC, from exactly the source
CuPy compiles at run time (``qlorakit.kernels.kernel_source``) with CuPy's effective options (``NVRTC_OPTIONS``
plus the ``-ftz=true`` CuPy appends). Any error **or warning** fails the run (exit status 1), with NVRTC's log.

The NVRTCs: 13 through ``cuda-bindings`` (``cuda.bindings.nvrtc``, with the ``nvidia-cuda-nvrtc`` wheel) and
12 through ``ctypes`` from the ``nvidia-cuda-nvrtc-cu12`` wheel (``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``):
``cuda-bindings`` 12 and 13 cannot be installed side by side, and the C API is the same. Both are in the
``test`` extra, so users of either CUDA major are covered.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qlorakit.kernels import CUDA_DIR, NVRTC_OPTIONS, kernel_files, kernel_names, kernel_source, kernel_variants

ARCHES = ("sm_80", "sm_90")
# What CuPy's RawModule adds to every compile (the last -ftz wins in NVRTC), so CI compiles what CuPy does.
CUPY_APPENDED_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")

# (ok, log) for (source, name, options)
Compile = Callable[[str, str, Sequence[str]], tuple[bool, str]]


@dataclass
class Nvrtc:
    """One NVRTC library: its version and a compile function."""

    label: str
    version: tuple[int, int]
    compile: Compile


def nvrtc_from_bindings() -> Nvrtc:
    """NVRTC through ``cuda.bindings.nvrtc`` (cuda-bindings 13 + the nvidia-cuda-nvrtc wheel)."""
    from cuda.bindings import nvrtc

    def check(result: tuple, what: str) -> tuple:
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{what}: {result[0]}")
        return result[1:]

    def compile_source(source: str, name: str, options: Sequence[str]) -> tuple[bool, str]:
        (program,) = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
        try:
            encoded = [o.encode() for o in options]
            status = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)[0]
            (size,) = check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
            return status == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.rstrip(b"\0").decode(errors="replace")
        finally:
            nvrtc.nvrtcDestroyProgram(program)

    major, minor = check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return Nvrtc("cuda-bindings", (major, minor), compile_source)


def nvrtc_from_library(path: Path) -> Nvrtc:
    """NVRTC through ``ctypes`` from a ``libnvrtc.so.N`` file (the C API: programs are opaque pointers)."""
    lib = ctypes.CDLL(str(path))
    program_t = ctypes.c_void_p
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcCreateProgram.argtypes = [
        ctypes.POINTER(program_t),
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.nvrtcCompileProgram.argtypes = [program_t, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcGetProgramLogSize.argtypes = [program_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [program_t, ctypes.c_char_p]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(program_t)]

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")

    def compile_source(source: str, name: str, options: Sequence[str]) -> tuple[bool, str]:
        program = program_t()
        check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None), "create")
        try:
            encoded = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = lib.nvrtcCompileProgram(program, len(options), encoded)
            size = ctypes.c_size_t()
            check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "log size")
            log = ctypes.create_string_buffer(size.value)
            check(lib.nvrtcGetProgramLog(program, log), "log")
            return status == 0, log.value.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(program))

    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return Nvrtc(path.name, (major.value, minor.value), compile_source)


def find_nvrtc12() -> Path | None:
    """``libnvrtc.so.12`` of the nvidia-cuda-nvrtc-cu12 wheel, if installed."""
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations or [] if spec else []:
        candidate = Path(root) / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
        if candidate.is_file():
            return candidate
    return None


def load_nvrtcs(majors: Sequence[int]) -> list[Nvrtc]:
    """The NVRTC of each requested major version, or an error naming the wheel that provides it. NVRTC 13 is
    bound first: cuda-bindings resolves its library lazily and would pick up an NVRTC 12 already loaded."""
    found = []
    for major in sorted(set(majors), reverse=True):
        if major == 13:
            try:
                nvrtc = nvrtc_from_bindings()
            except ImportError as exc:
                raise SystemExit(
                    f"NVRTC 13: cuda-bindings is not installed ({exc}); pip install 'qlorakit[test]'"
                ) from exc
        elif major == 12:
            path = find_nvrtc12()
            if path is None:
                raise SystemExit("NVRTC 12: libnvrtc.so.12 not found; pip install nvidia-cuda-nvrtc-cu12")
            nvrtc = nvrtc_from_library(path)
        else:
            raise SystemExit(f"no NVRTC {major} supported (12 or 13)")
        if nvrtc.version[0] != major:
            raise SystemExit(f"asked for NVRTC {major}, {nvrtc.label} is {nvrtc.version[0]}.{nvrtc.version[1]}")
        found.append(nvrtc)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", type=int, action="append", choices=(12, 13), help="NVRTC major (default: both)")
    parser.add_argument("--arch", action="append", help=f"target architecture (default: {', '.join(ARCHES)})")
    args = parser.parse_args(argv)
    nvrtcs = load_nvrtcs(args.nvrtc or (12, 13))
    arches = args.arch or list(ARCHES)

    jobs = []
    for file in kernel_files():
        names = kernel_names(file)
        if not names:
            print(f'FAIL {file}: no extern "C" __global__ kernel found')
            return 1
        for defines in kernel_variants(file):
            source = kernel_source(file, defines)
            for nvrtc in nvrtcs:
                for arch in arches:
                    options = [*NVRTC_OPTIONS, f"-arch={arch}", *CUPY_APPENDED_OPTIONS]
                    jobs.append((file, defines, nvrtc, arch, source, options))

    def run(job: tuple) -> tuple[bool, str]:
        file, defines, nvrtc, arch, source, options = job
        ok, log = nvrtc.compile(source, file, options)
        return ok and not log.strip(), log

    begin = time.perf_counter()
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(run, jobs))
    failures = 0
    for (file, defines, nvrtc, arch, _, options), (ok, log) in zip(jobs, results, strict=True):
        variant = ",".join(f"{k}={v}" for k, v in defines.items()) or "-"
        version = f"nvrtc {nvrtc.version[0]}.{nvrtc.version[1]}"
        print(f"{'ok  ' if ok else 'FAIL'} {file:<22} {variant:<30} {arch}  {version}")
        if not ok:
            failures += 1
            print(f"     options: {' '.join(options)}")
            print("     " + (log.strip() or "(no log)").replace("\n", "\n     "))
    elapsed = time.perf_counter() - begin
    clean = len(jobs) - failures
    print(f"{clean}/{len(jobs)} compiles clean ({elapsed:.1f} s); {len(kernel_files())} files in {CUDA_DIR}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
