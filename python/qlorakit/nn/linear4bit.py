"""``Linear4bit``: a frozen linear layer whose weight stays 4-bit in memory.

Forward: the weight is dequantized to the compute dtype (on the CPU into a scratch buffer shared
by all layers of that shape; on CUDA by the CuPy kernels) and multiplied; nothing of it is kept.
An input of a few rows (decoding: 1 to ``_core.GEMV_MAX_BATCH`` rows on the CPU, a single row on CUDA) skips the
dequantized weight altogether where a fused dequantize-and-multiply kernel exists (the CPU with AVX-512; CUDA): it
reads the 4-bit codes once.
Backward: the gradient with respect to the input is computed by dequantizing again (the full
weight is not kept from the forward); the frozen weight gets no gradient. Both go through the ops
:mod:`qlorakit.ops` registers with ``torch.library`` (``qlorakit::linear_4bit``), so ``torch.compile``
traces the layer without a graph break.

State dict: bitsandbytes' serialization of a 4-bit weight (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) and ``bias``: ``model.state_dict()`` of a model holds the
tensors of the packed checkpoint it was loaded from, and ``save_pretrained`` writes a checkpoint
transformers + bitsandbytes load.
"""

from __future__ import annotations

import torch
from torch import nn

from qlorakit import ops
from qlorakit._core import QuantizationError
from qlorakit.nn.dispatch import dequantize_weight
from qlorakit.packed import SERIALIZED_SUFFIXES, PackedWeight, QuantLayout
from qlorakit.quantization import quantize

#: The parameters that hold a layer's 4-bit weight, by the ``PackedWeight`` field each one holds.
_WEIGHT_PARAMETERS = {"weight": "codes", "absmax": "absmax", "nested_absmax": "nested_absmax"}


def _as_integers(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 scale tensor as its int32 bit patterns (a view; uint8 codes stay as they are)."""
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.float32).view(torch.int32)


def _as_floats(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The inverse of :func:`_as_integers`."""
    return tensor.view(torch.float32) if tensor is not None and tensor.dtype == torch.int32 else tensor


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return nn.Parameter(tensor, requires_grad=False) if tensor is not None else None


class Linear4bit(nn.Linear):
    """A linear layer ``y = x W^T + b`` with W stored blockwise 4-bit (NF4/FP4).

    A subclass of ``nn.Linear``, as bitsandbytes' ``Linear4bit`` is: code that finds a model's linear
    layers by type (PEFT's ``target_modules="all-linear"``, transformers' module walks) finds these.

    The weight is one :class:`~qlorakit.packed.PackedWeight` (:meth:`packed_weight`): its tensors are this
    layer's frozen parameters and its :class:`~qlorakit.packed.QuantLayout` is :attr:`layout`, held once.
    Parameters, never floating point: ``weight`` the uint8 codes ``[(out*in+1)//2, 1]`` (as bitsandbytes'
    ``Linear4bit.weight``), ``absmax`` the block scales (uint8 nested codes, or float32 scales stored as
    their int32 bit patterns), ``nested_absmax`` the nested scales as int32 bit patterns (double
    quantization only). Being parameters, FSDP2's ``fully_shard`` shards them (as bytes: FSDP2 all-gathers
    groups of mixed dtypes as uint8); being integers, nothing that casts a model's floating-point
    tensors (``model.to(torch.bfloat16)``, FSDP2's ``MixedPrecisionPolicy``, PEFT's k-bit preparation)
    can change a scale. The input is cast to ``compute_dtype`` (bf16 by default, fp16, fp32 or fp64) and
    the output back to the input's dtype. The bias, if any, is a frozen parameter in its stored dtype.
    """

    #: ``forward`` returns a new tensor it keeps no reference to: an adapter may add into it in place
    #: (:mod:`qlorakit.lora.compute`).
    qlorakit_fresh_output = True

    def __init__(
        self, weight: PackedWeight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.layout: QuantLayout = weight.layout
        self.weight = _frozen(weight.codes)
        self.absmax = _frozen(_as_integers(weight.absmax))
        self.nested_absmax = _frozen(_as_integers(weight.nested_absmax))
        self.bias = _frozen(bias)
        #: The class of the full-precision layer this one stands for (GPT-2's ``Conv1D`` stores
        #: its weight ``[in, out]``); :meth:`to_dense` rebuilds it.
        self.source_cls: type[nn.Module] = nn.Linear

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Linear4bit:
        """Quantizes an ``nn.Linear`` (its weight as stored; the bias is kept)."""
        packed = quantize(linear.weight.detach().contiguous(), quant_type, blocksize, double_quant)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(packed, bias, compute_dtype)

    @property
    def quant_type(self) -> str:
        return self.layout.quant_type

    @property
    def blocksize(self) -> int:
        return self.layout.blocksize

    def quantized_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold the 4-bit weight (not the bias)."""
        return [p for name in _WEIGHT_PARAMETERS if (p := getattr(self, name)) is not None]

    def packed_weight(self) -> PackedWeight:
        """The weight as a ``PackedWeight`` over this layer's parameters (no copy). Assembled on each call:
        the parameters are the tensors of record (FSDP2 swaps sharded and gathered ones in and out)."""
        return PackedWeight(self.weight, _as_floats(self.absmax), _as_floats(self.nested_absmax), self.layout)

    def _forward_weight(self) -> PackedWeight:
        """:meth:`packed_weight` for ``forward``, built once and reused while the layer holds the same parameter
        objects over the same memory and the same layout (a decoding step calls every layer once, and assembling
        the weight costs more than a small layer's kernel). Rebuilt when a parameter is replaced (``setattr``,
        FSDP2's swaps, ``load_state_dict(assign=True)``), its ``.data`` reassigned or its storage re-allocated:
        each changes the object or its data pointer (the cached float views hold the old storage, so a new one
        never lands at the old address). Not for callers: it is shared between calls."""
        params = self._parameters
        weight, absmax = params.get("weight"), params.get("absmax")
        nested = params.get("nested_absmax")
        layout = self.layout
        if torch.compiler.is_compiling() or type(weight) is not nn.Parameter or type(absmax) is not nn.Parameter:
            # Traced (a graph needs no cache, and dynamo cannot compare data pointers), a tensor subclass (e.g.
            # FSDP2's sharded DTensor) or a parameter that is no longer a plain one: assembled as it is.
            return self.packed_weight()
        pointers = (weight.data_ptr(), absmax.data_ptr(), nested.data_ptr() if nested is not None else 0)
        cached = self.__dict__.get("_forward_cache")
        if (
            cached is not None
            and cached[0] is weight
            and cached[1] is absmax
            and cached[2] is nested
            and cached[3] is layout
            and cached[4] == pointers
        ):
            return cached[5]
        packed = self.packed_weight()
        if type(nested) is nn.Parameter or nested is None:
            self.__dict__["_forward_cache"] = (weight, absmax, nested, layout, pointers, packed)
        return packed

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # .to() / .cuda() / .half() may reassign the parameters' .data: drop the forward's weight (its float views
        # would hold the old storage alive until the next forward).
        self.__dict__.pop("_forward_cache", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # Pickling and deepcopy leave the forward's weight out: it is rebuilt from the parameters on first use.
        state = self.__dict__.copy()
        state.pop("_forward_cache", None)
        return state

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ``[out_features, in_features]`` in ``dtype`` (default: the compute dtype)."""
        return dequantize_weight(self.packed_weight(), dtype or self.compute_dtype)

    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Module:
        """The full-precision layer of :attr:`source_cls` with ``weight`` (``[out, in]``; default: this
        layer's, dequantized to the dtype it was quantized from) and this layer's bias."""
        if weight is None:
            weight = self.dequantized_weight(torch.float32).to(self.layout.dtype)
        with torch.device("meta"):
            if issubclass(self.source_cls, nn.Linear):
                dense = self.source_cls(self.in_features, self.out_features, bias=self.bias is not None)
            else:  # Conv1D(nf=out, nx=in), weight stored [in, out]
                dense = self.source_cls(self.out_features, self.in_features)
                weight = weight.T
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        dense.bias = self.bias
        return dense

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """bitsandbytes' tensors for the weight (``PackedWeight.state_dict``), then the bias."""
        device = self.weight.device
        for name, tensor in self.packed_weight().state_dict(f"{prefix}weight").items():
            destination[name] = tensor if keep_vars else tensor.detach().to(device)
        if self.bias is not None:
            destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Reads the tensors :meth:`_save_to_state_dict` writes (also bitsandbytes' own) into this
        layer's buffers; the weight's layout (shape, block size, double quantization) must match."""
        weight_key = f"{prefix}weight"
        own = {
            f"{weight_key}{s}": state_dict[f"{weight_key}{s}"]
            for s in SERIALIZED_SUFFIXES
            if f"{weight_key}{s}" in state_dict
        }
        handled = set(own)
        if weight_key not in own:
            missing_keys.extend(self.packed_weight().state_dict(weight_key))
        else:
            self._load_weight(own, weight_key, local_metadata.get("assign_to_params_buffers", False), error_msgs)
        bias_key = f"{prefix}bias"
        if self.bias is not None:
            handled.add(bias_key)
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            elif state_dict[bias_key].shape != self.bias.shape:
                error_msgs.append(
                    f"size mismatch for {bias_key}: copying a param with shape {tuple(state_dict[bias_key].shape)}, "
                    f"the layer has {tuple(self.bias.shape)}"
                )
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
        if strict:
            for key in state_dict:
                child = key[len(prefix) :].split(".")[0]
                if key.startswith(prefix) and key not in handled and child not in self._modules:
                    unexpected_keys.append(key)

    def _load_weight(self, tensors: dict, weight_key: str, assign: bool, error_msgs: list[str]) -> None:
        try:
            loaded = PackedWeight.from_state_dict(tensors, weight_key)
        except QuantizationError as exc:
            error_msgs.append(f"{weight_key}: {exc}")
            return
        if tuple(loaded.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"size mismatch for {weight_key}: the 4-bit weight has shape {list(loaded.shape)}, "
                f"the layer is [{self.out_features}, {self.in_features}]"
            )
            return
        current = self.packed_weight()
        for field in _WEIGHT_PARAMETERS.values():
            ours, theirs = getattr(current, field), getattr(loaded, field)
            if (ours is None) != (theirs is None) or (ours is not None and ours.shape != theirs.shape):
                error_msgs.append(
                    f"size mismatch for {weight_key}: its {field} does not fit this layer's (block size "
                    f"{loaded.blocksize} vs {self.blocksize}, double quantization {loaded.double_quant} vs "
                    f"{current.double_quant})"
                )
                return
        with torch.no_grad():
            for name, field in _WEIGHT_PARAMETERS.items():
                theirs = _as_integers(getattr(loaded, field))
                if theirs is None:
                    continue
                if assign:
                    setattr(self, name, _frozen(theirs))
                else:
                    getattr(self, name).copy_(theirs)
        self.layout = loaded.layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = self.compute_dtype
        bias = self.bias
        if bias is not None and bias.dtype != compute_dtype:
            bias = bias.to(compute_dtype)
        out = ops.linear_4bit(x if x.dtype == compute_dtype else x.to(compute_dtype), self._forward_weight(), bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )
