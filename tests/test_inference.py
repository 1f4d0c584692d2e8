"""The lean inference path and torch.compile: same outputs and gradients as the recorded (training) path."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config
from conftest import tiny_llama, token_batch
from peft import get_peft_model
from reference import expert_matrices, moe_lora_loop
from torch import nn
from torch._dynamo.testing import CompileCounter

from comoe_peft import CoMoEConfig
from comoe_peft.tuner.layer import ExpertSettings, Linear


def make_layer(top_k=2, num_experts=4, dropout=0.0, contrastive=True, seed=0, d_in=16, d_out=12, r=4):
    torch.manual_seed(seed)
    settings = ExpertSettings(num_experts, top_k, 0.0, contrastive and top_k > 1, 0.1, None, "random")
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    return Linear(base, "default", r=r, lora_alpha=2 * r, lora_dropout=dropout, settings=settings,
                  init_weights=False)


def lean_and_recorded(layer, x):
    """The layer's eval output and input gradient through the lean path and through the recorded path."""
    layer.eval()
    results = []
    for record in (False, True):
        layer.forward_context.record_in_eval = record
        x_in = x.detach().clone().requires_grad_(True)
        out = layer(x_in)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        params = [x_in, layer.comoe_A["default"], layer.comoe_B["default"], layer.comoe_router["default"]]
        grads = torch.autograd.grad((out.float() * weights.float()).sum(), params)
        results.append((out.detach(), grads))
    layer.forward_context.record_in_eval = False
    return results


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_lean_path_equals_recorded_path_and_loop_reference_in_float64(top_k):
    layer = make_layer(top_k=top_k).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    (lean, lean_grads), (recorded, recorded_grads) = lean_and_recorded(layer, x)
    torch.testing.assert_close(lean, recorded)
    for name, a, b in zip(["x", "A", "B", "router"], lean_grads, recorded_grads):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"gradient of {n}: {m}")
    pairs, router = expert_matrices(layer)
    torch.testing.assert_close(lean, moe_lora_loop(x, layer.base_layer(x), pairs, router, top_k,
                                                   layer.scaling["default"]))


@pytest.mark.parametrize(
    ("model_dtype", "adapter_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
     (torch.bfloat16, torch.float32)],
)
def test_lean_path_equals_recorded_path_in_every_dtype(model_dtype, adapter_dtype):
    layer = make_layer(dropout=0.1)  # dropout is off in eval on both paths
    layer.base_layer.to(model_dtype)
    for name in ("comoe_A", "comoe_B", "comoe_router"):
        getattr(layer, name)["default"].data = getattr(layer, name)["default"].data.to(adapter_dtype)
    x = torch.randn(2, 6, 16).to(model_dtype)
    (lean, _), (recorded, _) = lean_and_recorded(layer, x)
    assert lean.dtype == model_dtype
    torch.testing.assert_close(lean, recorded)


def test_lean_path_records_nothing_and_recording_brings_statistics_back():
    model = get_peft_model(tiny_llama(), CoMoEConfig(r=4, num_experts=4, top_k=2, init_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))
    batch = token_batch()
    model.eval()
    with torch.no_grad():
        lean = model(**batch).logits
    assert model.base_model.get_routing_stats() == {} and model.base_model.get_aux_losses() == {}
    with torch.no_grad(), model.base_model.recording():
        recorded = model(**batch).logits
    assert not model.base_model.forward_context.record_in_eval, "recording() must restore the flag"
    torch.testing.assert_close(lean, recorded)
    stats = model.base_model.get_routing_stats()
    assert len(stats) == 4 and all(int(s.num_tokens) == int(batch["attention_mask"].sum()) for s in stats.values())
    assert set(model.base_model.get_aux_losses()) == {"balance", "z", "contrastive"}


def test_greedy_generation_is_the_same_on_both_paths():
    model = get_peft_model(tiny_llama(), CoMoEConfig(r=4, num_experts=4, top_k=2, init_weights=False,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.eval()
    prompt = token_batch(batch=2, seq=6, pad_left=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        lean = model.generate(**prompt, **kwargs)
        with model.base_model.recording():
            recorded = model.generate(**prompt, **kwargs)
    assert torch.equal(lean, recorded)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layer_compiles_without_graph_breaks_and_matches_eager(mode):
    layer = make_layer()
    getattr(layer, mode)()
    x = torch.randn(2, 5, 16, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for module in (layer, compiled):
        torch.manual_seed(0)  # the same random contrastive anchors
        x_in = x.detach().clone().requires_grad_(True)
        out = module(x_in)
        loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
        if mode == "train":
            loss = loss + layer.recorded_aux_losses("default")["contrastive"]
        params = [x_in, layer.comoe_A["default"], layer.comoe_B["default"], layer.comoe_router["default"]]
        results.append((out.detach(), torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, a, b in zip(["x", "A", "B", "router"], results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_whole_model_compiles_with_fullgraph_and_matches_eager(mode):
    """torch.compile(fullgraph=True) with inductor on a transformers model with CoMoE adapters: outputs, the
    auxiliary losses and gradients equal eager, and a second batch reuses the graph (no recompilation)."""
    model = get_peft_model(tiny_llama(), CoMoEConfig(r=4, num_experts=4, top_k=2, init_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))
    getattr(model, mode)()
    inner = model.base_model.model  # the transformers model, with the tuner's forward pre-hook on it
    batch = token_batch()
    counter = CompileCounter()
    torch._dynamo.reset()
    counted = torch.compile(inner, backend=counter, fullgraph=True)
    for seed in (1, 2):
        counted(**token_batch(seed=seed))
    assert counter.frame_count == 1, "a new batch of the same shape must not recompile"

    compiled = torch.compile(inner, fullgraph=True)
    results = []
    for module in (inner, compiled):
        model.zero_grad()
        torch.manual_seed(0)
        with torch._inductor.config.patch(fallback_random=True):  # eager's random anchors, not inductor's own RNG
            out = module(**batch, labels=batch["input_ids"])
        loss = out.loss
        if mode == "train":
            aux = model.base_model.get_aux_losses()
            assert set(aux) == {"balance", "z", "contrastive"}
            loss = loss + model.base_model.get_aux_loss()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out.logits.detach(), loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)
    for a, b in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_lean_path_equals_recorded_path_and_compiles(dtype):
    layer = make_layer(d_in=64, d_out=48, r=8, num_experts=8).cuda().to(dtype)
    x = torch.randn(4, 9, 64, device="cuda", dtype=dtype)
    (lean, _), (recorded, _) = lean_and_recorded(layer, x)
    torch.testing.assert_close(lean, recorded)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, lean, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
