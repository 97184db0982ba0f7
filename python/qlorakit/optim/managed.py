"""CUDA managed (unified) memory for optimizer states: allocated through CuPy, seen by torch
as an ordinary CUDA tensor without a copy, advised and prefetched to the GPU.

Why managed memory: the driver may move its pages between the GPU and host RAM on demand.
When a long sequence makes activations spike, the device memory the states occupied can be
taken, the states' pages go to host RAM, and training continues instead of raising an
out-of-memory error; the prefetch before each update brings them back.

How torch sees it: each allocation (``cupy.cuda.malloc_managed``) is wrapped in a small
object exporting ``__cuda_array_interface__``; ``torch.as_tensor`` builds a tensor on that
pointer and keeps a reference to the object until the tensor's storage dies, so the CuPy
allocation lives exactly as long as any tensor (or view) on it.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import torch

# CUDA runtime enum values (cudaMemoryAdvise, cudaDeviceAttr); stable since CUDA 8.
_ADVISE_SET_PREFERRED_LOCATION = 3
_ADVISE_SET_ACCESSED_BY = 5
_ATTR_MANAGED_MEMORY = 83
_ATTR_CONCURRENT_MANAGED_ACCESS = 89


class ManagedBuffer:
    """One float32 managed allocation of ``numel`` elements on CUDA device ``device_index``,
    exported to torch through ``__cuda_array_interface__`` (version 2: no stream to sync with,
    the memory is fresh)."""

    __slots__ = ("memory", "numel", "device_index", "__weakref__")

    def __init__(self, memory: Any, numel: int, device_index: int) -> None:
        self.memory = memory  # cupy.cuda.MemoryPointer over a cupy.cuda.ManagedMemory
        self.numel = numel
        self.device_index = device_index

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.numel,), "typestr": "<f4", "data": (self.memory.ptr, False), "version": 2}


# Base pointer -> buffer, for finding the allocation behind a state tensor when prefetching.
# Weak values: the entry disappears with the last tensor on the allocation.
_BUFFERS: weakref.WeakValueDictionary[int, ManagedBuffer] = weakref.WeakValueDictionary()


@functools.cache
def _device_attribute(device_index: int, attribute: int) -> int:
    from qlorakit.kernels.cupy_loader import require_cupy

    return int(require_cupy().cuda.runtime.deviceGetAttribute(attribute, device_index))


def managed_memory_supported(device_index: int) -> bool:
    """Whether the device can allocate managed memory at all (not on some virtualized GPUs)."""
    return _device_attribute(device_index, _ATTR_MANAGED_MEMORY) != 0


def concurrent_managed_access(device_index: int) -> bool:
    """Whether pages can migrate on demand while kernels run (Linux, Pascal or newer). Without
    it (Windows, WSL) managed memory still works, but prefetch is not supported."""
    return _device_attribute(device_index, _ATTR_CONCURRENT_MANAGED_ACCESS) != 0


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def managed_zeros(numel: int, device: torch.device) -> torch.Tensor:
    """A 1-D float32 tensor of zeros in CUDA managed memory, preferring ``device``.

    Falls back, with a warning, to ordinary device memory where the GPU has no managed
    memory (the optimizer then works, but its states cannot page out)."""
    from qlorakit.kernels.cupy_loader import require_cupy

    cupy = require_cupy()
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    if numel == 0 or not managed_memory_supported(device_index):
        if numel:
            _warn_once(
                f"unsupported:{device_index}",
                f"CUDA device {device_index} has no managed memory; qlorakit.optim keeps its states in ordinary "
                "device memory there (they cannot page out to host RAM)",
            )
        return torch.zeros(numel, dtype=torch.float32, device=torch.device("cuda", device_index))

    with cupy.cuda.Device(device_index):
        memory = cupy.cuda.malloc_managed(numel * 4)
        _advise(memory, device_index)
    buffer = ManagedBuffer(memory, numel, device_index)
    tensor = torch.as_tensor(buffer, device=torch.device("cuda", device_index))
    if tensor.data_ptr() != memory.ptr:  # torch copied instead of wrapping: a torch/CuPy mismatch
        raise RuntimeError("torch copied a managed allocation instead of wrapping it")
    _BUFFERS[memory.ptr] = buffer
    # The first touch is a kernel on torch's current stream: the pages are created in device
    # memory (the preferred location) rather than in host RAM and migrated at the first step.
    tensor.zero_()
    return tensor


def _advise(memory: Any, device_index: int) -> None:
    """Memory advice for one state allocation (hints: a failure is a warning, not an error).

    * SetPreferredLocation = the GPU: device memory is the pages' home, where the driver puts
      them when it resolves a fault on them. It does not pin them: under memory pressure they
      are still evicted to host RAM (managed memory can be oversubscribed on Linux since
      Pascal), which is the point of paging.
    * SetAccessedBy = the GPU: the GPU's page tables keep a mapping of the pages wherever they
      are. A kernel touching a page that was evicted then reads it over the interconnect
      instead of faulting; under heavy oversubscription this avoids fault storms, where each
      migration evicts a page the same step needs next. The price is that an evicted page
      would stay remote, so ``prefetch_to_device`` migrates each parameter's states back right
      before its update, as far as there is room.
    """
    from qlorakit.kernels.cupy_loader import require_cupy

    cupy = require_cupy()
    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device(device_index)
    for name, value in (
        ("cudaMemAdviseSetPreferredLocation", _ADVISE_SET_PREFERRED_LOCATION),
        ("cudaMemAdviseSetAccessedBy", _ADVISE_SET_ACCESSED_BY),
    ):
        try:
            # ManagedMemory.advise takes a device ordinal and CuPy builds the cudaMemLocation
            # the CUDA 13 runtime wants (cudaMemAdvise(ptr, n, advice, cudaMemLocation) there,
            # an int device before); so one call covers both toolkits.
            memory.mem.advise(getattr(runtime, name, value), device)
        except Exception as error:  # advice is optional: keep going without it
            _warn_once(f"advise:{name}", f"cudaMemAdvise({name}) failed ({error}); continuing without it")


def managed_buffer(tensor: torch.Tensor) -> ManagedBuffer | None:
    """The managed allocation under ``tensor`` (any view of it), or None for other memory."""
    if not tensor.is_cuda:
        return None
    return _BUFFERS.get(tensor.untyped_storage().data_ptr())


def prefetch_to_device(tensor: torch.Tensor) -> bool:
    """Enqueues the migration of the whole managed allocation under ``tensor`` to its GPU on
    torch's current stream, so the kernel launched next on that stream finds its pages
    resident instead of faulting them in a few KB at a time. Returns False (and does nothing)
    for ordinary memory or where the device cannot prefetch.

    Stream-ordered and asynchronous: it waits for earlier work on the stream (the backward
    pass that wrote the gradients) and the update kernel waits for it. Pages already on the
    GPU cost nothing to move. Under oversubscription the driver evicts other managed pages
    (those it deems least recently used) to make room, which is why the optimizer prefetches
    each parameter's states right before its own update rather than all of them up front:
    prefetching everything first would evict the first parameters' states again before
    their kernels ran.

    The runtime call changed in CUDA 13 (cudaMemPrefetchAsync takes a cudaMemLocation and
    flags instead of a device ordinal); CuPy's ``ManagedMemory.prefetch`` hides the
    difference, so this works with CuPy built for either toolkit.
    """
    buffer = managed_buffer(tensor)
    if buffer is None or not concurrent_managed_access(buffer.device_index):
        return False
    from qlorakit.kernels.cupy_loader import current_stream

    try:
        buffer.memory.mem.prefetch(current_stream(buffer.device_index))
    except Exception as error:  # prefetch is an optimization: pages still fault in
        _warn_once("prefetch", f"cudaMemPrefetchAsync failed ({error}); states will migrate on demand instead")
        return False
    return True
