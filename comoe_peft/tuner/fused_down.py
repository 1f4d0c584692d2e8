"""The down-projection and routing of a CoMoE layer as one autograd node, with a hand-written backward.

`RoutedDownProjection` takes the layer's input and returns, for every token, the rank-space activations of all
experts, the gated activations that feed the up-projection, and the float32 router logits. Written out by hand
(fast-layer.md, item 4), the backward needs only what the forward already has: the input, the weights, the
(T, N*r + N) activations and the (T, N) gates. Plain autograd would also keep the softmax, the top-k, the
renormalisation and the gating products, and, for bf16 adapters, a float32 copy of the whole input for the
float32 router.

The routing gradient has a closed form. With top-k > 1 the gates are the softmax of the logits restricted to the
top-k, so dL/dlogit = g * (dL/dg - <g, dL/dg>) (zero off the top-k); with top-1 the gate is the raw probability
p of the chosen expert, so dL/dlogit = p * (dL/dg * [chosen] - <g, dL/dg>). Gradients that reach h and the logits
from elsewhere (the contrastive, balance and z losses) are added before the two weight GEMMs, so the whole node
costs one dx GEMM and one weight GEMM per input.

The router always computes in float32 (float64 when the input is float64). When the experts' input is already
in that dtype and is the router's input too (no dropout, no jitter), one GEMM over [A_1; ...; A_N; W_g] gives h
and the logits in a single pass over x. Otherwise the experts use their own GEMM and the router casts its input
to float32 on the fly, so no float32 copy of the input is kept for backward. In the backward, a shared input (bf16
or fp16 adapters without dropout) lets the logits' gradient, cast to the adapter dtype, join the experts' two
GEMMs; a separate router input (dropout or jitter) is cast to float32 again for the router's own two GEMMs.
"""

from __future__ import annotations

from typing import Any

import torch


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router computes in float32, or float64 when everything is float64 (e.g. gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RoutedDownProjection(torch.autograd.Function):
    """Fused down-projection, top-k routing and rank-space gating of one CoMoE layer.

    Inputs:
        expert_input: (T, d_in) what the experts see (the input, after dropout if any), in any float dtype: it is
            cast to the adapter dtype (`down.dtype`) on the fly and kept for backward as given.
        router_input: (T, d_in) what the router sees (the input, after jitter if any), or None (or `expert_input`
            itself) when the router reads the experts' input.
        down: (N*r, d_in) the stacked expert down-projections [A_1; ...; A_N].
        router: (N, d_in) the router weight W_g.
        num_experts, top_k: ints.

    Outputs:
        gated: (T, N*r) the experts' activations times their gates (zero for inactive experts).
        h: (T, N*r) every expert's activation A_j x (inactive ones too; the contrastive loss needs them).
        logits: (T, N) router logits in float32.
        topk_idx: (T, k) the activated experts (not differentiable).
        probs: (T, N) routing probabilities in float32 (not differentiable; for statistics).
    """

    @staticmethod
    def forward(
        ctx: Any,
        expert_input: torch.Tensor,
        router_input: torch.Tensor | None,
        down: torch.Tensor,
        router: torch.Tensor,
        num_experts: int,
        top_k: int,
    ) -> tuple[torch.Tensor, ...]:
        # The dtypes are chosen here, as documented above; an enclosing autocast (bf16 mixed precision) would cast
        # the GEMMs to bf16 in the forward only, since backward runs outside it, and break the backward's GEMMs.
        with torch.autocast(device_type=expert_input.device.type, enabled=False):
            return RoutedDownProjection._forward(ctx, expert_input, router_input, down, router, num_experts, top_k)

    @staticmethod
    def _forward(
        ctx: Any,
        expert_input: torch.Tensor,
        router_input: torch.Tensor | None,
        down: torch.Tensor,
        router: torch.Tensor,
        num_experts: int,
        top_k: int,
    ) -> tuple[torch.Tensor, ...]:
        num_tokens, rank_total = expert_input.shape[0], down.shape[0]
        rank = rank_total // num_experts
        logit_dtype = router_dtype(down.dtype)
        experts_x = expert_input.to(down.dtype)  # (T, d_in); a bf16 input of fp32 adapters is cast here, not saved
        shared = router_input is None or router_input is expert_input  # one dx GEMM and one weight GEMM backward
        if router_input is None:
            router_input = expert_input
        if shared and down.dtype == logit_dtype:
            both = experts_x @ torch.cat([down, router.to(down.dtype)]).t()  # (T, N*r + N): one pass over x
            h, logits = both[:, :rank_total], both[:, rank_total:]
        else:
            h = experts_x @ down.t()  # (T, N*r)
            logits = router_input.to(logit_dtype) @ router.to(logit_dtype).t()  # (T, N), float32 router
        probs, topk_idx, gates = route(logits, top_k)  # (T, N), (T, k), (T, N)
        gated = h.view(num_tokens, num_experts, rank) * gates.to(h.dtype).unsqueeze(-1)  # (T, N, r)
        ctx.mark_non_differentiable(topk_idx, probs)
        ctx.set_materialize_grads(False)
        saved_router_input = None if shared else router_input
        ctx.save_for_backward(expert_input, saved_router_input, down, router, h, gates, probs if top_k == 1 else None)
        ctx.settings = (num_experts, rank, top_k, shared)
        # logits leave as a copy: torch 2.11's torch.compile dropped the gradient of an output that the forward had
        # also read (route above), so compiled training lost the router's DoRA and aux-loss gradients; (T, N) is small
        return gated.view(num_tokens, rank_total), h, logits.clone(), topk_idx, probs

    @staticmethod
    def backward(
        ctx: Any,
        grad_gated: torch.Tensor | None,
        grad_h: torch.Tensor | None,
        grad_logits: torch.Tensor | None,
        _grad_topk: None,
        _grad_probs: None,
    ) -> tuple[torch.Tensor | None, ...]:
        expert_input, router_input, down, router, h, gates, probs = ctx.saved_tensors
        num_experts, rank, top_k, shared = ctx.settings
        num_tokens = h.shape[0]
        grad_rank, grad_router_logits = _rank_and_logit_grads(
            grad_gated, grad_h, grad_logits, h.view(num_tokens, num_experts, rank), gates, probs, top_k
        )  # (T, N*r) in h's dtype, (T, N) float32
        needs = ctx.needs_input_grad
        experts_x = expert_input.to(down.dtype)  # (T, d_in), cast again rather than kept from the forward
        if shared:  # the float32 logit gradient joins the adapter-dtype GEMMs (the router weight has that dtype too)
            grad_both = torch.cat([grad_rank, grad_router_logits.to(grad_rank.dtype)], dim=1)  # (T, N*r + N)
            weight = torch.cat([down, router.to(down.dtype)])  # (N*r + N, d_in)
            grad_x = (grad_both @ weight).to(expert_input.dtype) if needs[0] else None  # (T, d_in)
            grad_weight = grad_both.t() @ experts_x if (needs[2] or needs[3]) else None  # (N*r + N, d_in)
            grad_down = grad_weight[: down.shape[0]] if needs[2] else None
            grad_router = grad_weight[down.shape[0] :].to(router.dtype) if needs[3] else None
            return grad_x, None, grad_down, grad_router, None, None
        logit_dtype = grad_router_logits.dtype
        grad_expert_input = (grad_rank @ down).to(expert_input.dtype) if needs[0] else None  # (T, d_in)
        grad_down = grad_rank.t() @ experts_x if needs[2] else None  # (N*r, d_in)
        grad_router_input = None
        if needs[1]:
            grad_router_input = (grad_router_logits @ router.to(logit_dtype)).to(router_input.dtype)  # (T, d_in)
        grad_router = None
        if needs[3]:
            grad_router = (grad_router_logits.t() @ router_input.to(logit_dtype)).to(router.dtype)  # (N, d_in)
        return grad_expert_input, grad_router_input, grad_down, grad_router, None, None


def _rank_and_logit_grads(
    grad_gated: torch.Tensor | None,
    grad_h: torch.Tensor | None,
    grad_logits: torch.Tensor | None,
    h: torch.Tensor,
    gates: torch.Tensor,
    probs: torch.Tensor | None,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dh (T, N*r) and dL/dlogits (T, N) from the gradients of the Function's three differentiable outputs."""
    num_tokens, num_experts, rank = h.shape
    if grad_gated is None:
        grad_rank = torch.zeros_like(h)  # (T, N, r)
        grad_router_logits = torch.zeros_like(gates)  # (T, N)
    else:
        grad_gated = grad_gated.view(num_tokens, num_experts, rank)
        grad_rank = grad_gated * gates.to(h.dtype).unsqueeze(-1)  # (T, N, r)
        grad_gates = (grad_gated * h).sum(-1).to(gates.dtype)  # (T, N)
        inner = (gates * grad_gates).sum(-1, keepdim=True)  # (T, 1)
        if top_k > 1:  # gates = softmax over the top-k logits
            grad_router_logits = gates * (grad_gates - inner)
        else:  # the gate is the raw probability of the chosen expert
            grad_router_logits = probs * (grad_gates * (gates != 0) - inner)
    grad_rank = grad_rank.view(num_tokens, num_experts * rank)  # (T, N*r)
    if grad_h is not None:
        grad_rank = grad_rank + grad_h
    if grad_logits is not None:
        grad_router_logits = grad_router_logits + grad_logits
    return grad_rank, grad_router_logits


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing in float32.

    Returns the probabilities (T, N), the activated experts (T, k) and the dense gate matrix (T, N): the top-k
    probabilities renormalised to sum to 1, zero elsewhere. With k = 1 the raw probability is kept (as in the
    Switch Transformer), since a renormalised single gate is constantly 1 and the router would never learn.
    """
    probs = router_logits.to(router_dtype(router_logits.dtype)).softmax(dim=-1)  # (T, N)
    topk_probs, topk_idx = probs.topk(top_k, dim=-1)  # (T, k)
    if top_k > 1:
        topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, topk_idx, topk_probs)  # (T, N)
    return probs, topk_idx, gates
