"""Helpers that run bitsandbytes on the same input and compare its output with ours."""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as F
import torch

import qlorakit
from qlorakit.formats import NESTED_BLOCKSIZE
from qlorakit.tables import dynamic_map


def use_exact_bnb_layers() -> None:
    """Makes bitsandbytes' ``Linear4bit`` layers built from now on compute as on every CPU: dequantize, then
    multiply. On a CPU with AVX512-BF16, bitsandbytes otherwise repacks a layer's weight on its first eval()
    forward and runs a fused kernel with its scales rounded to bfloat16 (another result, bit for bit, than
    the machine without it; it also asserts on some shapes, e.g. a layer of one output). The tests compare
    qlorakit with bitsandbytes' reference path on every machine; the fused kernel is measured against in
    ``tools/bench_gemv.py`` and ``tools/bench_model.py``."""
    import bitsandbytes.nn.modules as modules

    modules.has_avx512bf16 = lambda: False


def bnb_quantize(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """bitsandbytes' CPU ``quantize_4bit`` → (packed uint8 [(n+1)//2, 1], QuantState)."""
    return F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def bnb_state_of(packed: qlorakit.PackedWeight):
    """Our packed weight as bitsandbytes reads it: ``QuantState.from_dict`` over the
    tensors of ``state_dict`` (so this also checks bitsandbytes loads our serialization)."""
    tensors = packed.state_dict("weight")
    qs_dict = {key.removeprefix("weight."): t for key, t in tensors.items() if key != "weight"}
    return F.QuantState.from_dict(qs_dict, device=torch.device("cpu"))


def assert_same_packing(x: torch.Tensor, quant_type: str, blocksize: int) -> qlorakit.PackedWeight:
    """Packed codes and float32 absmax byte-for-byte equal to bitsandbytes'."""
    ref_packed, ref_state = bnb_quantize(x, quant_type, blocksize, double_quant=False)
    ours = qlorakit.quantize(x, quant_type, blocksize, double_quant=False)
    context = f"{quant_type} bs={blocksize} shape={tuple(x.shape)} dtype={x.dtype}"
    assert ours.codes.shape == ref_packed.shape, context
    mismatched = (ours.codes != ref_packed).nonzero()
    assert mismatched.numel() == 0, f"{context}: {mismatched.shape[0]} packed bytes differ, first {mismatched[:4]}"
    assert torch.equal(ours.absmax.view(torch.int32), ref_state.absmax.view(torch.int32)), f"{context}: absmax differs"
    return ours


@dataclass
class NestedComparison:
    """How our double-quantized scales compare with bitsandbytes' on one tensor."""

    blocks: int
    code_differences: int
    offset_equal: bool
    ours_worse: int  # blocks whose reconstructed absmax is further from the true one than bnb's


def decode_nested(codes: torch.Tensor, scales: torch.Tensor, offset: float) -> torch.Tensor:
    """``map[code] * scale`` rounded to float32, then ``+ offset`` rounded: bnb's rule, in torch."""
    per_block = scales.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    return (dynamic_map()[codes.long()] * per_block) + torch.tensor(offset, dtype=torch.float32)


def compare_nested(x: torch.Tensor, quant_type: str, blocksize: int) -> NestedComparison:
    """Quantizes with double quantization both ways; asserts the packed codes are equal
    and every nested code that differs is explained: ours is the nearer map entry to the
    scaled value (bnb's CPU path uses an approximate 65536-bin lookup table), or bnb's
    offset differs (its CPU mean depends on torch's thread count)."""
    ref_packed, ref_state = bnb_quantize(x, quant_type, blocksize, double_quant=True)
    ours = qlorakit.quantize(x, quant_type, blocksize, double_quant=True)
    assert torch.equal(ours.codes, ref_packed)
    true_absmax = qlorakit.quantize(x, quant_type, blocksize, double_quant=False).absmax

    ref_offset = float(ref_state.offset)
    offset_equal = ref_offset == ours.offset
    ref_codes = ref_state.absmax
    differs = ours.absmax != ref_codes
    if offset_equal:
        # Same offset → same values to encode and the same per-256 scales.
        assert torch.equal(ours.nested_absmax, ref_state.state2.absmax)
        shifted = true_absmax - torch.tensor(ours.offset, dtype=torch.float32)
        scale = ours.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: shifted.numel()]
        scaled = shifted * (1.0 / scale)
        table = dynamic_map()
        ours_dist = (table[ours.absmax.long()].double() - scaled.double()).abs()
        ref_dist = (table[ref_codes.long()].double() - scaled.double()).abs()
        not_nearer = differs & (ours_dist > ref_dist)
        assert not not_nearer.any(), f"{int(not_nearer.sum())} nested codes where bitsandbytes' is nearer"
        # A tie in distance must have gone to the lower index.
        ties = differs & (ours_dist == ref_dist)
        assert (ours.absmax[ties] < ref_codes[ties]).all()

    ours_error = (qlorakit.decode_absmax(ours) - true_absmax).abs()
    ref_error = (decode_nested(ref_codes, ref_state.state2.absmax, ref_offset) - true_absmax).abs()
    return NestedComparison(
        blocks=true_absmax.numel(),
        code_differences=int(differs.sum()),
        offset_equal=offset_equal,
        ours_worse=int((ours_error > ref_error).sum()),
    )
