"""DoRA experts inside FFN blocks (MoE-PEFT's MixDoRA): every projection of every block expert is a DoRA update.

Expert j of a block uses, for each projection p inside it (gate, up and down; or c_fc and c_proj), with frozen
weight W_p (d_out, d_in), the expert's LoRA factors A_p,j and B_p,j, scaling s and magnitude m_p,j (d_out),

    W'_p,j = c_p,j * (W_p + s B_p,j A_p,j),   c_p,j = m_p,j / ||W_p + s B_p,j A_p,j||  (norm of each output row)

with the norm a constant in backward and the projection's bias (GPT-2) added unscaled, as in the per-linear DoRA
layer (`dora.py`, whose `expert_row_norms` gives every n_p,j without forming an expert's weight). The magnitudes
start at those norms, so every c starts at exactly 1 and the block starts as with LoRA experts.

The scales multiply outputs element-wise, so the block keeps most of its speed structure (`block.Block`):

    input projections:  W'_p,e x + b = P + (c_p,e - 1) * (P - b),   P = W_p x + b + s B_p,e A_p,e x
                        the frozen W_p x is still computed once for all experts; one (T, S, f) pass more
    output projection:  sum_s w_s c_d,e_s * (W_d h_s)  +  s [c_1 B_1 ... c_N B_N] (rank activations)  +  b
                        the row scale differs per expert, so W_d (sum_s w_s h_s) no longer folds into one GEMM:
                        k frozen down-projections (one GEMM of T*k rows); the LoRA part stays one up-projection

Where the frozen block's h_0 is built anyway (top-1 gates, the contrastive term, several adapters), the slots hold
W_d (h_s - h_0) and W_d h_0 is one more slot of the same GEMM: the output is then
(1 + sum_s w_s (c_s - 1)) * W_d h_0 + sum_s w_s c_s * W_d (h_s - h_0), which is exactly the frozen block while
c = 1 and B = 0, and the contrastive representation o_j = E_j(x) - MLP(x) = c_j * (W_d (h_j - h_0) + s B_d,j
A_d,j h_j) + (c_j - 1) * W_d h_0 needs no further frozen GEMM and no difference of two nearly equal outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dora import adapter_dtype, base_weight, expert_row_norms, round_norms

if TYPE_CHECKING:
    from .block import Block

__all__ = ["BlockScales", "FrozenDown", "block_scales", "reset_block_magnitudes", "rescale_pre_activation",
           "routed_output", "scaled_change"]


@dataclass(frozen=True)
class BlockScales:
    """One adapter's DoRA scales c = m / n for one forward: float32, differentiable in the magnitudes."""

    inputs: torch.Tensor  # (n, N, f): c_p,j of each input projection p (gate and up, or c_fc)
    output: torch.Tensor  # (N, d): c_d,j of the output projection


@dataclass(frozen=True)
class FrozenDown:
    """The frozen output projection applied to each slot's hidden activation, bias excluded."""

    slots: torch.Tensor  # (T, S, d): W_d (h_s - h_0) when `frozen` is set, else W_d h_s
    frozen: torch.Tensor | None  # (T, d): W_d h_0, or None (the lean path: k >= 2, nothing recorded, one adapter)


def _projection_norms(block: Block, adapter_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each projection (the inputs, then the output): the magnitude (N, d_out) and the rounded row norms
    n_p,j (N, d_out) in float32, detached (see `dora.round_norms`)."""
    base = block.get_base_layer()
    num_experts = block.comoe_settings[adapter_name].num_experts
    scaling = block.scaling[adapter_name]
    inputs = len(block.layout.inputs)
    creation_dtype = adapter_dtype(block, adapter_name)  # one for the whole block's magnitudes
    downs = block.comoe_A[adapter_name].chunk(inputs, dim=0)  # n x (N*r, d), projection-major
    parts = [(getattr(base, name), downs[p], block.comoe_B[adapter_name][p], block.comoe_magnitude[adapter_name][p])
             for p, name in enumerate(block.layout.inputs)]
    parts.append((getattr(base, block.layout.output), block.comoe_A_out[adapter_name],
                  block.comoe_B_out[adapter_name], block.comoe_magnitude_out[adapter_name]))
    result = []
    for projection, down, up, magnitude in parts:
        weight = base_weight(projection)  # (d_out, d_in), dequantized for a 4-bit or 8-bit projection
        norms = expert_row_norms(weight, down, up, num_experts, scaling)  # (N, d_out)
        result.append((magnitude, round_norms(norms, (weight.dtype, creation_dtype, magnitude.dtype))))
    return result


def block_scales(block: Block, adapter_name: str) -> BlockScales:
    """c_p,j = m_p,j / n_p,j for every projection of the block's experts (float32, n a constant)."""
    scales = [magnitude.to(norms.dtype) / norms for magnitude, norms in _projection_norms(block, adapter_name)]
    return BlockScales(inputs=torch.stack(scales[:-1]), output=scales[-1])  # (n, N, f), (N, d)


@torch.no_grad()
def reset_block_magnitudes(block: Block, adapter_name: str) -> None:
    """m_p,j = ||W_p + s B_p,j A_p,j|| (= ||W_p|| when B = 0): every c starts at exactly 1. Call it once the adapter
    has the block's device and dtype, as `dora.reset_magnitude`."""
    block.comoe_magnitude_dtype[adapter_name] = block.comoe_magnitude_out[adapter_name].dtype  # as dora.py's
    if block.comoe_magnitude[adapter_name].is_meta or block.comoe_A[adapter_name].is_meta:
        return  # loaded later (low_cpu_mem_usage)
    if any(base_weight(getattr(block.get_base_layer(), name)).is_meta
           for name in (*block.layout.inputs, block.layout.output)):
        return
    for magnitude, norms in _projection_norms(block, adapter_name):
        magnitude.copy_(norms)


def rescale_pre_activation(
    pre: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """c_p,e * (P - b) + b for each slot's expert e, written P + (c - 1) * (P - b) (exactly P while c = 1).

    pre: (T, S, f) the LoRA pre-activations P = W_p x + b + s B_p,e A_p,e x; bias: (f,) or None; scales: (N, f)
    the projection's c; chosen: (T, S) the slots' experts."""
    change = (scales - 1).to(pre.dtype)[chosen]  # (T, S, f): c_p,e - 1, the small table cast, not the result
    linear = pre if bias is None else pre - bias.to(pre.dtype)  # (T, S, f): P without the bias
    return torch.addcmul(pre, linear, change)


def routed_output(down: FrozenDown, gates: torch.Tensor, topk_idx: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The frozen part of the gated experts' output projection, bias excluded (T, d):

        sum_s w_s c_d,e_s * (W_d h_s)                                     (k >= 2, lean: `down.frozen` is None)
        (1 + sum_s w_s (c_s - 1)) * W_d h_0 + sum_s w_s c_s * W_d (h_s - h_0)     (otherwise; any k)

    The second is the first plus, for top-1 gates, the frozen block's (1 - p) W_d h_0 (its gates sum to p, not 1).
    gates, topk_idx: (T, k); scales: (N, d) the output projection's c."""
    k = topk_idx.shape[1]
    dtype = down.slots.dtype
    weights = gates.unsqueeze(-1).to(dtype)  # (T, k, 1)
    slot_scales = scales.to(dtype)[topk_idx]  # (T, k, d): c_d,e_s
    out = (down.slots[:, :k] * (slot_scales * weights)).sum(dim=1)  # (T, d)
    if down.frozen is None:
        return out
    change = ((scales - 1).to(dtype)[topk_idx] * weights).sum(dim=1)  # (T, d): sum_s w_s (c_s - 1), kept off the 1
    return torch.addcmul(out + down.frozen, down.frozen, change)


def scaled_change(down: FrozenDown, scales: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The frozen part of o_j = E_j(x) - MLP(x) for the chosen slots' experts (T, S, d):
    c_j * W_d (h_j - h_0) + (c_j - 1) * W_d h_0 (the LoRA part, c_j * s B_d,j A_d,j h_j, is added by the block).
    Needs `down.frozen`; scales: (N, d) the output projection's c; chosen: (T, S)."""
    slot_scales = scales[chosen]  # (T, S, d) float32
    frozen = down.frozen.unsqueeze(1).to(slot_scales.dtype)  # (T, 1, d)
    return slot_scales * down.slots.to(slot_scales.dtype) + (slot_scales - 1) * frozen
