"""CPU emulation of qlorakit's CUDA kernels: the exact kernel source, compiled by the host C++ compiler.

``build(file)`` compiles ``qlorakit.kernels.kernel_source(file)`` — the string NVRTC and CuPy compile — with
``g++ -include tests/helpers/cuda_shim.h`` into a shared library, plus one ``extern "C"`` wrapper per kernel
that takes CUDA's ``kernelParams`` convention (``void** args``, one pointer to each argument's value); a
variadic template in the shim deduces the kernel's parameter types from the function pointer, so nothing
parses signatures. ``EmulatedModule.launch`` runs every thread of every block on the CPU (fibers per block,
honouring ``__syncthreads`` and warp shuffles; see the shim's header comment).

Arguments: numpy arrays are passed as pointers to their data (read and written in place), numpy scalars with
their exact C type, ``None`` as a null pointer. Each argument is checked against the kernel's parameter
(pointer or not, integer/float kind, size), so a launch that would pass a wrong type to the GPU fails here.

Libraries are cached per source hash in a temporary directory (safe for parallel test processes).

Also here: ``GuardedBuffers`` (arrays that end at an inaccessible page, to catch overruns) and
``assert_gemv_close``, the float reference check of the batch-1 matvec shared with the GPU tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

import qlorakit
from qlorakit.kernels import kernel_names, kernel_source, kernel_source_from_text
from qlorakit.packed import PackedWeight

#: The CUDA emulation header (test code, not package data: it is not in the wheel).
SHIM = Path(__file__).resolve().parent / "cuda_shim.h"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = (
    "-std=c++17",
    "-O2",
    "-shared",
    "-fPIC",
    "-pthread",
    "-ffp-contract=off",
    "-Wall",
    "-Werror",
    "-Wno-unknown-pragmas",
)
WORKERS = max(1, min(8, os.cpu_count() or 1))

_KIND_NAMES = {0: "pointer", 1: "signed integer", 2: "unsigned integer", 3: "floating point", 4: "other"}
_NUMPY_KINDS = {"i": 1, "u": 2, "f": 3, "b": 2}
_modules: dict[str, EmulatedModule] = {}
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def compiler_available() -> bool:
    """Whether the host C++ compiler is on PATH."""
    return shutil.which(CXX) is not None


class EmulatedModule:
    """The kernels of one source, compiled for the CPU."""

    def __init__(self, library: Path, names: Sequence[str]) -> None:
        self._lib = ctypes.CDLL(str(library))
        self.names = list(names)
        self._params: dict[str, list[tuple[int, int]]] = {}
        for name in self.names:
            describe = getattr(self._lib, f"qlorakit_params_{name}")
            describe.restype = ctypes.c_int
            kinds, sizes = (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
            count = describe(kinds, sizes, 64)
            self._params[name] = [(kinds[i], sizes[i]) for i in range(count)]
            run = getattr(self._lib, f"qlorakit_emulate_{name}")
            run.restype = ctypes.c_int
            run.argtypes = [
                ctypes.POINTER(ctypes.c_uint),
                ctypes.POINTER(ctypes.c_uint),
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_uint,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
            ]

    def parameters(self, name: str) -> list[tuple[str, int]]:
        """(kind, size in bytes) of each parameter of kernel ``name``."""
        return [(_KIND_NAMES[kind], size) for kind, size in self._params[name]]

    def launch(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: Sequence[np.ndarray | np.generic | None],
        shared_mem: int = 0,
    ) -> None:
        """Runs kernel ``name`` over ``grid`` x ``block`` (1 to 3 dimensions each) on the CPU."""
        if name not in self._params:
            raise KeyError(f"no kernel {name!r}; this module has {self.names}")
        params = self._params[name]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        cells: list[object] = []
        pointers = (ctypes.c_void_p * max(1, len(args)))()
        for i, (arg, (kind, size)) in enumerate(zip(args, params, strict=True)):
            if kind == 0:
                if arg is None:
                    cell: object = ctypes.c_void_p(0)
                elif isinstance(arg, np.ndarray):
                    if not arg.flags.c_contiguous:
                        raise ValueError(f"{name} argument {i}: array is not C-contiguous")
                    cell = ctypes.c_void_p(arg.ctypes.data)
                else:
                    raise TypeError(f"{name} argument {i}: the kernel takes a pointer, got {type(arg).__name__}")
            else:
                if not isinstance(arg, np.generic):
                    raise TypeError(f"{name} argument {i}: the kernel takes a scalar, got {type(arg).__name__}")
                if arg.dtype.itemsize != size or _NUMPY_KINDS.get(arg.dtype.kind) != kind:
                    raise TypeError(
                        f"{name} argument {i}: the kernel takes a {size}-byte {_KIND_NAMES[kind]}, got {arg.dtype}"
                    )
                cell = ctypes.create_string_buffer(arg.tobytes(), size)
            cells.append(cell)
            pointers[i] = ctypes.addressof(cell)  # type: ignore[arg-type]
        dims = []
        for what, value in (("grid", grid), ("block", block)):
            if not 1 <= len(value) <= 3 or any(int(v) <= 0 for v in value):
                raise ValueError(f"{what} must have 1 to 3 positive dimensions, got {value}")
            dims.append((ctypes.c_uint * 3)(*(tuple(int(v) for v in value) + (1, 1))[:3]))
        message = ctypes.create_string_buffer(512)
        run = getattr(self._lib, f"qlorakit_emulate_{name}")
        status = run(dims[0], dims[1], pointers, shared_mem, WORKERS, message, len(message))
        if status != 0:
            raise RuntimeError(f"emulated {name}: {message.value.decode(errors='replace')}")


def _wrappers(names: Sequence[str]) -> str:
    lines = ['\n#line 1 "qlorakit_emulation_wrappers"']
    for name in names:
        lines.append(
            f'extern "C" int qlorakit_emulate_{name}(const unsigned int* grid, const unsigned int* block, '
            f"void** args, unsigned int shared_mem, int workers, char* message, int message_len) {{ "
            f"return qlorakit_emu::launch({name}, grid, block, args, shared_mem, workers, message, message_len); }}"
        )
        lines.append(
            f'extern "C" int qlorakit_params_{name}(int* kinds, int* sizes, int capacity) {{ '
            f"return qlorakit_emu::describe({name}, kinds, sizes, capacity); }}"
        )
    return "\n".join(lines) + "\n"


def build_source(source: str, names: Sequence[str]) -> EmulatedModule:
    """Compiles a complete kernel ``source`` (as :func:`qlorakit.kernels.kernel_source` returns it) with the
    kernels ``names`` exposed for :meth:`EmulatedModule.launch`."""
    full = source + _wrappers(names)
    shim = SHIM.read_text(encoding="utf-8")
    digest = hashlib.sha256("\0".join([full, shim, CXX, *CXXFLAGS]).encode()).hexdigest()[:24]
    module = _modules.get(digest)
    if module is not None:
        return module
    cache = Path(tempfile.gettempdir()) / f"qlorakit-emulation-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"{digest}.so"
    if not library.exists():
        # Compile into a private directory, then rename: concurrent builds of the same source never see a
        # half-written library.
        with tempfile.TemporaryDirectory(dir=cache) as work:
            src = Path(work) / "kernels.cpp"
            src.write_text(full, encoding="utf-8")
            out = Path(work) / "kernels.so"
            command = [CXX, *CXXFLAGS, "-include", str(SHIM), str(src), "-o", str(out)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"host compile of the kernels failed:\n{' '.join(command)}\n{result.stderr}")
            os.replace(out, library)
    module = _modules[digest] = EmulatedModule(library, names)
    return module


def build(file: str, defines: Mapping[str, str] | None = None) -> EmulatedModule:
    """The kernels of ``qlorakit/kernels/cuda/FILE`` (with ``defines``) compiled for the CPU; cached per source."""
    return build_source(kernel_source(file, defines), kernel_names(file))


def build_text(text: str, names: Sequence[str], label: str = "test_kernel.cu") -> EmulatedModule:
    """Like :func:`build` for kernel text that is not a file in ``qlorakit/kernels/cuda/`` (tests of the shim
    itself)."""
    return build_source(kernel_source_from_text(text, label), names)


class GuardedBuffers:
    """Arrays whose last byte is followed by an inaccessible page: a kernel that reads or writes one byte
    past the end faults (the test process dies loudly) instead of passing by luck."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def array(self, data: np.ndarray, alignment: int = 16) -> np.ndarray:
        """A copy of ``data`` (C order) that starts ``alignment``-aligned and ends as close before a guard page
        as that alignment allows (exactly at it when ``data.nbytes`` is a multiple of ``alignment``)."""
        data = np.ascontiguousarray(data)
        page = mmap.PAGESIZE
        pages = -(-data.nbytes // page) + 1
        region = mmap.mmap(-1, (pages + 1) * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        if self._libc.mprotect(ctypes.c_void_p(base + pages * page), page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        start = pages * page - data.nbytes
        start -= start % alignment
        view = np.frombuffer(region, dtype=np.uint8, count=data.nbytes, offset=start).view(data.dtype)
        view = view.reshape(data.shape)
        view[...] = data
        self._maps.append(region)
        return view


# ---- the reference check of the batch-1 matvec, shared by the emulated and the GPU tests


def cpu_packed(packed: PackedWeight) -> PackedWeight:
    """``packed`` with its tensors on the CPU."""
    return packed.to("cpu")


def assert_gemv_close(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None, got: torch.Tensor) -> None:
    """``got`` against ``W x + b`` in float64 with W the Rust core's dequantization in x's dtype.

    Tolerance: the kernel decodes each weight exactly as the reference does and rounds it to x's dtype, so the
    products are the reference's; only the order of the float32 sums differs (per lane, sequential fmaf over
    at most cols/32 + 32 terms; then a 5-level shuffle tree and the bias add), plus the final rounding to x's
    dtype. Standard error bounds: |error| <= gamma_m * (sum |w x| + |b|) + u_out * |y| with
    gamma_m = m u / (1 - m u), u = 2^-24, m = cols/32 + 32 + 6, and an absolute 2^-24 for float16 subnormals."""
    rows, cols = packed.shape
    weight = qlorakit.dequantize(cpu_packed(packed), x.dtype).double()
    x, got = x.cpu().reshape(-1), got.cpu().reshape(-1)
    bias = bias.cpu() if bias is not None else None
    x64 = x.double()
    b64 = bias.double() if bias is not None else torch.zeros(rows, dtype=torch.float64)
    expected = weight @ x64 + b64
    magnitude = weight.abs() @ x64.abs() + b64.abs()
    m = cols // 32 + 32 + 6
    u = 2.0**-24
    gamma = m * u / (1 - m * u)
    tolerance = gamma * magnitude + _UNIT_ROUNDOFF[x.dtype] * expected.abs() + 2.0**-24
    error = (got.double() - expected).abs()
    assert torch.isfinite(got).all()
    assert (error <= tolerance).all(), (error / tolerance).max()
