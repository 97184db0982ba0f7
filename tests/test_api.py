"""The Python API: inputs, outputs, serialization and errors."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

import qlorakit
from helpers.bnb_reference import bnb_quantize
from qlorakit import NonFiniteError, QlorakitError, QuantizationError, formats
from qlorakit.formats import BLOCKSIZES
from qlorakit.tables import code_table, dynamic_map


def test_constants_come_from_the_core(bnb_functional) -> None:
    for quant_type in ("nf4", "fp4"):
        expected = bnb_functional.get_4bit_type(quant_type, device="cpu").float()
        assert torch.equal(code_table(quant_type), expected)
    assert BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert dynamic_map().shape == (256,)
    # Defined once in the Rust core, read through qlorakit.formats.
    assert formats.QUANT_TYPES == ("nf4", "fp4")
    assert formats.QUANT_STATE_MARKER == ".quant_state.bitsandbytes__"
    assert formats.DEFAULT_MAX_SHARD_SIZE == "5GB"


def test_subpackages_are_attributes_and_import_stays_torch_free() -> None:
    """``import qlorakit; qlorakit.nn.Linear4bit`` as the README writes it; the bare import no torch."""
    import subprocess
    import sys

    code = (
        "import sys, qlorakit\n"
        "assert 'torch' not in sys.modules, 'import qlorakit imported torch'\n"
        "assert {'nn', 'optim'} <= set(dir(qlorakit))\n"
        "linear, adamw = qlorakit.nn.Linear4bit, qlorakit.optim.PagedAdamW\n"
        "from qlorakit.nn import Linear4bit\n"
        "from qlorakit.optim import PagedAdamW\n"
        "assert linear is Linear4bit and adamw is PagedAdamW\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert qlorakit.nn.Linear4bit.__name__ == "Linear4bit"
    with pytest.raises(AttributeError):
        qlorakit.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_matches_bitsandbytes_serialization(quant_type: str, double_quant: bool, torch_one_thread) -> None:
    """Same keys, dtypes, shapes and JSON bytes as ``QuantState.as_dict(packed=True)``."""
    x = (torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    packed, state = bnb_quantize(x, quant_type, 64, double_quant)
    expected = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = qlorakit.quantize(x, quant_type, 64, double_quant).state_dict("weight")
    assert list(ours) == list(expected)
    for key, tensor in expected.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
    state_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    assert bytes(ours[state_key].numpy()) == bytes(expected[state_key].numpy())
    for key in expected:
        if key != "weight.absmax" or not double_quant:
            assert torch.equal(ours[key], expected[key]), key


def test_state_dict_round_trip_with_prefix() -> None:
    x = torch.randn(33, 17)
    original = qlorakit.quantize(x, "fp4", 32)
    tensors = original.state_dict("model.layers.0.mlp.up_proj.weight")
    assert all(k.startswith("model.layers.0.mlp.up_proj.weight") for k in tensors)
    restored = qlorakit.PackedWeight.from_state_dict(tensors, "model.layers.0.mlp.up_proj.weight")
    assert restored.shape == (33, 17) and restored.quant_type == "fp4" and restored.blocksize == 32
    assert torch.equal(qlorakit.dequantize(restored), qlorakit.dequantize(original))
    state = json.loads(bytes(tensors["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"].numpy()))
    assert state["nested_offset"] == original.offset


def test_quant_storage_bfloat16_is_read() -> None:
    x = torch.randn(64, 64)
    packed = qlorakit.quantize(x)
    packed = packed.with_layout(quant_storage=torch.bfloat16)
    tensors = packed.state_dict("w")
    assert tensors["w"].dtype == torch.bfloat16 and tensors["w"].shape == (1024, 1)
    restored = qlorakit.PackedWeight.from_state_dict(tensors, "w")
    assert torch.equal(qlorakit.dequantize(restored), qlorakit.dequantize(packed))


def test_numpy_input_and_zero_copy_dequantize_into_out() -> None:
    array = np.random.default_rng(0).standard_normal((100, 64)).astype(np.float32)
    from_numpy = qlorakit.quantize(array)
    from_torch = qlorakit.quantize(torch.from_numpy(array.copy()))
    assert torch.equal(from_numpy.codes, from_torch.codes)
    out = torch.empty(100, 64, dtype=torch.bfloat16)
    result = qlorakit.dequantize(from_numpy, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(result, qlorakit.dequantize(from_torch, torch.bfloat16))
    assert qlorakit.quantize(array.astype(np.float16)).dtype == torch.float16


def test_out_packed_weight_is_reused() -> None:
    first = torch.randn(256, 64)
    second = torch.randn(256, 64)
    buffer = qlorakit.quantize(first)
    pointer = buffer.codes.data_ptr()
    reused = qlorakit.quantize(second, out=buffer)
    assert reused is buffer and buffer.codes.data_ptr() == pointer
    assert torch.equal(buffer.codes, qlorakit.quantize(second).codes)
    with pytest.raises(QuantizationError, match="layout"):
        qlorakit.quantize(torch.randn(3, 3), out=buffer)


def test_reconstruction_error_is_small() -> None:
    x = torch.randn(512, 512)
    error = (qlorakit.dequantize(qlorakit.quantize(x), torch.float32) - x).norm() / x.norm()
    assert 0.05 < float(error) < 0.15  # NF4's typical ~0.1 relative error on Gaussian data


def test_gil_is_released_during_quantization() -> None:
    """Two Python threads quantizing at once both make progress and get correct results."""
    x = torch.randn(2048, 2048).to(torch.bfloat16)
    expected = qlorakit.quantize(x).codes
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(qlorakit.quantize(x).codes)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and all(torch.equal(r, expected) for r in results)


class TestErrors:
    def test_nan_and_inf_are_refused_with_their_position(self) -> None:
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = torch.zeros(10, 100, dtype=torch.bfloat16)
            x[7, 3] = bad
            x[9, 9] = bad
            with pytest.raises(NonFiniteError, match="index 703"):
                qlorakit.quantize(x)

    def test_exception_hierarchy(self) -> None:
        assert issubclass(NonFiniteError, QuantizationError)
        assert issubclass(QuantizationError, QlorakitError)
        assert issubclass(QlorakitError, Exception)

    @pytest.mark.parametrize("blocksize", [0, 16, 100, 8192])
    def test_unsupported_blocksize(self, blocksize: int) -> None:
        with pytest.raises(QuantizationError, match="blocksize"):
            qlorakit.quantize(torch.randn(64), blocksize=blocksize)

    def test_unsupported_quant_type(self) -> None:
        with pytest.raises(QuantizationError, match="quant_type"):
            qlorakit.quantize(torch.randn(64), quant_type="int4")

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
    def test_unsupported_dtype(self, dtype: torch.dtype) -> None:
        with pytest.raises(QuantizationError, match="dtype"):
            qlorakit.quantize(torch.ones(64, dtype=dtype))

    def test_unsupported_numpy_dtype(self) -> None:
        with pytest.raises(QuantizationError, match="dtype"):
            qlorakit.quantize(np.ones(64, dtype=np.float64))

    def test_empty(self) -> None:
        with pytest.raises(QuantizationError, match="empty"):
            qlorakit.quantize(torch.empty(0, 64))

    def test_non_contiguous(self) -> None:
        with pytest.raises(QuantizationError, match="contiguous"):
            qlorakit.quantize(torch.randn(64, 64).t())
        with pytest.raises(QuantizationError, match="contiguous"):
            qlorakit.quantize(np.ones((64, 64), dtype=np.float32)[:, ::2])

    def test_wrong_type(self) -> None:
        with pytest.raises(QuantizationError, match="torch.Tensor or numpy.ndarray"):
            qlorakit.quantize([1.0, 2.0])  # type: ignore[arg-type]

    def test_dequantize_out_mismatch(self) -> None:
        packed = qlorakit.quantize(torch.randn(8, 8))
        with pytest.raises(QuantizationError, match="out"):
            qlorakit.dequantize(packed, out=torch.empty(8, 9))

    def test_native_layer_checks_buffers(self) -> None:
        """The bindings validate raw buffers themselves: a wrong length is an error, not a crash."""
        from qlorakit import _core

        values = np.zeros(100, dtype=np.float32).view(np.uint8)
        with pytest.raises(QuantizationError, match="packed output has 10 elements, expected 50"):
            _core.quantize_4bit(values, "float32", "nf4", 64, np.zeros(10, np.uint8), np.zeros(8, np.uint8))
        with pytest.raises(QuantizationError, match="writable"):
            _core.quantize_4bit(values, "float32", "nf4", 64, bytes(50), np.zeros(8, np.uint8))
        with pytest.raises(QuantizationError, match="overlaps"):
            _core.quantize_4bit(values, "float32", "nf4", 64, values[:50], np.zeros(8, np.uint8))
        with pytest.raises(QuantizationError, match="aligned"):
            _core.quantize_4bit(values[1:], "float32", "nf4", 64, np.zeros(50, np.uint8), np.zeros(8, np.uint8))

    def test_corrupt_state_dict(self) -> None:
        tensors = qlorakit.quantize(torch.randn(8, 8)).state_dict("w")
        broken = dict(tensors)
        del broken["w.absmax"]
        with pytest.raises(QuantizationError, match="missing tensor 'w.absmax'"):
            qlorakit.PackedWeight.from_state_dict(broken, "w")
        broken = dict(tensors)
        broken["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
        with pytest.raises(QuantizationError, match="not valid JSON"):
            qlorakit.PackedWeight.from_state_dict(broken, "w")
        broken = dict(tensors)
        broken["w"] = tensors["w"][:5]
        with pytest.raises(QuantizationError, match="packed data holds 5 bytes"):
            qlorakit.PackedWeight.from_state_dict(broken, "w")


def test_double_quant_overflow_is_an_error_not_nan() -> None:
    """Block maxima near float32's limit make their mean overflow; bitsandbytes would
    silently produce NaN scales, we refuse and point to double_quant=False."""
    x = torch.full((128,), 3e38)
    with pytest.raises(QuantizationError, match="double_quant=False"):
        qlorakit.quantize(x)
    assert torch.isfinite(qlorakit.dequantize(qlorakit.quantize(x, double_quant=False))).all()


class TestScaleSearch:
    """Opt-in error-optimal scales: same format, lower error, still read by bitsandbytes."""

    def test_real_checkpoint_error_drops_and_no_tensor_gets_worse(self, minilm_weights) -> None:
        absmax_total = searched_total = 0.0
        for name, weight in minilm_weights.items():
            if not weight.is_floating_point():
                continue
            absmax_error = float((qlorakit.dequantize(qlorakit.quantize(weight), torch.float32) - weight).pow(2).sum())
            searched = qlorakit.dequantize(qlorakit.quantize(weight, scale_search=True), torch.float32)
            searched_error = float((searched - weight).pow(2).sum())
            assert searched_error <= absmax_error, name
            absmax_total += absmax_error
            searched_total += searched_error
        print(f"\nMiniLM squared error: absmax {absmax_total:.3f}, scale search {searched_total:.3f}")
        assert searched_total < 0.9 * absmax_total

    def test_bitsandbytes_decodes_searched_scales_like_we_do(self, bnb_functional) -> None:
        from helpers.bnb_reference import bnb_state_of

        x = (torch.randn(96, 128, generator=torch.Generator().manual_seed(9)) * 0.05).to(torch.bfloat16)
        packed = qlorakit.quantize(x, scale_search=True)
        expected = bnb_functional.dequantize_4bit(packed.codes, bnb_state_of(packed))
        assert torch.equal(qlorakit.dequantize(packed), expected)

    @pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
    @pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
    @pytest.mark.parametrize("double_quant", [True, False])
    def test_every_layout_beats_absmax_and_decodes_in_bitsandbytes(
        self, bnb_functional, quant_type: str, blocksize: int, double_quant: bool
    ) -> None:
        from helpers.bnb_reference import bnb_state_of

        # Heavy-tailed values (Student-t-like), an odd element count (a trailing partial
        # block and a padded nibble) and one all-zero stretch.
        g = torch.Generator().manual_seed(blocksize)
        x = torch.randn(301, 77, generator=g) / torch.rand(301, 77, generator=g).add(0.05).sqrt()
        x[5, :] = 0.0
        x = x.to(torch.bfloat16)
        absmax = qlorakit.quantize(x, quant_type, blocksize, double_quant)
        searched = qlorakit.quantize(x, quant_type, blocksize, double_quant, scale_search=True)
        exact = x.float()
        error = {
            name: float((qlorakit.dequantize(p, torch.float32) - exact).pow(2).sum())
            for name, p in (("absmax", absmax), ("search", searched))
        }
        assert error["search"] <= error["absmax"], error
        if blocksize <= 256:  # enough blocks for clipping to pay off
            assert error["search"] < 0.95 * error["absmax"], error
        expected = bnb_functional.dequantize_4bit(searched.codes, bnb_state_of(searched))
        assert torch.equal(qlorakit.dequantize(searched), expected)

    def test_importance_must_match_the_input_columns(self) -> None:
        x = torch.randn(8, 64)
        with pytest.raises(qlorakit.QuantizationError, match="one weight per input column"):
            qlorakit.quantize(x, scale_search=True, importance=torch.ones(32))
        with pytest.raises(qlorakit.QuantizationError, match=">= 0"):
            qlorakit.quantize(x, scale_search=True, importance=-torch.ones(64))
        with pytest.raises(qlorakit.QuantizationError, match="scale_search"):
            qlorakit.quantize(x, importance=torch.ones(64))
