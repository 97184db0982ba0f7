"""The native module's typed objects: ``QuantizeOptions`` (validated in Rust, frozen), the
reports ``quantize_checkpoint`` and ``quantize_4bit_searched`` return, and the safetensors
headers and tensor entries ``read_header`` and ``list_tensors`` return."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qlorakit import _core
from qlorakit.errors import CheckpointError, QuantizationError

FORMAT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "max_shard_bytes": 1 << 30}


def test_options_keep_what_they_were_given_and_are_frozen() -> None:
    options = _core.QuantizeOptions(**{**FORMAT, "quant_type": "fp4", "blocksize": 128}, threads=1)
    assert (options.quant_type, options.blocksize, options.double_quant) == ("fp4", 128, True)
    assert (options.max_shard_bytes, options.threads, options.scale_search) == (1 << 30, 1, False)
    assert options.importance is None and options.durable is True
    assert "quant_type='fp4'" in repr(options)
    with pytest.raises(AttributeError):
        options.blocksize = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_type": "int4"}, "quant_type must be one of ('nf4', 'fp4'), got 'int4'"),
        ({"blocksize": 100}, "blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096), got 100"),
        ({"blocksize": -64}, "blocksize must be one of"),
        ({"importance": "imatrix.safetensors"}, "importance weights only apply with scale_search=True"),
    ],
)
def test_bad_options_are_value_errors_naming_the_option(change: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _core.QuantizeOptions(**{**FORMAT, **change})
    assert str(info.value).startswith(message)


def test_check_format_is_the_cores_rule() -> None:
    _core.check_format("fp4", 4096)
    with pytest.raises(QuantizationError, match="unsupported quant_type 'int4'; expected 'nf4' or 'fp4'"):
        _core.check_format("int4", 64)
    with pytest.raises(QuantizationError, match=r"unsupported blocksize -1; expected one of \[32, 64"):
        _core.check_format("nf4", -1)


def test_checkpoint_report_has_typed_rows(tmp_path: Path) -> None:
    weight = torch.randn(64, 96)
    save_file({"layer.weight": weight, "norm.weight": torch.ones(96)}, str(tmp_path / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    options = _core.QuantizeOptions(**FORMAT, scale_search=True)
    report = _core.quantize_checkpoint(str(tmp_path / "model.safetensors"), str(out), ["layer.weight"], options, {})
    assert isinstance(report, _core.CheckpointReport)
    assert [s[0] for s in report.shards] == ["model.safetensors"] and report.seconds >= 0
    rows = {t.name: t for t in report.tensors}
    quantized, kept = rows["layer.weight"], rows["norm.weight"]
    assert isinstance(quantized, _core.TensorReport)
    assert quantized.quantized and quantized.params == 64 * 96 and quantized.squared_norm > 0
    assert quantized.nested_offset is not None
    assert not kept.quantized and kept.search is None and kept.nested_offset is None
    search = quantized.search
    assert isinstance(search, _core.SearchReport)
    assert search.offset == quantized.nested_offset and not search.weighted
    assert 0 < search.squared_error <= search.absmax_squared_error


def test_searched_buffers_report_the_offset_of_the_nested_scales() -> None:
    values = np.random.default_rng(0).standard_normal(64 * 256).astype(np.float32).view(np.uint8)
    packed, codes, nested = np.zeros(values.size // 8, np.uint8), np.zeros(256, np.uint8), np.zeros(1, np.float32)
    report = _core.quantize_4bit_searched(values, "float32", "nf4", 64, packed, codes, nested.view(np.uint8))
    assert isinstance(report, _core.SearchReport) and report.offset is not None
    decoded = np.zeros(256, np.float32)
    _core.dequantize_absmax(codes, nested.view(np.uint8), report.offset, decoded.view(np.uint8))
    assert np.all(decoded > 0)
    plain = np.zeros(256, np.float32).view(np.uint8)
    assert _core.quantize_4bit_searched(values, "float32", "nf4", 64, packed, plain).offset is None


def test_headers_and_listings_are_typed_entries(tmp_path: Path) -> None:
    first, second = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    save_file({"b.weight": torch.zeros(4, 6), "a.bias": torch.zeros(3, dtype=torch.bfloat16)}, str(first), {"k": "v"})
    save_file({"c.weight": torch.zeros(2, 2, 2, dtype=torch.float16)}, str(second))
    index = {"metadata": {}, "weight_map": {"b.weight": first.name, "a.bias": first.name, "c.weight": second.name}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    header = _core.read_header(str(first))
    assert isinstance(header, _core.SafetensorsHeader)
    assert header.file == str(first) and header.metadata == {"k": "v"}
    assert "tensors=<2 entries>" in repr(header)
    entries = {t.name: t for t in header.tensors}
    weight, bias = entries["b.weight"], entries["a.bias"]
    assert isinstance(weight, _core.TensorEntry)
    assert (weight.dtype, weight.shape, weight.file, weight.end - weight.begin) == ("F32", [4, 6], str(first), 96)
    assert (bias.dtype, bias.shape, bias.end - bias.begin) == ("BF16", [3], 6)
    assert repr(weight).startswith('TensorEntry(name="b.weight", dtype="F32", shape=[4, 6], ')
    with pytest.raises(AttributeError):
        weight.name = "other"  # type: ignore[misc]
    assert _core.read_header(str(second)).metadata == {}  # none in the header

    listed = _core.list_tensors(str(tmp_path))
    assert all(isinstance(t, _core.TensorEntry) for t in listed)
    rows = [(t.name, t.dtype, t.shape, t.file, t.begin, t.end) for t in listed]
    in_headers = [
        (t.name, t.dtype, t.shape, t.file, t.begin, t.end)
        for file in (first, second)
        for t in _core.read_header(str(file)).tensors
    ]
    assert sorted(rows) == sorted(in_headers)
    assert {(t.name, t.file) for t in listed} >= {("c.weight", str(second))}


def test_reading_a_bad_header_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        _core.read_header(str(bad))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        _core.list_tensors(str(bad))
