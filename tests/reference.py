"""Literal, slow reference implementations that the fast code is checked against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from comoe_peft.tuner.losses import CONTRASTIVE_EPS, NORM_EPS


def expert_matrices(layer, adapter_name: str = "default"):
    """Split a CoMoE layer's stacked weights into per-expert (A_i, B_i) pairs and the router."""
    r = layer.r[adapter_name]
    down = layer.comoe_A[adapter_name]
    up = layer.comoe_B[adapter_name]
    n = down.shape[0] // r
    pairs = [(down[i * r : (i + 1) * r], up[:, i * r : (i + 1) * r]) for i in range(n)]
    return pairs, layer.comoe_router[adapter_name]


def moe_lora_loop(x, base_out, pairs, router, top_k, scaling):
    """Mixture of LoRA experts with a Python loop over experts (the MoLA / MixLoRA way)."""
    tokens = x.reshape(-1, x.shape[-1])
    router_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    probs = F.linear(tokens.to(router_dtype), router.to(router_dtype)).softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if top_k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    out = base_out.reshape(-1, base_out.shape[-1]).clone()
    for expert, (a, b) in enumerate(pairs):
        token_pos, slot = torch.where(top_i == expert)
        if token_pos.numel() == 0:
            continue
        delta = (tokens[token_pos] @ a.t()) @ b.t()
        out = out.index_add(0, token_pos, delta * scaling * top_p[token_pos, slot].unsqueeze(-1).to(delta.dtype))
    return out.view(base_out.shape)


def dora_expert_weights(weight, pairs, magnitudes, scaling):
    """Each DoRA expert's full weight W_j' = m_j * (W0 + s B_j A_j) / ||W0 + s B_j A_j||, built explicitly; the row
    norm is detached (a constant in backward, as in peft's DoRA). Returns [(W_j' (d_out, d_in), c_j (d_out,))]."""
    experts = []
    for (a, b), magnitude in zip(pairs, magnitudes):
        direction = weight + scaling * (b @ a)  # (d_out, d_in), formed here on purpose
        norm = direction.norm(dim=1).detach()  # (d_out,)
        experts.append((magnitude.unsqueeze(1) * direction / norm.unsqueeze(1), magnitude / norm))
    return experts


def dora_moe_loop(x, weight, bias, pairs, magnitudes, router, top_k, scaling):
    """Mixture of DoRA experts, one explicit weight per expert, with a loop over experts.

    top_k > 1: y = sum_j g_j W_j' x + bias (the gates sum to 1); top_k = 1: y = W0 x + g (W_j' x - W0 x) + bias.
    """
    tokens = x.reshape(-1, x.shape[-1])
    router_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    probs = F.linear(tokens.to(router_dtype), router.to(router_dtype)).softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if top_k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    base = tokens @ weight.t()  # (T, d_out)
    out = torch.zeros_like(base) if top_k > 1 else base.clone()
    for expert, (expert_weight, _) in enumerate(dora_expert_weights(weight, pairs, magnitudes, scaling)):
        token_pos, slot = torch.where(top_i == expert)
        expert_out = tokens[token_pos] @ expert_weight.t()
        if top_k == 1:
            expert_out = expert_out - base[token_pos]
        out = out.index_add(0, token_pos, expert_out * top_p[token_pos, slot].unsqueeze(-1).to(base.dtype))
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], -1)


def contrastive_loss_literal(tokens, pairs, indices, temperature, token_mask=None):
    """Algorithm 1 of the CoMoE paper, token by token, with explicit d_out-wide expert outputs."""
    outputs = torch.stack([(tokens @ a.t()) @ b.t() for a, b in pairs], dim=1)  # (T, N, d_out)
    return contrastive_loss_of_outputs_literal(outputs, indices, temperature, token_mask)


def contrastive_loss_of_outputs_literal(outputs, indices, temperature, token_mask=None):
    """Algorithm 1, token by token, from every expert's explicit output (T, N, d) (indices name experts)."""
    outputs = outputs.double()
    per_token = []
    for t in range(outputs.shape[0]):
        total = outputs.new_zeros(())
        for slot in range(indices.anchor_idx.shape[1]):
            norms = outputs[t].norm(dim=-1, keepdim=True)
            normed = torch.where(norms > NORM_EPS, outputs[t] / norms.clamp_min(NORM_EPS), 0.0)  # no direction: 0
            q = normed[indices.anchor_idx[t, slot]]
            s_pos = normed[indices.positive_idx[t, slot]] @ q / temperature
            s_neg = normed[indices.negative_idx[t]] @ q / temperature + indices.negative_log_weight
            numerator = s_pos.exp().sum()
            denominator = torch.cat([s_pos, s_neg]).exp().sum() + CONTRASTIVE_EPS
            total = total - torch.log(numerator / denominator)
        per_token.append(total)
    per_token = torch.stack(per_token)
    if token_mask is None:
        return per_token.mean()
    w = token_mask.double()
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def block_expert_matrices(block, adapter_name: str = "default"):
    """Split a `Block`'s stacked weights into, per expert j, [(A_p, B_p, m_p) for each input projection p] and the
    output projection's (A_out, B_out, m_out), m the DoRA magnitude (None for LoRA experts); plus the router."""
    r = block.r[adapter_name]
    n = len(block.layout.inputs)
    num_experts = block.comoe_router[adapter_name].shape[0]
    down, up = block.comoe_A[adapter_name], block.comoe_B[adapter_name]
    down_out, up_out = block.comoe_A_out[adapter_name], block.comoe_B_out[adapter_name]
    dora = adapter_name in block.comoe_magnitude
    experts = []
    for j in range(num_experts):
        inputs = [(down[(p * num_experts + j) * r:(p * num_experts + j + 1) * r], up[p][:, j * r:(j + 1) * r],
                   block.comoe_magnitude[adapter_name][p, j] if dora else None) for p in range(n)]
        output = (down_out[j * r:(j + 1) * r], up_out[:, j * r:(j + 1) * r],
                  block.comoe_magnitude_out[adapter_name][j] if dora else None)
        experts.append((inputs, output))
    return experts, block.comoe_router[adapter_name]


def dense_weight(module):
    """A frozen projection's weight as (d_out, d_in): Conv1D's transposed, a bitsandbytes one dequantized (4-bit by
    its quantization state; 8-bit: int8 rows times their scales / 127)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    weight = module.weight
    if weight.dtype.is_floating_point:
        return weight
    if weight.dtype == torch.int8:
        scales = module.state.SCB if module.state.SCB is not None else weight.SCB  # (d_out,)
        return weight.data.float() * scales.float().unsqueeze(1) / 127
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, weight.quant_state)


def dora_projection(module, z, a, b, magnitude, scaling):
    """A literal DoRA copy of a frozen projection applied to z: weight m * (W + s B A) / ||W + s B A|| (row norms,
    detached), formed explicitly, and the projection's own bias, unscaled."""
    direction = dense_weight(module).to(z.dtype) + scaling * (b @ a).to(z.dtype)  # (d_out, d_in)
    weight = (magnitude / direction.norm(dim=1).detach()).unsqueeze(1).to(z.dtype) * direction
    return F.linear(z, weight, getattr(module, "bias", None))


def adapted_projection(module, z, a, b, magnitude, scaling):
    """A frozen projection with one expert's LoRA (magnitude None) or DoRA update, applied to z."""
    if magnitude is None:
        return module(z) + scaling * (z @ a.t()) @ b.t()
    return dora_projection(module, z, a, b, magnitude, scaling)


def block_expert_output(block, tokens, expert, scaling):
    """One expert's whole block, literally: the frozen MLP with LoRA (or DoRA) on each projection (T, d)."""
    mlp = block.get_base_layer()
    layout = block.layout
    inputs, (a_out, b_out, m_out) = expert
    pre = [adapted_projection(getattr(mlp, name), tokens, a, b, m, scaling)
           for name, (a, b, m) in zip(layout.inputs, inputs)]
    act = getattr(mlp, layout.activation)
    hidden = act(pre[0]) * pre[1] if layout.gated else act(pre[0])
    out = adapted_projection(getattr(mlp, layout.output), hidden, a_out, b_out, m_out, scaling)
    return getattr(mlp, layout.dropout)(out) if layout.dropout else out


def block_moe_loop(block, x, top_k, adapter_name: str = "default"):
    """MixLoRA with a loop over experts (the MoE-PEFT way): every active expert runs its whole block.
    top_k > 1: y = sum_j g_j E_j(x); top_k = 1: y = MLP(x) + g (E_j(x) - MLP(x))."""
    tokens = x.reshape(-1, x.shape[-1])
    experts, router = block_expert_matrices(block, adapter_name)
    scaling = block.scaling[adapter_name]
    router_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    probs = F.linear(tokens.to(router_dtype), router.to(router_dtype)).softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if top_k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    frozen = block.get_base_layer()(tokens)
    out = torch.zeros_like(frozen) if top_k > 1 else frozen.clone()
    for j, expert in enumerate(experts):
        token_pos, slot = torch.where(top_i == j)
        expert_out = block_expert_output(block, tokens[token_pos], expert, scaling)
        if top_k == 1:
            expert_out = expert_out - frozen[token_pos]
        out = out.index_add(0, token_pos, expert_out * top_p[token_pos, slot].unsqueeze(-1).to(out.dtype))
    return out.view(*x.shape[:-1], -1)


def block_expert_representations(block, x, adapter_name: str = "default"):
    """Every expert's E_j(x) - MLP(x), explicitly: (T, N, d)."""
    tokens = x.reshape(-1, x.shape[-1])
    experts, _ = block_expert_matrices(block, adapter_name)
    frozen = block.get_base_layer()(tokens)
    scaling = block.scaling[adapter_name]
    return torch.stack([block_expert_output(block, tokens, e, scaling) - frozen for e in experts], dim=1)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


__all__ = [
    "block_expert_matrices",
    "block_expert_output",
    "block_expert_representations",
    "block_moe_loop",
    "contrastive_loss_literal",
    "dense_weight",
    "dora_projection",
    "contrastive_loss_of_outputs_literal",
    "dora_expert_weights",
    "dora_moe_loop",
    "expert_matrices",
    "finite",
    "math",
    "moe_lora_loop",
]
