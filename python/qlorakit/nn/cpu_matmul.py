"""The dtype the CPU's dense matmuls of a 4-bit layer run in (its weight dequantized, then multiplied).

torch multiplies bfloat16 and float16 matrices on the CPU with oneDNN where oneDNN supports the dtype on that CPU
(AVX-512 and newer for bfloat16; AVX-512 FP16 or AVX-NE-CONVERT for float16); elsewhere, e.g. on an AVX2-only CPU,
it falls back to a generic loop 6x (``x @ W^T``) to over 100x (``grad @ W``) slower than its float32 matmul. On such
a CPU the 4-bit layers multiply in float32 instead: the weight dequantized in the compute dtype (so its values are
the same), widened exactly, the input widened exactly, one float32 matmul (float32 sums, as oneDNN's 16-bit matmul
also keeps), and the result rounded once to the compute dtype. Both routes round float32 sums once, in their own
summation order, so they agree to that order (an output may differ in its last place where the two float32 sums fall
on either side of a rounding boundary).

Which CPUs oneDNN covers is torch's own answer, ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` and
``_is_mkldnn_fp16_supported()`` (what torch's tests ask). ``QLORAKIT_CPU_MATMUL`` overrides it: ``auto`` (the
default), ``native`` (always the compute dtype) or ``float32`` (always float32); read on every call, an unknown
value raises :class:`~qlorakit.errors.QlorakitError`.
"""

from __future__ import annotations

import functools

import torch

from qlorakit.env_settings import env_choice

CPU_MATMUL_ENV = "QLORAKIT_CPU_MATMUL"
#: The settings of ``QLORAKIT_CPU_MATMUL``; the first is the default.
CPU_MATMUL_SETTINGS = ("auto", "native", "float32")

#: torch's probe, per 16-bit dtype, of whether oneDNN multiplies it on this CPU.
_ONEDNN_PROBES = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.cache
def onednn_multiplies(dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` matrices with oneDNN on this CPU (float32 and float64: always native). A
    torch without the probe counts as yes (nothing is changed where nothing is known)."""
    name = _ONEDNN_PROBES.get(dtype)
    if name is None:
        return True
    probe = getattr(torch.ops.mkldnn, name, None)
    if probe is None:
        return True
    try:
        return bool(probe())
    except RuntimeError:
        return True


def setting() -> str:
    """``QLORAKIT_CPU_MATMUL``, checked (unset or empty: ``auto``)."""
    return env_choice(CPU_MATMUL_ENV, CPU_MATMUL_SETTINGS, "CPU matmul setting")


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU 4-bit layer computing in ``dtype`` multiplies in: ``dtype``, or float32 for a 16-bit dtype
    oneDNN does not multiply here (or when ``QLORAKIT_CPU_MATMUL=float32``)."""
    if dtype not in _ONEDNN_PROBES:
        return dtype
    chosen = setting()
    if chosen == "native" or (chosen == "auto" and onednn_multiplies(dtype)):
        return dtype
    return torch.float32
