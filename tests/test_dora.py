"""DoRA experts (use_dora) against a naive per-expert DoRA that forms every expert's weight: outputs, gradients,
row norms, the contrastive loss, identity at initialisation, low precision, and the peft contract."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from reference import contrastive_loss_literal, dora_expert_weights, dora_moe_loop, expert_matrices, finite
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe_peft import CoMoEConfig, CoMoELayer
from comoe_peft.tuner.dora import MagnitudeTerm, base_weight, expert_row_norms
from comoe_peft.tuner.layer import ExpertSettings, Linear
from comoe_peft.tuner.losses import sample_contrastive_indices

D_IN, D_OUT, R, N = 16, 12, 4, 4


def dora_layer(top_k=2, contrastive=False, conv1d=False, init_weights=False, dtype=torch.float64, seed=0,
               anchor="all", adapter_name="default"):
    """A DoRA CoMoE layer; with init_weights=False, B is random and the magnitudes are moved off their initial value,
    so that every term of the DoRA formula matters."""
    torch.manual_seed(seed)
    base = Conv1D(D_OUT, D_IN) if conv1d else nn.Linear(D_IN, D_OUT)
    nn.init.normal_(base.bias)
    base.requires_grad_(False).to(dtype)  # the model has its dtype before the adapter is added, as with get_peft_model
    settings = ExpertSettings(N, top_k, 0.0, contrastive, 0.1, None, anchor)
    layer = Linear(base, adapter_name, r=R, lora_alpha=2 * R, lora_dropout=0.0, settings=settings,
                   init_weights=init_weights, use_dora=True)
    if not init_weights:
        perturb_magnitudes(layer, adapter_name)
    return layer.to(dtype)


@torch.no_grad()
def perturb_magnitudes(layer, adapter_name="default"):
    magnitude = layer.comoe_magnitude[adapter_name]
    magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))


def reference(layer, x, adapter_name="default"):
    pairs, router = expert_matrices(layer, adapter_name)
    base = layer.get_base_layer()
    settings = layer.comoe_settings[adapter_name]
    return dora_moe_loop(x, base_weight(base), base.bias, pairs, layer.comoe_magnitude[adapter_name], router,
                         settings.top_k, layer.scaling[adapter_name])


def parameters(layer, x, adapter_name="default"):
    return [x, layer.comoe_A[adapter_name], layer.comoe_B[adapter_name], layer.comoe_magnitude[adapter_name],
            layer.comoe_router[adapter_name]]


@pytest.mark.parametrize("training", [True, False], ids=["recorded", "lean"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dora_layer_matches_naive_per_expert_dora(top_k, conv1d, training):
    layer = dora_layer(top_k=top_k, conv1d=conv1d).train(training)  # eval mode takes the lean inference path
    x = torch.randn(3, 5, D_IN, dtype=torch.float64, requires_grad=True)
    fast, ref = layer(x), reference(layer, x)
    torch.testing.assert_close(fast, ref)

    weights = torch.randn_like(fast)
    fast_grads = torch.autograd.grad((fast * weights).sum(), parameters(layer, x))
    ref_grads = torch.autograd.grad((ref * weights).sum(), parameters(layer, x))
    for name, g_fast, g_ref in zip(["x", "A", "B", "magnitude", "router"], fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, msg=lambda m, n=name: f"gradient of {n}: {m}")
        assert g_fast.abs().sum() > 0, name


def test_row_norms_equal_the_norms_of_the_explicit_expert_weights():
    layer = dora_layer(conv1d=True)
    weight = base_weight(layer.get_base_layer())
    assert weight.shape == (D_OUT, D_IN)  # Conv1D stores (in, out)
    pairs, _ = expert_matrices(layer)
    scaling = layer.scaling["default"]
    norms = expert_row_norms(weight, layer.comoe_A["default"], layer.comoe_B["default"], N, scaling)
    explicit = torch.stack([(weight + scaling * b @ a).norm(dim=1) for a, b in pairs])  # (N, d_out)
    torch.testing.assert_close(norms, explicit)
    assert not norms.requires_grad  # the norm is a constant in backward


def test_gradcheck_of_magnitude_router_and_input():
    layer = dora_layer(top_k=2)
    x = torch.randn(4, D_IN, dtype=torch.float64, requires_grad=True)
    a, b = layer.comoe_A["default"], layer.comoe_B["default"]

    def run(x_in, m_in, g_in):  # A and B are left out: the detached norm makes their numerical gradient differ
        weights = {"comoe_A.default": a, "comoe_B.default": b, "comoe_magnitude.default": m_in,
                   "comoe_router.default": g_in}
        return torch.func.functional_call(layer, weights, (x_in,))

    assert torch.autograd.gradcheck(run, (x, layer.comoe_magnitude["default"], layer.comoe_router["default"]))


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "source_is_out"])
def test_gradcheck_of_the_magnitude_term(shared):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    out, source, bias, gates, change = leaf(5, 6), leaf(5, 6), leaf(6), leaf(5, 3), leaf(3, 6)
    if shared:  # the common case: the running output is the base output itself
        same = lambda o, b, g, c: MagnitudeTerm.apply(o, None, b, g, c)  # noqa: E731
        assert torch.autograd.gradcheck(same, (out, bias, gates, change))
        no_bias = lambda o, g, c: MagnitudeTerm.apply(o, None, None, g, c)  # noqa: E731
        assert torch.autograd.gradcheck(no_bias, (out, gates, change))
    else:
        assert torch.autograd.gradcheck(MagnitudeTerm.apply, (out, source, bias, gates, change))
    no_bias = lambda o, s, g, c: MagnitudeTerm.apply(o, s, None, g, c)  # noqa: E731
    assert torch.autograd.gradcheck(no_bias, (out, source, gates, change))


def test_a_trainable_base_bias_gets_the_reference_gradient():
    layer = dora_layer(top_k=2)
    layer.get_base_layer().bias.requires_grad_(True)
    x = torch.randn(7, D_IN, dtype=torch.float64)
    fast, ref = layer(x), reference(layer, x)
    weights = torch.randn_like(fast)
    bias = layer.get_base_layer().bias
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), (bias,))
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), (bias,))
    torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_output_equals_the_base_layer_at_initialisation(dtype, top_k, conv1d):
    layer = dora_layer(top_k=top_k, conv1d=conv1d, init_weights=True, dtype=dtype)
    magnitude = layer.comoe_magnitude["default"]
    weight_norms = base_weight(layer.get_base_layer()).float().norm(dim=1)
    torch.testing.assert_close(magnitude.float(), weight_norms.expand(N, -1), rtol=1e-2, atol=0)
    x = torch.randn(2, 5, D_IN, dtype=dtype)
    assert torch.equal(layer(x), layer.get_base_layer()(x))


def test_magnitudes_initialise_from_the_updated_weight_when_b_is_random():
    layer = Linear(nn.Linear(D_IN, D_OUT), "default", r=R, lora_alpha=2 * R, lora_dropout=0.0,
                   settings=ExpertSettings(N, 2, 0.0, False, 0.1, None, "random"), init_weights=False, use_dora=True)
    pairs, _ = expert_matrices(layer)
    scaling = layer.scaling["default"]
    explicit = torch.stack([(layer.base_layer.weight + scaling * b @ a).norm(dim=1) for a, b in pairs])
    torch.testing.assert_close(layer.comoe_magnitude["default"], explicit.detach())


@pytest.mark.parametrize("top_k", [2, 3])
def test_contrastive_loss_uses_the_scaled_expert_outputs(top_k):
    layer = dora_layer(top_k=top_k, contrastive=True).train()
    x = torch.randn(10, D_IN, dtype=torch.float64)
    layer(x)
    fast = layer.recorded_aux_losses("default")["contrastive"]

    pairs, router = expert_matrices(layer)
    probs = (x @ router.t()).softmax(-1)
    indices = sample_contrastive_indices(probs.topk(top_k, dim=-1).indices, N, "all", None)  # deterministic
    weight = base_weight(layer.get_base_layer())
    experts = dora_expert_weights(weight, pairs, layer.comoe_magnitude["default"], layer.scaling["default"])
    scaled_pairs = [(a, scale.unsqueeze(1) * b) for (a, b), (_, scale) in zip(pairs, experts)]  # o_j = c_j * B_j A_j x
    literal = contrastive_loss_literal(x, scaled_pairs, indices, 0.1)
    torch.testing.assert_close(fast, literal)

    params = parameters(layer, x)[1:4]  # A, B, magnitude
    fast_grads = torch.autograd.grad(fast, params)
    literal_grads = torch.autograd.grad(literal, params)
    for name, g_fast, g_lit in zip(["A", "B", "magnitude"], fast_grads, literal_grads):
        torch.testing.assert_close(g_fast, g_lit, msg=lambda m, n=name: f"gradient of {n}: {m}")
        assert g_fast.abs().sum() > 0, name
    unscaled = contrastive_loss_literal(x, pairs, indices, 0.1)
    assert abs(unscaled.item() - literal.item()) > 1e-6, "the magnitudes must change the contrasted outputs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite_at_initialisation_and_router_is_float32(dtype):
    layer = dora_layer(contrastive=True, init_weights=True, dtype=torch.float32)
    layer.base_layer.to(dtype)  # a half-precision model with float32 adapters (peft's default)
    layer.train()
    x = torch.randn(2, 7, D_IN, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype and finite(out)
    losses = layer.recorded_aux_losses("default")
    assert all(v.dtype == torch.float32 and finite(v) for v in losses.values())
    (out.float().pow(2).mean() + losses["contrastive"]).backward()
    grads = [p.grad for p in parameters(layer, x)]
    assert all(g is not None and finite(g) for g in grads)


def test_two_active_dora_adapters_each_add_their_change_to_the_base():
    layer = dora_layer(top_k=2)
    settings = ExpertSettings(N, 2, 0.0, False, 0.1, None, "random")
    layer.update_layer("other", r=2, lora_alpha=3, lora_dropout=0.0, settings=settings, init_weights=False,
                       use_dora=True)
    layer.double()
    perturb_magnitudes(layer, "other")
    x = torch.randn(6, D_IN, dtype=torch.float64)
    base = layer.get_base_layer()(x)
    expected = reference(layer, x, "default") + reference(layer, x, "other") - base
    layer.set_adapter(["default", "other"])
    torch.testing.assert_close(layer(x), expected)


def test_re_creating_an_adapter_without_dora_drops_its_magnitude():
    layer = dora_layer()
    settings = layer.comoe_settings["default"]
    layer.update_layer("default", r=R, lora_alpha=2 * R, lora_dropout=0.0, settings=settings, use_dora=False)
    assert "default" not in layer.comoe_magnitude


# ---------------------------------------------------------------------------------------------- the peft contract

LLAMA_TARGETS = ["q_proj", "v_proj"]


def dora_model(model, **overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS, use_dora=True,
                  init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(model, CoMoEConfig(**kwargs))


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def train(model, batch, steps=3, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        (out.loss + model.base_model.get_aux_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("builder, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_dora_model_equals_the_base_at_init_and_trains_its_magnitudes(builder, targets, batch):
    base = builder()
    reference_logits = logits(copy.deepcopy(base), batch)
    model = dora_model(base, target_modules=targets, init_weights=True)
    torch.testing.assert_close(logits(model, batch), reference_logits, rtol=0, atol=0)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "comoe_magnitude" in n}
    assert magnitudes and all(p.requires_grad for n, p in model.named_parameters() if "comoe_magnitude" in n)
    train(model, batch)
    for name, param in model.named_parameters():
        if name in magnitudes:
            assert not torch.equal(param, magnitudes[name]), name
    assert not torch.allclose(logits(model, batch), reference_logits)


def test_trainable_parameter_count_includes_one_magnitude_per_expert():
    model = dora_model(tiny_llama())
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer, q (32 -> 32) and v (32 -> 16): N*r*(d_in + d_out) + N*d_in (router) + N*d_out (magnitudes)
    per_layer = sum(4 * 4 * (32 + d_out) + 4 * 32 + 4 * d_out for d_out in (32, 16))
    assert trainable == 2 * per_layer


def test_dora_save_and_reload_are_exact(tmp_path, batch):
    model = dora_model(tiny_llama(), num_experts_pattern={"layers.1.self_attn.v_proj": 6}, rank_pattern={"q_proj": 2})
    train(model, batch, steps=2)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].use_dora is True
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    saved = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        if "comoe_magnitude" in name:
            assert torch.equal(param, saved[name]), name


def test_dora_disable_unload_and_several_adapters(batch):
    base = tiny_llama()
    reference_logits = logits(copy.deepcopy(base), batch)
    model = dora_model(base)
    first = logits(model, batch)
    assert not torch.allclose(first, reference_logits)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), reference_logits)

    model.add_adapter("plain", CoMoEConfig(r=2, num_experts=3, top_k=2, target_modules=["q_proj"], init_weights=False))
    model.set_adapter("plain")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "plain" not in layer.comoe_magnitude and "default" in layer.comoe_magnitude
    second = logits(model, batch)
    assert not torch.allclose(second, first)
    model.delete_adapter("plain")
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first)

    unloaded = model.unload()
    assert not any(isinstance(m, CoMoELayer) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, batch), reference_logits)


FULL_PRECISION = (torch.float64, torch.float32)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["float64", "float32", "bf16", "fp16"])
def test_fresh_dora_model_is_exactly_the_base_for_every_base_dtype(batch, dtype, autocast):
    """A fresh DoRA model (B = 0) computes exactly the base model's logits, the magnitudes set after the adapter took
    the base's dtype (float64: a float32 magnitude moved to float64 afterwards missed 1 by 4e-8). peft's LoRA DoRA
    is the reference: exact too, except with float32 adapters on a half-precision base, where its output is rounded
    once more (by up to 2e-3 in bf16)."""
    base = tiny_llama().to(dtype)
    reference_logits = logits(copy.deepcopy(base), batch)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)
    peft_dora = get_peft_model(copy.deepcopy(base), lora, autocast_adapter_dtype=autocast)
    comoe = CoMoEConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS, use_dora=True)
    model = get_peft_model(base, comoe, autocast_adapter_dtype=autocast)
    magnitude = model.base_model.model.model.layers[0].self_attn.q_proj.comoe_magnitude["default"]
    assert magnitude.dtype == (torch.float32 if autocast and dtype not in FULL_PRECISION else dtype)  # conventions kept
    assert torch.equal(logits(model, batch), reference_logits)
    peft_logits = logits(peft_dora, batch)
    if autocast and dtype not in FULL_PRECISION:
        tolerance = 4 * torch.finfo(dtype).eps * reference_logits.abs().max().item()
        torch.testing.assert_close(peft_logits, reference_logits, rtol=0, atol=tolerance)
    else:
        assert torch.equal(peft_logits, reference_logits)


def test_bf16_dora_model_is_finite_at_initialisation_and_equals_the_base(batch):
    base = tiny_llama().to(torch.bfloat16)
    reference_logits = logits(copy.deepcopy(base), batch)
    model = dora_model(base, init_weights=True, contrastive_loss_coef=0.1)
    torch.testing.assert_close(logits(model, batch), reference_logits, rtol=0, atol=0)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    total = out.loss + model.base_model.get_aux_loss()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in model.base_model.get_aux_losses().values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    magnitude = model.base_model.model.model.layers[0].self_attn.q_proj.comoe_magnitude["default"]
    assert magnitude.dtype == torch.float32 and magnitude.grad is not None


def test_gradient_checkpointing_with_dora_matches_plain(batch):
    plain = dora_model(tiny_llama(), contrastive_loss_coef=0.1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(0)
        out = model(**batch, labels=batch["input_ids"])
        (out.loss + model.base_model.get_aux_loss()).backward()
        grads.append([p.grad for n, p in model.named_parameters() if "comoe_magnitude" in n])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain)



@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dora_layer_compiles_without_graph_breaks_and_matches_eager(mode):
    layer = dora_layer(contrastive=True, dtype=torch.float32)
    getattr(layer, mode)()
    x = torch.randn(2, 5, D_IN, requires_grad=True)
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
        results.append((out.detach(), torch.autograd.grad(loss, parameters(layer, x_in))))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, a, b in zip(["x", "A", "B", "magnitude", "router"], results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dora_layer_matches_reference_and_equals_the_base_at_init(dtype):
    layer = dora_layer(dtype=torch.float32).cuda()
    layer.base_layer.to(dtype)  # float32 adapters on a half-precision model, as get_peft_model makes them
    x = torch.randn(4, 33, D_IN, device="cuda", dtype=dtype)
    expected = reference(copy.deepcopy(layer).float(), x.float())
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for training in (True, False):
        torch.testing.assert_close(layer.train(training)(x).float(), expected, **tol)
    fresh = dora_layer(init_weights=True, dtype=dtype).cuda()
    assert torch.equal(fresh(x), fresh.get_base_layer()(x))
