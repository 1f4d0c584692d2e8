"""The hand-written autograd node of the CoMoE layer: gradients, the float32 router, what it keeps for backward."""

from __future__ import annotations

import pytest
import torch

from comoe_peft.tuner.fused_down import RoutedDownProjection, route


def plain_autograd(expert_input, router_input, down, router, num_experts, top_k):
    """The same computation written with ordinary autograd ops (the float32 router included)."""
    logit_dtype = torch.float64 if expert_input.dtype == torch.float64 else torch.float32
    h = expert_input @ down.t()  # (T, N*r)
    logits = router_input.to(logit_dtype) @ router.to(logit_dtype).t()  # (T, N)
    _, _, gates = route(logits, top_k)
    gated = (h.view(h.shape[0], num_experts, -1) * gates.to(h.dtype).unsqueeze(-1)).view_as(h)
    return gated, h, logits


def downstream(gated, h, logits):
    """A scalar that depends on all three differentiable outputs, as the layer's losses do."""
    return gated.float().sin().sum() + h.float().pow(2).sum() * 0.1 + logits.float().cos().sum()


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("shared_input", [True, False], ids=["fused", "separate-router-input"])
def test_gradcheck_float64(top_k, shared_input):
    torch.manual_seed(top_k)
    num_experts, rank, d_in = 4, 2, 5
    x = torch.randn(6, d_in, dtype=torch.float64, requires_grad=True)
    x_router = x if shared_input else torch.randn(6, d_in, dtype=torch.float64, requires_grad=True)
    down = torch.randn(num_experts * rank, d_in, dtype=torch.float64, requires_grad=True)
    router = torch.randn(num_experts, d_in, dtype=torch.float64, requires_grad=True)

    def run(x_in, x_router_in, down_in, router_in):
        router_in_x = x_in if shared_input else x_router_in
        gated, h, logits, _, _ = RoutedDownProjection.apply(x_in, router_in_x, down_in, router_in, num_experts, top_k)
        return gated, h.pow(2), logits.sin()

    assert torch.autograd.gradcheck(run, (x, x_router, down, router))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_input", [True, False], ids=["fused", "separate-router-input"])
def test_matches_plain_autograd_and_router_is_float32(dtype, shared_input):
    torch.manual_seed(0)
    num_experts, rank, d_in, top_k = 4, 3, 16, 2
    x = torch.randn(32, d_in, dtype=dtype, requires_grad=True)
    x_router = x if shared_input else (x.detach() * 1.01).requires_grad_()
    down = (torch.randn(num_experts * rank, d_in) * 0.2).to(dtype).requires_grad_()
    router = (torch.randn(num_experts, d_in) * 0.2).to(dtype).requires_grad_()
    inputs = [x] if shared_input else [x, x_router]
    params = [*inputs, down, router]

    fast = RoutedDownProjection.apply(x, x_router, down, router, num_experts, top_k)
    slow = plain_autograd(x, x_router, down, router, num_experts, top_k)
    assert fast[2].dtype == torch.float32, "router logits must be float32 whatever the adapter dtype"
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float32 else {}
    for a, b in zip(fast[:3], slow):
        torch.testing.assert_close(a, b, **tolerance)
    fast_grads = torch.autograd.grad(downstream(*fast[:3]), params)
    slow_grads = torch.autograd.grad(downstream(*slow), params)
    for name, a, b in zip(["x", "router_input", "A", "W_g"][: len(params)], fast_grads, slow_grads):
        torch.testing.assert_close(a.float(), b.float(), **tolerance, msg=lambda m, n=name: f"grad of {n}: {m}")
        assert a.dtype == b.dtype


def test_top_k_indices_and_probabilities_are_not_differentiable():
    x = torch.randn(5, 8, requires_grad=True)
    down, router = torch.randn(6, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    _, _, _, topk_idx, probs = RoutedDownProjection.apply(x, x, down, router, 3, 2)
    assert not topk_idx.requires_grad and not probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def saved_float32_bytes(fn) -> int:
    """Bytes of float32 tensors autograd keeps for backward while `fn` runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.dtype == torch.float32:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_bf16_adapters_keep_no_float32_copy_of_the_input():
    torch.manual_seed(0)
    num_tokens, d_in, num_experts, rank = 256, 64, 4, 2
    x = torch.randn(num_tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    down = torch.randn(num_experts * rank, d_in, dtype=torch.bfloat16, requires_grad=True)
    router = torch.randn(num_experts, d_in, dtype=torch.bfloat16, requires_grad=True)
    float32_copy = num_tokens * d_in * 4
    plain = saved_float32_bytes(lambda: plain_autograd(x, x, down, router, num_experts, 2))
    fused = saved_float32_bytes(lambda: RoutedDownProjection.apply(x, x, down, router, num_experts, 2))
    assert plain >= float32_copy, "the plain-autograd float32 router keeps a float32 copy of x (sanity check)"
    assert fused < float32_copy / 4, f"kept {fused} float32 bytes for backward; a float32 x is {float32_copy}"


def test_bf16_input_to_float32_adapters_is_cast_on_the_fly():
    """peft keeps adapters in float32 for a bf16 model: the input is cast inside, and only the bf16 input is kept."""
    torch.manual_seed(0)
    num_tokens, d_in, num_experts, rank = 256, 64, 4, 2
    x = torch.randn(num_tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    down = torch.randn(num_experts * rank, d_in, requires_grad=True)
    router = torch.randn(num_experts, d_in, requires_grad=True)
    fast = RoutedDownProjection.apply(x, x, down, router, num_experts, 2)
    x32 = x.detach().float().requires_grad_()
    slow = plain_autograd(x32, x32, down, router, num_experts, 2)
    for a, b in zip(fast[:3], slow):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
    fast_grads = torch.autograd.grad(downstream(*fast[:3]), [x, down, router])
    slow_grads = torch.autograd.grad(downstream(*slow), [x32, down, router])
    assert fast_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(fast_grads[0], slow_grads[0].bfloat16())
    for a, b in zip(fast_grads[1:], slow_grads[1:]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # float32 sums over 256 tokens, other order
    kept = saved_float32_bytes(lambda: RoutedDownProjection.apply(x, x, down, router, num_experts, 2))
    params = (down.numel() + router.numel()) * 4
    assert kept - params < num_tokens * d_in * 4 / 4, "no float32 copy of the input is kept for backward"


@pytest.mark.parametrize("shared_input", [True, False])
def test_bf16_autocast_keeps_the_adapter_dtype_and_backward_runs(shared_input):
    """Mixed precision (the trainer's `bf16=True`: torch.autocast in the forward only) with float32 adapters."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    router_x = None if shared_input else torch.randn(6, 8, requires_grad=True)
    down = torch.randn(4 * 2, 8, requires_grad=True)
    router = torch.randn(4, 8, requires_grad=True)
    plain = RoutedDownProjection.apply(x, router_x, down, router, 4, 2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = RoutedDownProjection.apply(x, router_x, down, router, 4, 2)
    assert mixed[0].dtype == torch.float32 and torch.equal(mixed[0], plain[0])  # the Function chose the dtypes
    (mixed[0].square().sum() + mixed[2].sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, down, router))


@pytest.mark.parametrize("used", ["logits", "gated+logits", "all"])
def test_compiled_node_passes_every_output_gradient(used):
    """Under torch.compile the node's gradients equal eager ones, whichever outputs the losses read. torch 2.11's
    compile dropped the logits' gradient (the DoRA gates, the balance and z losses read them) while the forward also
    read the logits; the node returns a copy since (the bug does not show on torch 2.13, CI's version)."""
    torch.manual_seed(0)
    num_experts, rank, d_in = 4, 2, 8
    inputs = [torch.randn(10, d_in, requires_grad=True), torch.randn(num_experts * rank, d_in, requires_grad=True),
              torch.randn(num_experts, d_in, requires_grad=True)]
    weights = [torch.randn(10, num_experts * rank), torch.randn(10, num_experts * rank), torch.randn(10, num_experts)]
    picked = {"logits": [2], "gated+logits": [0, 2], "all": [0, 1, 2]}[used]

    def loss(x, down, router):
        outputs = RoutedDownProjection.apply(x, None, down, router, num_experts, 2)[:3]  # gated, h, logits
        return sum((outputs[i] * weights[i]).sum() for i in picked)

    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(loss, backend="eager", fullgraph=True)(*inputs), inputs)
    for name, a, b in zip(["x", "down", "router"], compiled, eager):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"gradient of {n}: {m}")
    assert eager[2].abs().sum() > 0  # the router's gradient is there to lose
