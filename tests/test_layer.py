"""The fast CoMoE layer against a loop-over-experts reference: outputs, gradients, routing rules, dtypes."""

from __future__ import annotations

import pytest
import torch
from reference import expert_matrices, finite, moe_lora_loop
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe_peft.tuner.layer import ExpertSettings, Linear, route


def make_layer(d_in=16, d_out=12, r=4, num_experts=4, top_k=2, contrastive=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    settings = ExpertSettings(num_experts, top_k, 0.0, contrastive, 0.1, None, "random")
    layer = Linear(base, "default", r=r, lora_alpha=2 * r, lora_dropout=0.0, settings=settings, init_weights=False)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    return layer.to(dtype)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fast_layer_matches_loop_reference_outputs_and_grads(top_k):
    layer = make_layer(top_k=top_k, contrastive=False).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    fast = layer(x)
    pairs, router = expert_matrices(layer)
    ref = moe_lora_loop(x, layer.base_layer(x), pairs, router, top_k, layer.scaling["default"])
    torch.testing.assert_close(fast, ref)

    weights = torch.randn_like(fast)
    params = [x, layer.comoe_A["default"], layer.comoe_B["default"], layer.comoe_router["default"]]
    fast_grads = torch.autograd.grad((fast * weights).sum(), params)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    for name, g_fast, g_ref in zip(["x", "A", "B", "router"], fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, msg=lambda m, n=name: f"gradient of {n}: {m}")
    assert fast_grads[3].abs().sum() > 0, "the router must receive a gradient through the gates"


def test_gradcheck_float64():
    layer = make_layer(d_in=6, d_out=5, r=2, num_experts=3, top_k=2, contrastive=False).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a, b, g = layer.comoe_A["default"], layer.comoe_B["default"], layer.comoe_router["default"]

    def run(x_in, a_in, b_in, g_in):
        weights = {"comoe_A.default": a_in, "comoe_B.default": b_in, "comoe_router.default": g_in}
        return torch.func.functional_call(layer, weights, (x_in,))

    assert torch.autograd.gradcheck(run, (x, a, b, g))


def test_top1_keeps_raw_probability_so_router_learns():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    probs, topk_idx, gates = route(logits, top_k=1)
    assert topk_idx.item() == 0
    assert gates[0, 0] == pytest.approx(probs[0, 0].item()) and gates[0, 0] < 1
    _, _, gates2 = route(logits, top_k=2)
    assert gates2.sum().item() == pytest.approx(1.0) and gates2[0, 2] == 0


def test_identity_at_init_and_experts_only_change_output_once_trained():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    settings = ExpertSettings(4, 2, 0.0, True, 0.1, None, "random")
    layer = Linear(base, "default", r=2, lora_alpha=4, lora_dropout=0.0, settings=settings, init_weights=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.comoe_B["default"].abs().sum() == 0


def test_conv1d_base_layer_matches_reference():
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs, weight stored (in, out)
    settings = ExpertSettings(4, 2, 0.0, False, 0.1, None, "random")
    layer = Linear(base, "default", r=4, lora_alpha=8, lora_dropout=0.0, settings=settings, init_weights=False)
    assert (layer.in_features, layer.out_features) == (16, 12)
    x = torch.randn(2, 3, 16)
    pairs, router = expert_matrices(layer)
    ref = moe_lora_loop(x, base(x), pairs, router, 2, layer.scaling["default"])
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_is_finite_and_router_is_float32(dtype):
    layer = make_layer(dtype=dtype)
    layer.train()
    x = torch.randn(2, 7, 16, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and finite(out)
    losses = layer.recorded_aux_losses("default")
    assert set(losses) == {"balance", "z", "contrastive"}
    assert all(v.dtype == torch.float32 and finite(v) for v in losses.values())


def test_dropout_path_equals_fused_path_when_dropout_is_off_in_eval():
    torch.manual_seed(0)
    settings = ExpertSettings(4, 2, 0.0, False, 0.1, None, "random")
    layer = Linear(nn.Linear(16, 12), "default", r=4, lora_alpha=8, lora_dropout=0.5, settings=settings,
                   init_weights=False)
    x = torch.randn(6, 16)
    layer.eval()
    pairs, router = expert_matrices(layer)
    ref = moe_lora_loop(x, layer.base_layer(x), pairs, router, 2, layer.scaling["default"])
    torch.testing.assert_close(layer(x), ref)
    layer.train()
    torch.manual_seed(1)
    trained = layer(x)
    assert not torch.allclose(trained, ref), "dropout must act on the experts' input in training"


def test_nothing_recorded_in_eval_mode_unless_asked():
    layer = make_layer()
    layer(torch.randn(3, 16))  # training mode records
    assert set(layer.recorded_aux_losses("default")) == {"balance", "z", "contrastive"}
    layer.eval()
    layer(torch.randn(3, 16))
    assert layer.recorded_aux_losses("default") == {}, "the training forward's losses must not outlive it"
    assert layer.recorded_routing_stats("default") is None
    layer.forward_context.record_in_eval = True
    layer(torch.randn(3, 16))
    assert layer.recorded_routing_stats("default") is not None
    assert "contrastive" in layer.recorded_aux_losses("default")


def test_merge_is_refused_with_an_explanation():
    layer = make_layer()
    with pytest.raises(NotImplementedError, match="cannot be merged.*unload"):
        layer.merge()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.get_delta_weight("default")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fast_layer_matches_reference(dtype):
    layer = make_layer(d_in=64, d_out=48, r=8, num_experts=8, top_k=2).cuda()
    layer.base_layer.to(dtype)
    x = torch.randn(4, 33, 64, device="cuda", dtype=dtype)
    pairs, router = expert_matrices(layer)
    ref = moe_lora_loop(x.float(), layer.base_layer(x).float(), pairs, router, 2, layer.scaling["default"])
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(layer(x).float(), ref, **tol)
    layer.train()
    layer(x)
    assert all(finite(v) for v in layer.recorded_aux_losses("default").values())
