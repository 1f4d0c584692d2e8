"""The contrastive loss against a literal per-token Algorithm 1; sampling; masks; numerics; balance and z losses."""

from __future__ import annotations

import math

import pytest
import torch
from reference import contrastive_loss_literal, finite

from comoe_peft.tuner import losses
from comoe_peft.tuner.losses import (
    contrastive_logits,
    contrastive_loss,
    load_balancing_loss,
    router_z_loss,
    sample_contrastive_indices,
)

N, R, D_IN, D_OUT, T = 6, 3, 10, 9, 14


def experts(seed=0, zero_b=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(N * R, D_IN, generator=g, dtype=dtype)
    up = torch.zeros(D_OUT, N * R, dtype=dtype) if zero_b else torch.randn(D_OUT, N * R, generator=g, dtype=dtype)
    tokens = torch.randn(T, D_IN, generator=g, dtype=dtype)
    topk_idx = torch.stack([torch.randperm(N, generator=g)[:2] for _ in range(T)])
    return down, up, tokens, topk_idx


def pairs_of(down, up):
    return [(down[i * R : (i + 1) * R], up[:, i * R : (i + 1) * R]) for i in range(N)]


@pytest.fixture(params=["dense", "gathered"])
def contrastive_path(request, monkeypatch):
    """Runs a test on both ways of getting sampled negatives' dot products (dense GEMM or Gram-block gathers)."""
    limit = losses.DENSE_CONTRASTIVE_MAX_COLUMNS if request.param == "dense" else 0
    monkeypatch.setattr(losses, "DENSE_CONTRASTIVE_MAX_COLUMNS", limit)
    return request.param


def fast_loss(down, up, tokens, indices, temperature=0.1, token_mask=None):
    h = (tokens @ down.t()).view(-1, N, R)
    return contrastive_loss(h, up, indices, temperature, token_mask)


@pytest.mark.parametrize("anchor", ["random", "all"])
@pytest.mark.parametrize("num_negatives", [None, 2])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_contrastive_loss_equals_literal_algorithm_1(anchor, num_negatives, temperature, contrastive_path):
    down, up, tokens, topk_idx = experts()
    torch.manual_seed(3)
    indices = sample_contrastive_indices(topk_idx, N, anchor, num_negatives)
    assert indices.all_negatives == (num_negatives is None)
    fast = fast_loss(down, up, tokens, indices, temperature)
    literal = contrastive_loss_literal(tokens, pairs_of(down, up), indices, temperature)
    torch.testing.assert_close(fast.double(), literal, rtol=1e-5, atol=1e-5)


def test_gradients_equal_literal_and_router_gets_none():
    down, up, tokens, topk_idx = experts()
    down.requires_grad_(True)
    up.requires_grad_(True)
    torch.manual_seed(0)
    indices = sample_contrastive_indices(topk_idx, N, "random", None)
    g_fast = torch.autograd.grad(fast_loss(down, up, tokens, indices), (down, up))
    g_lit = torch.autograd.grad(contrastive_loss_literal(tokens, pairs_of(down, up), indices, 0.1), (down, up))
    for a, b in zip(g_fast, g_lit):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_indices_are_consistent_with_routing():
    _, _, _, topk_idx = experts()
    for anchor, expected_anchors in [("random", 1), ("all", 2)]:
        idx = sample_contrastive_indices(topk_idx, N, anchor, None)
        assert idx.anchor_idx.shape == (T, expected_anchors)
        for t in range(T):
            active = set(topk_idx[t].tolist())
            assert set(idx.negative_idx[t].tolist()) == set(range(N)) - active
            for a in range(expected_anchors):
                assert idx.anchor_idx[t, a].item() in active
                assert set(idx.positive_idx[t, a].tolist()) == active - {idx.anchor_idx[t, a].item()}


def test_random_anchor_is_uniform_over_activated_experts():
    topk_idx = torch.tensor([[4, 1]]).expand(20000, 2)
    torch.manual_seed(0)
    anchors = sample_contrastive_indices(topk_idx, N, "random", None).anchor_idx.squeeze(1)
    share = (anchors == 4).float().mean().item()
    assert abs(share - 0.5) < 0.02


def test_sampled_negatives_keep_the_denominator_unbiased(contrastive_path):
    down, up, tokens, topk_idx = experts(seed=1)
    h = (tokens @ down.t()).view(-1, N, R)
    full = sample_contrastive_indices(topk_idx, N, "all", None)
    _, neg_full = contrastive_logits(h, up, full, 0.5)
    target = neg_full.exp().sum(-1)  # (T, A): the sum over all inactive experts
    torch.manual_seed(0)
    draws = []
    for _ in range(3000):
        sampled = sample_contrastive_indices(topk_idx, N, "all", 1)
        sampled.anchor_idx, sampled.positive_idx = full.anchor_idx, full.positive_idx
        _, neg = contrastive_logits(h, up, sampled, 0.5)
        draws.append(neg.exp().sum(-1))
    estimate = torch.stack(draws).mean(0)
    torch.testing.assert_close(estimate.double(), target.double(), rtol=0.05, atol=0)
    assert not torch.allclose(draws[0].double(), target.double(), rtol=0.05)  # a single draw is noisy


def test_sampled_negatives_touch_only_the_sampled_experts(contrastive_path):
    down, up, tokens, topk_idx = experts(seed=2)
    torch.manual_seed(0)
    indices = sample_contrastive_indices(topk_idx, N, "random", 1)
    h = (tokens @ down.t()).view(-1, N, R).detach().requires_grad_(True)
    up = up.clone().requires_grad_(True)
    loss = contrastive_loss(h, up, indices, 0.1)
    grad_h, grad_up = torch.autograd.grad(loss, (h, up))
    used = torch.zeros(T, N, dtype=torch.bool)
    used.scatter_(1, topk_idx, True)
    used.scatter_(1, indices.negative_idx, True)
    assert (grad_h.abs().sum(-1)[~used] == 0).all()
    assert (grad_h.abs().sum(-1)[used] > 0).all()
    untouched_experts = set(range(N)) - set(topk_idx.flatten().tolist()) - set(indices.negative_idx.flatten().tolist())
    for e in untouched_experts:
        assert grad_up[:, e * R : (e + 1) * R].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_negatives", [None, 2])
def test_finite_at_initialisation_when_every_expert_output_is_zero(dtype, num_negatives, contrastive_path):
    down, up, tokens, topk_idx = experts(zero_b=True, dtype=dtype)
    down.requires_grad_(True)
    up.requires_grad_(True)
    indices = sample_contrastive_indices(topk_idx, N, "random", num_negatives)
    loss = fast_loss(down, up, tokens, indices)
    assert loss.dtype in (torch.float32, torch.float64) and finite(loss)
    # all cosines are 0: l = -log(P / (P + M w + eps)) with P = 1 positive, M w = N - k weighted negatives
    expected = -math.log(1 / (1 + (N - 2) + 1e-3))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    grads = torch.autograd.grad(loss, (down, up))
    assert all(finite(g) for g in grads)


def test_masked_tokens_do_not_change_the_loss():
    down, up, tokens, topk_idx = experts()
    mask = torch.ones(T)
    mask[:4] = 0
    torch.manual_seed(0)
    indices = sample_contrastive_indices(topk_idx, N, "random", None)
    base = fast_loss(down, up, tokens, indices, token_mask=mask)
    changed = tokens.clone()
    changed[:4] = 100 * torch.randn(4, D_IN, dtype=tokens.dtype)
    assert fast_loss(down, up, changed, indices, token_mask=mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert fast_loss(down, up, changed, indices).item() != pytest.approx(base.item(), rel=1e-3)


def test_load_balancing_loss_matches_switch_formula_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(T, N)
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    counts = torch.zeros(N).scatter_add_(0, chosen.flatten(), torch.ones(T * 2))
    expected = N * ((counts / T) * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, 2), expected)
    mask = torch.ones(T)
    mask[:5] = 0
    masked = load_balancing_loss(logits, 2, mask)
    torch.testing.assert_close(masked, load_balancing_loss(logits[5:], 2))
    uniform = torch.zeros(T, N)
    assert load_balancing_loss(uniform, 2).item() == pytest.approx(2.0, rel=0.2)
    assert load_balancing_loss(logits, 2, torch.zeros(T)).item() == 0.0  # no token counts: no loss, no NaN


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_equals_transformers_mixtral_function(top_k):
    """The same value as transformers' `load_balancing_loss_func` (Mixtral), with and without a padding mask, on
    whichever transformers is installed (CI runs this with 5.6, 5.16 and the newest)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(top_k)
    logits = torch.randn(T, N)
    mask = (torch.rand(T) > 0.3).float()
    torch.testing.assert_close(load_balancing_loss(logits, top_k), load_balancing_loss_func((logits,), N, top_k))
    torch.testing.assert_close(load_balancing_loss(logits, top_k, mask),
                               load_balancing_loss_func((logits,), N, top_k, attention_mask=mask[None, :]))


def test_load_balancing_loss_compiles_without_graph_breaks():
    """fullgraph=True with a mask and without: the loss is part of a compiled training step on every supported
    transformers (5.16's Mixtral function counts with bincount, a graph break)."""
    logits, mask = torch.randn(T, N, requires_grad=True), (torch.arange(T) > 3).float()
    for token_mask in (None, mask):
        explanation = torch._dynamo.explain(load_balancing_loss)(logits, 2, token_mask)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(load_balancing_loss, backend="aot_eager", fullgraph=True, dynamic=False)
    for token_mask in (None, mask):
        torch.testing.assert_close(compiled(logits, 2, token_mask), load_balancing_loss(logits, 2, token_mask))


def test_router_z_loss_formula_and_padding():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0], [50.0, 0.0]])
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(router_z_loss(logits), lse.square().mean())
    torch.testing.assert_close(router_z_loss(logits, torch.tensor([1, 1, 0])), lse[:2].square().mean())


def test_an_expert_with_zero_output_passes_no_gradient_instead_of_exploding():
    down, up, tokens, topk_idx = experts(seed=4)
    up[:, 5 * R : 6 * R] = 0  # expert 5 has never been trained: its output is exactly zero
    up.requires_grad_(True)
    indices = sample_contrastive_indices(topk_idx, N, "all", None)
    loss = fast_loss(down, up, tokens, indices)
    (grad_up,) = torch.autograd.grad(loss, (up,))
    assert finite(grad_up)
    assert grad_up[:, 5 * R : 6 * R].abs().sum() == 0
    assert grad_up.norm() < 1e3  # clamping the zero norm at a tiny epsilon gave ~1e9 here
