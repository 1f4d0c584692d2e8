"""CoMoE's auxiliary losses as pure functions of rank-space tensors.

Shapes used throughout: T tokens (batch and sequence flattened), N experts, k activated experts per token,
r the LoRA rank, A anchors per token (1 for the paper's Algorithm 1, k for its Eq. 12), P = k - 1 positives per
anchor, M negatives per token.

The contrastive loss never builds the d_out-wide expert outputs o_j = B_j h_j. With h_j = A_j x the rank-space
activation of expert j, every inner product between two expert outputs is

    <o_i, o_j> = h_i^T (B_i^T B_j) h_j,

so the small Gram matrix G = B_cat^T B_cat ((N*r) x (N*r), B_cat = [B_1 ... B_N]) and h give every cosine exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .fused_down import router_dtype

CONTRASTIVE_EPS = 1e-3  # the epsilon of the paper's Algorithm 1, added to the softmax denominator
NORM_EPS = 1e-6  # an expert output shorter than this has no direction: its cosines are 0 and pass no gradient
# Up to this many expert columns (N*r), sampled negatives use the dense anchor-against-all-experts GEMM too and pick
# their candidates from it: on a 2-core CPU at N*r = 64 that is 14% faster per layer step than gathering each
# candidate's (r, r) Gram block (benchmarks/prototypes.py). Above it, the gathers do less work than the dense GEMM.
DENSE_CONTRASTIVE_MAX_COLUMNS = 256


@dataclass
class ContrastiveIndices:
    """Which experts each token contrasts: anchors, positives (other activated experts) and negatives.

    Attributes:
        anchor_idx: (T, A) expert index of each anchor.
        positive_idx: (T, A, P) the activated experts other than the anchor, P = k - 1.
        negative_idx: (T, M) inactive experts used as negatives.
        negative_log_weight: log of the weight of each negative in the denominator: log((N - k) / M) when M of
            the N - k inactive experts were sampled (keeps the denominator unbiased), else 0.
        all_negatives: True when `negative_idx` holds every inactive expert.
        anchor_slots: (T, A) position of each anchor in the token's top-k list (`topk_idx`).
        positive_slots: (T, A, P) positions of the positives in the token's top-k list.
    """

    anchor_idx: torch.Tensor
    positive_idx: torch.Tensor
    negative_idx: torch.Tensor
    negative_log_weight: float
    all_negatives: bool
    anchor_slots: torch.Tensor | None = None
    positive_slots: torch.Tensor | None = None


def sample_contrastive_indices(
    topk_idx: torch.Tensor,
    num_experts: int,
    anchor: Literal["random", "all"] = "random",
    num_negatives: int | None = None,
) -> ContrastiveIndices:
    """Draw the anchors and negatives of every token from its activated experts `topk_idx` (T, k).

    `anchor="random"` picks one activated expert per token uniformly (Algorithm 1); `"all"` makes every activated
    expert an anchor (Eq. 12). `num_negatives=None` uses every inactive expert; an integer m draws m of them
    uniformly without replacement, per token. Everything stays on the tensors' device (no host synchronisation).
    """
    num_tokens, top_k = topk_idx.shape
    device = topk_idx.device
    if anchor == "random":
        anchor_slots = torch.randint(0, top_k, (num_tokens, 1), device=device)  # (T, 1)
    else:
        anchor_slots = torch.arange(top_k, device=device).expand(num_tokens, top_k)  # (T, k)
    offsets = torch.arange(1, top_k, device=device)  # (P,)
    positive_slots = (anchor_slots.unsqueeze(-1) + offsets) % top_k  # (T, A, P)
    anchor_idx = topk_idx.gather(1, anchor_slots)  # (T, A)
    positive_idx = topk_idx.gather(1, positive_slots.flatten(1)).view(positive_slots.shape)  # (T, A, P)

    activated = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=device)
    activated.scatter_(1, topk_idx, True)  # (T, N)
    num_inactive = num_experts - top_k
    if num_negatives is None or num_negatives >= num_inactive:
        # stable sort puts the inactive experts (False) first, in index order
        negative_idx = torch.argsort(activated.to(torch.int8), dim=1, stable=True)[:, :num_inactive]  # (T, N-k)
        return ContrastiveIndices(anchor_idx, positive_idx, negative_idx, 0.0, True, anchor_slots, positive_slots)
    scores = torch.rand(num_tokens, num_experts, device=device).masked_fill(activated, 2.0)  # (T, N)
    negative_idx = scores.topk(num_negatives, dim=1, largest=False).indices  # (T, m): m random inactive experts
    log_weight = math.log(num_inactive / num_negatives)
    return ContrastiveIndices(anchor_idx, positive_idx, negative_idx, log_weight, False, anchor_slots, positive_slots)


def _expert_gram_blocks(expert_gram: torch.Tensor, num_experts: int) -> torch.Tensor:
    rank = expert_gram.shape[0] // num_experts
    return expert_gram.view(num_experts, rank, num_experts, rank).permute(0, 2, 1, 3)  # (N, N, r, r) = B_i^T B_j


def _squared_norms(h: torch.Tensor, gram_blocks: torch.Tensor) -> torch.Tensor:
    """||B_j h_j||^2 for every token and expert: (T, N)."""
    diagonal = torch.diagonal(gram_blocks, dim1=0, dim2=1).permute(2, 0, 1)  # (N, r, r) = B_j^T B_j
    return torch.einsum("tnr,nrs,tns->tn", h, diagonal, h)


def _anchor_dots_dense(h: torch.Tensor, expert_gram: torch.Tensor, anchor_idx: torch.Tensor) -> torch.Tensor:
    """<o_anchor, o_j> for every anchor and every expert j with one GEMM against the Gram matrix: (T, A, N)."""
    num_tokens, num_experts, rank = h.shape
    anchor_mask = torch.nn.functional.one_hot(anchor_idx, num_experts).to(h.dtype)  # (T, A, N)
    anchor_only = h.unsqueeze(1) * anchor_mask.unsqueeze(-1)  # (T, A, N, r): h_a in its block, zeros elsewhere
    projected = anchor_only.flatten(2) @ expert_gram  # (T, A, N*r): h_a^T B_a^T B_cat
    return (projected.view(num_tokens, -1, num_experts, rank) * h.unsqueeze(1)).sum(-1)  # (T, A, N)


def _anchor_dots_gathered(
    h: torch.Tensor, gram_blocks: torch.Tensor, anchor_idx: torch.Tensor, candidate_idx: torch.Tensor
) -> torch.Tensor:
    """<o_anchor, o_c> for the given candidates only (T, A, S), touching only their Gram blocks."""
    num_tokens = candidate_idx.shape[0]
    token = torch.arange(num_tokens, device=h.device)
    h_anchor = h[token.unsqueeze(1), anchor_idx]  # (T, A, r)
    h_candidate = h[token.view(-1, 1, 1), candidate_idx]  # (T, A, S, r)
    blocks = gram_blocks[anchor_idx.unsqueeze(-1), candidate_idx]  # (T, A, S, r, r)
    return torch.einsum("tar,tasrq,tasq->tas", h_anchor, blocks, h_candidate)


def expert_gram_matrix(expert_up: torch.Tensor) -> torch.Tensor:
    """G = B_cat^T B_cat ((N*r) x (N*r)) in float32 (float64 for float64 input) from the stacked B (d_out, N*r).

    Built in float32 even for half-precision weights: at initialisation B = 0 and the cosine's gradient with
    respect to G is huge, which would overflow float16 before it is multiplied by B = 0.
    """
    up = expert_up.to(router_dtype(expert_up.dtype))
    return up.t() @ up


def _cosines(dots: torch.Tensor, squared_a: torch.Tensor, squared_b: torch.Tensor) -> torch.Tensor:
    """dots / (|a| |b|), and 0 where either output is shorter than NORM_EPS.

    A zero output (every expert at initialisation, or an expert no token has been routed to yet) has no
    direction; its cosine is 0 and it passes no gradient. Clamping its norm at a tiny epsilon instead would give a
    gradient of order 1 / epsilon, which swamps the task loss under gradient clipping.
    """
    floor = NORM_EPS**2
    has_direction = (squared_a > floor) & (squared_b > floor)
    norms = squared_a.clamp_min(floor).sqrt() * squared_b.clamp_min(floor).sqrt()
    return torch.where(has_direction, dots / norms, torch.zeros_like(dots))


def contrastive_logits(
    h: torch.Tensor, expert_up: torch.Tensor, indices: ContrastiveIndices, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits between each anchor and its positives (T, A, P) and negatives (T, A, M), divided by tau.

    `expert_up` is the stacked up-projection B_cat (d_out, N*r). The log-weight of sampled negatives is already
    added to the negative logits. Computed in float32 (float64 for float64 input).
    """
    expert_gram = expert_gram_matrix(expert_up)  # (N*r, N*r)
    h = h.to(expert_gram.dtype)
    num_tokens, num_experts, _ = h.shape
    gram_blocks = _expert_gram_blocks(expert_gram, num_experts)
    num_anchors = indices.anchor_idx.shape[1]
    negatives = indices.negative_idx.unsqueeze(1).expand(num_tokens, num_anchors, -1)  # (T, A, M)
    candidates = torch.cat([indices.positive_idx, negatives], dim=-1)  # (T, A, S), S = P + M
    token = torch.arange(num_tokens, device=h.device)
    if indices.all_negatives or num_experts * h.shape[2] <= DENSE_CONTRASTIVE_MAX_COLUMNS:
        dots_all = _anchor_dots_dense(h, expert_gram, indices.anchor_idx)  # (T, A, N)
        dots = dots_all.gather(2, candidates)  # (T, A, S)
        squared_all = _squared_norms(h, gram_blocks)  # (T, N)
        anchor_squared = squared_all.gather(1, indices.anchor_idx)  # (T, A)
        candidate_squared = squared_all[token.view(-1, 1, 1), candidates]  # (T, A, S)
    else:
        dots = _anchor_dots_gathered(h, gram_blocks, indices.anchor_idx, candidates)  # (T, A, S)
        involved = torch.cat([indices.anchor_idx.unsqueeze(-1), candidates], dim=-1)  # (T, A, 1 + S)
        h_involved = h[token.view(-1, 1, 1), involved]  # (T, A, 1 + S, r)
        diagonal = gram_blocks[involved, involved]  # (T, A, 1 + S, r, r)
        squared = torch.einsum("tasr,tasrq,tasq->tas", h_involved, diagonal, h_involved)  # (T, A, 1 + S)
        anchor_squared, candidate_squared = squared[..., 0], squared[..., 1:]
    logits = _cosines(dots, anchor_squared.unsqueeze(-1), candidate_squared) / temperature  # (T, A, S)
    num_positives = indices.positive_idx.shape[-1]
    positive_logits = logits[..., :num_positives]
    negative_logits = logits[..., num_positives:] + indices.negative_log_weight
    return positive_logits, negative_logits


def contrastive_loss(
    h: torch.Tensor,
    expert_up: torch.Tensor,
    indices: ContrastiveIndices,
    temperature: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CoMoE's contrastive loss (Algorithm 1 of the paper), averaged over the valid tokens.

    Per anchor: l = -log( sum_pos exp(s) / (sum_{pos and neg} exp(s) + eps) ), eps = 1e-3, with s the cosine
    between expert outputs over `temperature`. With several anchors per token (Eq. 12) the anchors' terms are summed.

    Args:
        h: (T, N, r) rank-space activations A_j x of every expert, inactive ones included.
        expert_up: (d_out, N*r) the experts' up-projections side by side, B_cat = [B_1 ... B_N].
        indices: anchors, positives and negatives from `sample_contrastive_indices`.
        temperature: tau > 0.
        token_mask: (T,) 1 for tokens that count, 0 for padding; None = all count.

    Returns:
        A float32 scalar (float64 for float64 input). Finite when every expert output is zero (B = 0 at initialisation).
    """
    positive_logits, negative_logits = contrastive_logits(h, expert_up, indices, temperature)
    return info_nce(positive_logits, negative_logits, token_mask)


def info_nce(
    positive_logits: torch.Tensor, negative_logits: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """-log( sum_pos exp(s) / (sum_{pos and neg} exp(s) + eps) ) per anchor, summed over a token's anchors and
    averaged over the valid tokens. positive_logits: (T, A, P); negative_logits: (T, A, M)."""
    all_logits = torch.cat([positive_logits, negative_logits], dim=-1)  # (T, A, P + M)
    log_denominator = torch.logaddexp(
        torch.logsumexp(all_logits, dim=-1), torch.tensor(math.log(CONTRASTIVE_EPS), device=all_logits.device)
    )  # (T, A)
    per_token = (log_denominator - torch.logsumexp(positive_logits, dim=-1)).sum(dim=-1)  # (T,)
    return masked_mean(per_token, token_mask)


def contrastive_loss_from_outputs(
    outputs: torch.Tensor,
    indices: ContrastiveIndices,
    temperature: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CoMoE's contrastive loss from materialised expert representations (the block layout, where no Gram trick
    passes the nonlinearity).

    Args:
        outputs: (T, k + M, d) each token's representations of its k activated experts (in top-k order) followed
            by its M negatives (in `indices.negative_idx` order).
        indices: from `sample_contrastive_indices` (its slots say which activated experts are anchors and positives).
        temperature: tau > 0.
        token_mask: (T,) 1 for tokens that count, 0 for padding; None = all count.

    Returns:
        A float32 scalar (float64 for float64 input), finite when every representation is zero.
    """
    with torch.autocast(device_type=outputs.device.type, enabled=False):  # float32 even under bf16 autocast
        return _contrastive_loss_from_outputs(outputs.to(router_dtype(outputs.dtype)), indices, temperature,
                                              token_mask)


def _contrastive_loss_from_outputs(
    outputs: torch.Tensor, indices: ContrastiveIndices, temperature: float, token_mask: torch.Tensor | None
) -> torch.Tensor:
    num_tokens, top_k = indices.anchor_slots.shape[0], indices.positive_slots.shape[-1] + 1
    token = torch.arange(num_tokens, device=outputs.device)
    num_anchors = indices.anchor_slots.shape[1]
    negative_slots = torch.arange(top_k, outputs.shape[1], device=outputs.device)  # (M,)
    candidates = torch.cat([indices.positive_slots,
                            negative_slots.expand(num_tokens, num_anchors, -1)], dim=-1)  # (T, A, S)
    anchors = outputs[token.unsqueeze(1), indices.anchor_slots]  # (T, A, d)
    others = outputs[token.view(-1, 1, 1), candidates]  # (T, A, S, d)
    dots = torch.einsum("tad,tasd->tas", anchors, others)  # (T, A, S)
    squared = outputs.square().sum(-1)  # (T, k + M)
    anchor_squared = squared.gather(1, indices.anchor_slots)  # (T, A)
    candidate_squared = squared[token.view(-1, 1, 1), candidates]  # (T, A, S)
    logits = _cosines(dots, anchor_squared.unsqueeze(-1), candidate_squared) / temperature  # (T, A, S)
    num_positives = indices.positive_slots.shape[-1]
    return info_nce(logits[..., :num_positives], logits[..., num_positives:] + indices.negative_log_weight,
                    token_mask)


def load_balancing_loss(
    router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one adapted layer: N * sum_e f_e * P_e.

    f_e is the share of the tokens' top-k choices that go to expert e (the f_e sum to top_k) and P_e the mean router
    probability of expert e, both over the tokens whose mask is 1. `router_logits` is (T, N); padding tokens
    (token_mask == 0) are left out; 0 when no token counts. Equals top_k under uniform routing. The formula of
    transformers' Mixtral `load_balancing_loss_func`, written with dense one-hot sums so that
    `torch.compile(fullgraph=True)` has no graph break on any supported transformers (5.16's counts with bincount).
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, N)
    chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts)  # (T, k, N)
    choices = chosen.sum(dim=1).to(probs.dtype)  # (T, N): 1 where the expert is among the token's top-k
    if token_mask is None:
        weights = torch.ones_like(probs[:, 0])
    else:
        weights = token_mask.reshape(-1).to(probs.dtype)  # (T,)
    total = weights.sum().clamp_min(1.0)
    tokens_per_expert = (choices * weights[:, None]).sum(dim=0) / total  # (N,) f_e
    prob_per_expert = (probs * weights[:, None]).sum(dim=0) / total  # (N,) P_e
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(router_logits)^2 (the formula of transformers'
    `router_z_loss_func`, with padding tokens left out)."""
    log_z = torch.logsumexp(router_logits.float(), dim=-1)  # (T,)
    return masked_mean(log_z.square(), token_mask)


def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (T,) over the tokens whose mask is 1 (all tokens if the mask is None); 0 if none count."""
    if token_mask is None:
        return values.mean()
    weights = token_mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
