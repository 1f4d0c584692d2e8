"""DoRA experts (CoMoE-DoRA): every expert is a weight-decomposed update of the frozen weight, with its own magnitude.

Expert j of a layer with frozen weight W0 (d_out, d_in), rank-r factors A_j (r, d_in), B_j (d_out, r), scaling s and
magnitude m_j (d_out) is the layer (DoRA, Liu et al. 2024; per expert as in MoE-PEFT's MixDoRA)

    W_j' = c_j * (W0 + s B_j A_j),   c_j = m_j / n_j,   n_j = ||W0 + s B_j A_j||  (norm of each output row)

with n_j treated as a constant in backward (detached, as peft's DoRA does). The mixture with gates g (T, N) is

    y = W0 x + sum_j g_j (W_j' x - W0 x) + bias
      = (W0 x) * (1 + sum_j g_j (c_j - 1)) + s * [c_1 B_1 ... c_N B_N] (g * h) + bias,    h_j = A_j x.

With top_k > 1 the gates sum to 1, so this is the gated average sum_j g_j W_j' x + bias; with top_k = 1 the gate is
the raw probability p and the base keeps the weight 1 - p. Either way, at initialisation (B = 0, m_j = ||W0||) every
c_j is 1 and the layer equals the base layer.

Nothing d_out x d_in is built per expert. The squared row norms come from three small products:

    n_j^2 = ||W0_row||^2 + 2 s (W0 A_j^T * B_j).sum(-1) + s^2 ((B_j (A_j A_j^T)) * B_j).sum(-1),

i.e. the row norms of W0, one (d_out, N*r) GEMM W0 A_cat^T and the N diagonal (r, r) blocks of A_cat A_cat^T.

The contrastive loss contrasts o_j = c_j * (B_j h_j), expert j's own low-rank update as it enters the output, so the
Gram trick runs on the scaled up-projections [c_1 B_1 ... c_N B_N] (see docs/concepts.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fused_down import router_dtype

if TYPE_CHECKING:
    from .layer import CoMoELayer

NORM_FLOOR = 1e-12  # a zero row (zero weight and zero update) gets this norm instead of a division by zero


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The frozen weight W0 as (d_out, d_in): transposed for a transformers Conv1D (stored (in, out)), dequantized
    for a quantized layer (bitsandbytes, HQQ, torchao, through peft's `dequantize_module_weight`)."""
    if isinstance(base_layer, Conv1D):
        return base_layer.weight.t()  # (in, out) -> (out, in)
    weight = getattr(base_layer, "weight", None)
    if type(weight) in (torch.Tensor, nn.Parameter) and not hasattr(base_layer, "W_q"):
        return weight  # a plain weight: nothing to dequantize (and no string checks for torch.compile to trace)
    if type(weight).__name__ == "Int8Params":
        return _int8_weight(base_layer)
    return dequantize_module_weight(base_layer)


def _int8_weight(base_layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes 8-bit layer's weight, dequantized (d_out, d_in) float32 (unless it keeps float weights).

    peft's `dequantize_module_weight` ends, on the CPU, by re-creating the layer's weight (`weight.to(device)`),
    which leaves the layer without its row scales at its next forward; this reads weight and scales only."""
    weight = base_layer.weight
    if weight.dtype != torch.int8:
        return weight  # has_fp16_weights: the layer keeps its float weight
    from bitsandbytes.functional import int8_vectorwise_dequant

    state_scales = base_layer.state.SCB  # set by the layer's first forward, which moves them off the weight
    return int8_vectorwise_dequant(weight.data, state_scales if state_scales is not None else weight.SCB)


@torch.no_grad()
def expert_row_norms(
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, num_experts: int, scaling: float
) -> torch.Tensor:
    """n_j = ||W0 + s B_j A_j|| per output row, for every expert, without forming any expert's weight: (N, d_out).

    Args:
        weight: (d_out, d_in) the frozen W0.
        down: (N*r, d_in) the stacked A_j.
        up: (d_out, N*r) the B_j side by side.

    Computed in float32 (float64 if the weight or the adapter is float64) and detached.
    """
    compute = torch.float64 if torch.float64 in (weight.dtype, down.dtype) else torch.float32
    d_out, d_in = weight.shape
    rank = down.shape[0] // num_experts
    down = down.to(device=weight.device, dtype=compute)
    up = up.to(device=weight.device, dtype=compute).view(d_out, num_experts, rank)  # (d_out, N, r)
    base_sq = torch.linalg.vector_norm(weight, dim=1, dtype=compute).square()  # (d_out,) ||W0 rows||^2
    gemm_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else compute  # no float copy of W0
    cross = (weight.to(gemm_dtype) @ down.t().to(gemm_dtype)).to(compute).view(d_out, num_experts, rank)  # W0 A_j^T
    a = down.view(num_experts, rank, d_in)  # (N, r, d_in)
    a_gram = a @ a.transpose(1, 2)  # (N, r, r): the diagonal blocks A_j A_j^T
    linear = (cross * up).sum(-1)  # (d_out, N)
    quadratic = torch.einsum("dnr,nrs,dns->dn", up, a_gram, up)  # (d_out, N)
    squared = base_sq.unsqueeze(1) + (2 * scaling) * linear + (scaling * scaling) * quadratic  # (d_out, N)
    return squared.t().clamp_min(NORM_FLOOR).sqrt()  # (N, d_out)


def layer_row_norms(layer: CoMoELayer, adapter_name: str) -> torch.Tensor:
    """`expert_row_norms` of one adapter of a CoMoE layer (N, d_out), float32, detached."""
    num_experts = layer.comoe_settings[adapter_name].num_experts
    down, up = layer.comoe_A[adapter_name], layer.comoe_B[adapter_name]
    weight = base_weight(layer.get_base_layer())
    return expert_row_norms(weight, down, up, num_experts, layer.scaling[adapter_name])


@torch.no_grad()
def reset_magnitude(layer: CoMoELayer, adapter_name: str) -> None:
    """m_j = ||W0 + s B_j A_j|| (= ||W0|| when B = 0), so that every c_j starts at exactly 1.

    Call it once the adapter has the base layer's dtype (`CoMoELayer.update_layer` does): a magnitude set in float32
    and moved to a float64 base afterwards would keep its float32 rounding and miss 1 by about 1e-8.
    """
    magnitude = layer.comoe_magnitude[adapter_name]
    layer.comoe_magnitude_dtype[adapter_name] = magnitude.dtype  # peft may cast the adapter to float32 later
    if magnitude.is_meta or layer.comoe_A[adapter_name].is_meta or base_weight(layer.get_base_layer()).is_meta:
        return  # loaded later (low_cpu_mem_usage)
    magnitude.copy_(rounded_row_norms(layer, adapter_name))


def rounded_row_norms(layer: CoMoELayer, adapter_name: str) -> torch.Tensor:
    """`layer_row_norms` rounded to the frozen weight's dtype and then to the magnitude's (N, d_out), float32.

    The magnitudes are initialised with these values and the scales divide by them, so c is exactly 1 at
    initialisation whatever the dtypes: a bf16 or fp16 model, float32 adapters on it, a bf16 dequantized 4-bit
    weight (peft's DoRA keeps its norm in the weight's dtype for the same reason).
    """
    norms = layer_row_norms(layer, adapter_name)  # (N, d_out) float32
    weight_dtype = base_weight(layer.get_base_layer()).dtype
    magnitude_dtype = layer.comoe_magnitude[adapter_name].dtype
    return round_norms(norms, (weight_dtype, adapter_dtype(layer, adapter_name), magnitude_dtype))


def adapter_dtype(layer: CoMoELayer, adapter_name: str) -> torch.dtype | None:
    """The dtype the magnitudes of `adapter_name` had when they were set (`reset_magnitude`,
    `block_dora.reset_block_magnitudes`): whatever peft gave the new adapter (the base weight's, a 4-bit layer's
    compute dtype, or its own; it differs between peft versions), before peft may cast it to float32
    (`autocast_adapter_dtype`). None when they were never set here (loaded onto the meta device)."""
    return layer.comoe_magnitude_dtype.get(adapter_name)


def round_norms(norms: torch.Tensor, dtypes: tuple[torch.dtype | None, ...]) -> torch.Tensor:
    """Row norms rounded to each of `dtypes` in turn (None: skipped), returned in their own dtype: the frozen weight's,
    the adapter's when the magnitudes were set (`adapter_dtype`) and the magnitudes' now. Both the magnitudes'
    initialisation and the scales' division use this value, so c is exactly 1 at first, also when the magnitudes
    were set in bf16 (a 4-bit layer computing in bf16) and cast to float32 since."""
    rounded = norms
    for dtype in dtypes:
        rounded = rounded if dtype is None else rounded.to(dtype)
    return rounded.to(norms.dtype)


def expert_scales(layer: CoMoELayer, adapter_name: str) -> torch.Tensor:
    """c_j = m_j / n_j (N, d_out) in float32, differentiable in m (n is a constant, see `rounded_row_norms`)."""
    norms = rounded_row_norms(layer, adapter_name)  # (N, d_out)
    return layer.comoe_magnitude[adapter_name].to(norms.dtype) / norms


def dense_gates(router_logits: torch.Tensor, topk_idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """The (T, N) gate matrix of `fused_down.route`, as a differentiable function of the router logits (T, N).

    The DoRA base term needs the gates themselves (not only the gated rank activations); their gradient reaches the
    router through the logits, which `RoutedDownProjection` accepts gradients for.
    """
    logits = router_logits.to(router_dtype(router_logits.dtype))
    if top_k > 1:
        chosen = logits.gather(1, topk_idx).softmax(dim=-1)  # (T, k): top-k probabilities renormalised
    else:
        chosen = logits.softmax(dim=-1).gather(1, topk_idx)  # (T, 1): the raw probability (Switch)
    return torch.zeros_like(logits).scatter(1, topk_idx, chosen)  # (T, N)


def base_output(layer: CoMoELayer, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
    """W0 x + bias (T, d_out), recomputed when another active adapter has already added to the layer's running
    output; None when this adapter is the first active one (the common case): the running output is W0 x + bias."""
    active = [name for name in layer.active_adapters if name in layer.comoe_A]
    if active and active[0] == adapter_name:
        return None
    return layer.base_layer(x).reshape(-1, layer.out_features)  # (T, d_out)


class MagnitudeTerm(torch.autograd.Function):
    """out + (W0 x) * (G @ (C - 1)), the DoRA experts' rescaling of the frozen output, as one autograd node.

    Inputs: out (T, d_out); source = W0 x + bias (T, d_out), or None when it is `out` itself (the common case; a
    tensor passed twice to one Function would stop `torch.compile`); bias (d_out) or None; gates G (T, N) and
    change C - 1 (N, d_out). Plain autograd would keep two (T, d_out) tensors for backward (W0 x and the product
    G (C - 1)); this node keeps only the base output and recomputes the (T, N) x (N, d_out) product in backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        out: torch.Tensor,
        source: torch.Tensor | None,
        bias: torch.Tensor | None,
        gates: torch.Tensor,
        change: torch.Tensor,
    ) -> torch.Tensor:
        base = out if source is None else source  # (T, d_out) W0 x + bias
        frozen = base if bias is None else base - bias  # (T, d_out) W0 x
        ctx.save_for_backward(base, bias, gates, change)
        ctx.shared = source is None
        return torch.addcmul(out, frozen, _base_change(gates, change, out.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        base, bias, gates, change = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_out = grad
        grad_source = grad_bias = grad_gates = grad_change = None
        if needs[0] or needs[1] or needs[2]:
            base_change = _base_change(gates, change, grad.dtype)  # (T, d_out), recomputed
            if ctx.shared and not needs[2]:
                grad_out = torch.addcmul(grad, grad, base_change)  # the base output's gradient, one pass
            else:
                grad_base = grad * base_change  # (T, d_out), through W0 x = base - bias
                grad_out = grad + grad_base if ctx.shared else grad
                grad_source = grad_base if needs[1] else None
                grad_bias = -grad_base.sum(0).to(bias.dtype) if needs[2] else None  # (d_out,)
        if needs[3] or needs[4]:
            frozen = base if bias is None else base - bias
            weighted = grad * frozen  # (T, d_out) in the output's dtype; the small operands are cast instead
            if needs[3]:
                grad_gates = (weighted @ change.t().to(weighted.dtype)).to(gates.dtype)  # (T, N)
            if needs[4]:
                grad_change = (gates.t().to(weighted.dtype) @ weighted).to(change.dtype)  # (N, d_out)
        return grad_out if needs[0] else None, grad_source, grad_bias, grad_gates, grad_change


def _base_change(gates: torch.Tensor, change: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_j g_j (c_j - 1) (T, d_out), computed in `dtype`: the (T, N) and (N, d_out) operands are cast, not the
    (T, d_out) result (one pass fewer in half precision, and exact zeros stay exact zeros)."""
    return gates.to(dtype) @ change.to(dtype)


def dora_mixture(
    layer: CoMoELayer,
    adapter_name: str,
    x: torch.Tensor,
    result: torch.Tensor,
    up: torch.Tensor,
    router_logits: torch.Tensor,
    topk_idx: torch.Tensor,
    lean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DoRA part of a CoMoE layer's forward.

    Returns the layer's running output `result` (any shape ending in d_out) with the magnitude term
    (W0 x) * sum_j g_j (c_j - 1) added, and the scaled up-projections [c_1 B_1 ... c_N B_N] (d_out, N*r) that take
    the place of B_cat in the rest of the forward (the up-projection of the gated rank activations and the
    contrastive loss). `lean=True` (the inference path) uses plain differentiable ops instead of `MagnitudeTerm`.
    """
    settings = layer.comoe_settings[adapter_name]
    out_2d = result.reshape(-1, layer.out_features)  # (T, d_out)
    scales = expert_scales(layer, adapter_name)  # (N, d_out) c_j
    gates = dense_gates(router_logits, topk_idx, settings.top_k)  # (T, N)
    source = base_output(layer, x, adapter_name)  # (T, d_out) W0 x + bias, or None: it is out_2d
    bias = getattr(layer.get_base_layer(), "bias", None)
    change = (scales - 1).to(gates.dtype)  # (N, d_out)
    if lean:
        frozen = out_2d if source is None else source
        frozen = frozen if bias is None else frozen - bias  # (T, d_out) W0 x
        out_2d = torch.addcmul(out_2d, frozen, _base_change(gates, change, out_2d.dtype))
    else:
        out_2d = MagnitudeTerm.apply(out_2d, source, bias, gates, change)  # (T, d_out)
    return out_2d.view(result.shape), scale_columns(up, scales)


def scale_columns(up: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[c_1 B_1 ... c_N B_N] (d_out, N*r) from B_cat (d_out, N*r) and the scales c (N, d_out)."""
    d_out, rank_total = up.shape
    num_experts = scales.shape[0]
    column_scales = scales.t().unsqueeze(-1).to(up.dtype)  # (d_out, N, 1)
    return (up.view(d_out, num_experts, rank_total // num_experts) * column_scales).view(d_out, rank_total)


@torch.no_grad()
def contrasted_up_projection(layer: CoMoELayer, adapter_name: str) -> torch.Tensor:
    """The up-projections whose outputs the contrastive loss compares (d_out, N*r), detached: [c_1 B_1 ... c_N B_N]
    for DoRA experts, B_cat otherwise. For analysis code that recomputes expert outputs outside the forward."""
    up = layer.comoe_B[adapter_name]
    if adapter_name not in layer.comoe_magnitude:
        return up
    return scale_columns(up, expert_scales(layer, adapter_name))
