"""Double quantization of the block scales, against bitsandbytes 0.50's CPU path."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import qlorakit
from helpers.bnb_reference import bnb_state_of, compare_nested, decode_nested
from qlorakit import _core
from qlorakit.tables import dynamic_map

# Differences bitsandbytes' CPU path is known to produce: its 8-bit quantizer picks
# codes through a 65536-bin lookup table, which is only approximately nearest.


def test_map_equals_bitsandbytes(bnb_functional) -> None:
    expected = bnb_functional.create_dynamic_map(signed=True).float()
    assert torch.equal(dynamic_map().view(torch.int32), expected.view(torch.int32))
    digest = hashlib.sha256(dynamic_map().numpy().astype("<f4").tobytes()).hexdigest()
    assert digest == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


def test_real_checkpoint_nested_codes_are_explained(minilm_weights, torch_one_thread) -> None:
    totals = {"blocks": 0, "differences": 0}
    for name, weight in minilm_weights.items():
        if not weight.is_floating_point():
            continue
        for quant_type in ("nf4", "fp4"):
            result = compare_nested(weight.to(torch.bfloat16), quant_type, 64)
            assert result.offset_equal, f"{name}: offset differs from bitsandbytes' single-thread mean"
            assert result.ours_worse == 0, f"{name}: {result.ours_worse} reconstructed absmax worse than bnb"
            totals["blocks"] += result.blocks
            totals["differences"] += result.code_differences
    print(f"\nMiniLM nested codes: {totals['differences']} of {totals['blocks']} differ from bitsandbytes")
    # The LUT is close to exact: differences are rare but do occur on real data.
    assert totals["differences"] < totals["blocks"] * 0.01


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 512)])
def test_large_random_nested_codes_are_explained(shape: tuple[int, int], torch_one_thread) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    result = compare_nested(x, "nf4", 64)
    assert result.blocks > 32768  # beyond the size where bnb's mean depends on threads
    assert result.offset_equal and result.ours_worse == 0
    print(f"\n{shape}: {result.code_differences} of {result.blocks} nested codes differ from bitsandbytes")


def test_offset_is_thread_count_independent_and_bnb_is_not(bnb_functional) -> None:
    """Our offset equals torch's single-thread mean for any torch thread count;
    bitsandbytes' offset follows torch's threads for more than 32768 blocks."""
    generator = torch.Generator().manual_seed(1)
    bnb_changes = []
    for _ in range(6):
        # float32 input: block maxima with full mantissas, so summation order matters.
        x = torch.randn(40_000 * 64, generator=generator) * 0.37
        ours = qlorakit.quantize(x)
        absmax = qlorakit.quantize(x, double_quant=False).absmax
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = float(absmax.mean())
            torch.set_num_threads(2)
            multi = float(absmax.mean())
        finally:
            torch.set_num_threads(threads)
        assert ours.offset == single
        assert _core.torch_order_mean(absmax.numpy().view(np.uint8)) == single
        bnb_changes.append(single != multi)
    print(f"\nbitsandbytes' offset changed with torch's thread count on {sum(bnb_changes)} of {len(bnb_changes)}")
    assert any(bnb_changes), "expected torch's 2-thread mean to round differently at least once"


@pytest.mark.parametrize("n", [1, 5, 7, 8, 9, 31, 33, 100, 1000, 4097, 32768, 65537, 300_001])
def test_mean_matches_torch_single_thread(n: int, torch_one_thread) -> None:
    values = np.random.default_rng(n).random(n, dtype=np.float32) * np.float32(7.3)
    assert _core.torch_order_mean(values.view(np.uint8)) == float(torch.from_numpy(values).mean())


def test_absmax_rebuild_is_two_roundings_not_fma() -> None:
    """``map[code] * scale`` rounded, then ``+ offset`` rounded — never a fused multiply-add,
    which differs in a few percent of entries."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3000 * 64, generator=generator) * 0.1
    packed = qlorakit.quantize(x)
    got = qlorakit.decode_absmax(packed)
    two_roundings = decode_nested(packed.absmax, packed.nested_absmax, packed.offset)
    assert torch.equal(got, two_roundings)
    per_block = packed.nested_absmax.double().repeat_interleave(256)[: packed.absmax.numel()]
    fused = (dynamic_map()[packed.absmax.long()].double() * per_block + packed.offset).float()
    assert not torch.equal(got, fused), "expected some entries where an FMA would round differently"


def test_nested_dtype_bfloat16_is_decoded_like_bitsandbytes(bnb_functional) -> None:
    """bitsandbytes writes ``"nested_dtype": "bfloat16"`` after a CPU inference pass;
    decoding such a file must follow its bf16 arithmetic."""
    x = (torch.randn(80, 128) * 0.05).to(torch.bfloat16)
    packed = qlorakit.quantize(x)
    packed = packed.with_layout(nested_dtype=torch.bfloat16)
    state = bnb_state_of(packed)
    expected = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(qlorakit.decode_absmax(packed), expected.float())
