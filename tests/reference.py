"""Literal, slow reference implementations that the fast code is checked against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from comoe_peft.losses import CONTRASTIVE_EPS, NORM_EPS


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


def contrastive_loss_literal(tokens, pairs, indices, temperature, token_mask=None):
    """Algorithm 1 of the CoMoE paper, token by token, with explicit d_out-wide expert outputs."""
    outputs = torch.stack([(tokens @ a.t()) @ b.t() for a, b in pairs], dim=1).double()  # (T, N, d_out)
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


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


__all__ = ["contrastive_loss_literal", "expert_matrices", "finite", "math", "moe_lora_loop"]
