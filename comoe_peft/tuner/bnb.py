"""CoMoE experts on bitsandbytes-quantized base layers (QLoRA): 4-bit `Linear4bit` and 8-bit `Linear8bitLt`.

The frozen base layer keeps its own (dequantising) forward; the experts and the router are ordinary float tensors
beside it (float32 by default, the router always computes in float32):

    x -> base_layer(x)                     (..., d_out) in the base layer's output dtype (its compute dtype is its own)
    x -> experts and router                 in the adapter dtype, x cast on the fly (`fused_down.RoutedDownProjection`)
      -> added out of place, cast back      (..., d_out) in the base layer's output dtype

On the CPU, bitsandbytes would repack 4-bit weights for inference (CPUs with AVX512-BF16); a CoMoE model keeps every
4-bit layer from it, so the weights stay exactly as loaded (`disable_cpu_inference_repacking`).

bitsandbytes is optional: nothing here imports it until a model holds one of its layers (peft imports it first).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from torch import nn

from .layer import Linear

__all__ = ["Linear4bit", "Linear8bitLt", "dispatch_bnb", "quantized_in_out_features"]


def quantized_in_out_features(base_layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a bitsandbytes linear layer.

    A 4-bit weight is packed (two values per byte, stored as a (d_in * d_out / 2, 1) tensor), so its shape says
    nothing about the layer; the unpacked (d_out, d_in) shape is in its quantization state. Other layers (8-bit,
    or 4-bit before quantization) report `in_features` / `out_features` like a `torch.nn.Linear`.
    """
    quant_state = getattr(base_layer.weight, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        out_features, in_features = shape
        return int(in_features), int(out_features)
    return int(base_layer.in_features), int(base_layer.out_features)


class _QuantizedLinear(Linear):
    """CoMoE experts beside a frozen quantized linear layer; subclasses only name the base type."""

    def _base_in_out_features(self) -> tuple[int, int]:
        return quantized_in_out_features(self.get_base_layer())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The quantized layer's output plus, for each active adapter, the gated sum of its top-k experts."""
        adapter_names = kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)  # (..., d_out), dequantised by bitsandbytes
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        expected_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name in self.comoe_A:
                result = self._add_experts(x, result, adapter_name)  # a new tensor: the base output is never written
        return result.to(expected_dtype)


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    """Every bitsandbytes `Linear4bit` in `model`, adapted or not ([] without bitsandbytes)."""
    if not is_bnb_4bit_available():
        return []
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def disable_cpu_inference_repacking(model: nn.Module) -> dict[nn.Module, bool]:
    """Keep bitsandbytes from repacking the 4-bit weights of `model` for CPU inference; returns each layer's flag.

    On CPUs with AVX512-BF16, a bitsandbytes 0.50 `Linear4bit` whose `support_avx512bf16_for_cpu` is true (set
    from the CPU when the layer is built) repacks its weight at its first eval-mode forward without gradients: bf16
    scales, a kernel without a backward, used from then on in training mode too. Nothing undoes that exactly
    (bitsandbytes' inverse rounds the scales and, without double quantisation, leaves them in the wrong blocks),
    and a CoMoE model alternates evaluation and training, so the flag is switched off on every 4-bit layer of the
    model, adapted or not (gradients pass through all of them). The weights then stay exactly as loaded, through
    forwards and state-dict reads, and eval forwards compute with the same kernel as training ones. A layer that was
    repacked before (the model was evaluated before the adapter was added) is converted back first, with a warning.
    """
    flags: dict[nn.Module, bool] = {}
    repacked = 0
    for layer in linear4bit_layers(model):
        repacked += unpack_repacked_weight(layer)
        flags[layer] = getattr(layer, "support_avx512bf16_for_cpu", False)
        layer.support_avx512bf16_for_cpu = False
    if repacked:
        warnings.warn(
            f"bitsandbytes had already repacked {repacked} 4-bit layer(s) for CPU inference (an eval forward without "
            "gradients before the CoMoE adapter was added); they are converted back, with their scales rounded to "
            "bf16. Add the adapter before evaluating the model to keep its weights exactly as loaded.",
            stacklevel=2,
        )
    return flags


def restore_cpu_inference_repacking(flags: dict[nn.Module, bool]) -> None:
    """Give the layers back the flags `disable_cpu_inference_repacking` switched off (when the adapters go)."""
    for layer, flag in flags.items():
        layer.support_avx512bf16_for_cpu = flag


def unpack_repacked_weight(layer: nn.Module) -> bool:
    """Give a 4-bit weight that bitsandbytes repacked for CPU inference its trainable layout back; True if it did.

    The weight's values come back exactly, the scales with the bf16 rounding of the repacking. bitsandbytes' own
    inverse (`_convert_weight_packed_for_cpu_inverse`, which its state-dict read uses too) re-quantises
    double-quantised scales but leaves single-quantised ones in the repacked (d_in / blocksize, d_out) order;
    they are put back in the quantised (d_out * d_in / blocksize,) order here.
    """
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = quant_state.original_nested
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
    if not nested:
        scales = weight.quant_state.absmax  # (d_in / blocksize, d_out) bf16, the repacked order
        weight.quant_state.absmax = scales.t().reshape(-1).float()  # (d_out * d_in / blocksize,) float32
    return True


class Linear4bit(_QuantizedLinear):
    """CoMoE experts on a bitsandbytes `Linear4bit` (nf4 or fp4, any compute dtype): QLoRA with routed experts."""


class Linear8bitLt(_QuantizedLinear):
    """CoMoE experts on a bitsandbytes `Linear8bitLt` (LLM.int8())."""


def dispatch_bnb(target: nn.Module, adapter_name: str, **layer_args: Any) -> Linear | None:
    """The CoMoE layer for a bitsandbytes 4-bit or 8-bit target, or None when the target is not one of those."""
    if not is_bnb_available():
        return None
    import bitsandbytes as bnb

    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if is_bnb_4bit_available() and isinstance(base, bnb.nn.Linear4bit):
        return Linear4bit(target, adapter_name, **layer_args)
    if isinstance(base, bnb.nn.Linear8bitLt):
        return Linear8bitLt(target, adapter_name, **layer_args)
    return None
