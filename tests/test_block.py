"""Routed FFN-block experts (`target_modules=["mlp"]`, the MixLoRA layout), with LoRA or DoRA experts (MixDoRA):
the fast block against the literal MoE-PEFT-style loop (every active expert runs its whole block, DoRA experts with
their weights formed explicitly), its contrastive loss against explicit expert outputs, and the peft contract for
blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch
from peft import PeftModel, get_peft_model
from reference import (
    block_expert_representations,
    block_moe_loop,
    contrastive_loss_of_outputs_literal,
    dense_weight,
)
from torch import nn

from comoe_peft import CoMoEConfig
from comoe_peft.tuner.block import Block
from comoe_peft.tuner.block_dora import block_scales
from comoe_peft.tuner.layer import ExpertSettings, Linear
from comoe_peft.tuner.losses import sample_contrastive_indices


def make_block(kind: str, top_k: int = 2, num_experts: int = 4, num_negatives=None, anchor: str = "random",
               contrastive: bool = True, dtype=torch.float64, use_dora: bool = False) -> Block:
    """A Block on the first MLP of a tiny Llama (gated) or GPT-2 (Conv1D, its dropout off, random biases), random B,
    float64; with
    `use_dora`, DoRA experts whose magnitudes are moved off their initial values (so that every term matters)."""
    model = tiny_llama() if kind == "llama" else tiny_gpt2()
    mlp = model.model.layers[0].mlp if kind == "llama" else model.transformer.h[0].mlp
    if kind == "gpt2":
        mlp.dropout.p = 0.0
        with torch.no_grad():  # GPT-2 starts its biases at 0; DoRA must leave them unscaled, which 0 would not show
            for projection in (mlp.c_fc, mlp.c_proj):
                projection.bias.normal_(std=0.5)
    mlp = mlp.to(dtype).requires_grad_(False)
    settings = ExpertSettings(num_experts, top_k, 0.0, contrastive and top_k > 1, 0.1, num_negatives, anchor)
    torch.manual_seed(3)
    block = Block(mlp, "default", r=4, lora_alpha=8, lora_dropout=0.0, settings=settings, init_weights=False,
                  use_dora=use_dora).to(dtype)
    if use_dora:
        perturb_magnitudes(block)
    return block


@torch.no_grad()
def perturb_magnitudes(block: Block, adapter_name: str = "default") -> None:
    for magnitude in (block.comoe_magnitude[adapter_name], block.comoe_magnitude_out[adapter_name]):
        magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))


def adapter_parameters(block: Block, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's parameters by attribute name (the magnitudes only for DoRA experts)."""
    return {name: getattr(block, name)[adapter_name] for name in Block.adapter_layer_names
            if adapter_name in getattr(block, name)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_equals_the_loop_reference_outputs_and_gradients(kind, top_k, mode, use_dora):
    block = make_block(kind, top_k=top_k, use_dora=use_dora)
    assert set(adapter_parameters(block)) >= ({"comoe_magnitude", "comoe_magnitude_out"} if use_dora else set())
    getattr(block, mode)()
    x = torch.randn(3, 5, block.in_features, dtype=torch.float64)
    weights = torch.randn(3, 5, block.out_features, dtype=torch.float64)
    results = []
    for compute in (block, lambda inp: block_moe_loop(block, inp, top_k)):
        x_in = x.clone().requires_grad_(True)
        out = compute(x_in)
        params = [x_in, *adapter_parameters(block).values()]
        results.append((out, torch.autograd.grad((out * weights).sum(), params)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, fast, slow in zip(["x", *adapter_parameters(block)], results[0][1], results[1][1]):
        torch.testing.assert_close(fast, slow, msg=lambda m, n=name: f"gradient of {n}: {m}")
        assert fast.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("num_negatives, anchor", [(None, "random"), (1, "random"), (None, "all")])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_contrastive_loss_equals_explicit_expert_outputs(kind, num_negatives, anchor, use_dora):
    """The loss between E_j(x) - MLP(x) of activated and inactivated experts, built explicitly for every expert,
    with the same anchors and negatives: value and gradients; the router gets no gradient from it."""
    block = make_block(kind, num_experts=5, num_negatives=num_negatives, anchor=anchor, use_dora=use_dora).train()
    x = torch.randn(2, 6, block.in_features, dtype=torch.float64)
    torch.manual_seed(11)
    block(x)
    fast = block.recorded_aux_losses("default")["contrastive"]

    router = block.comoe_router["default"]
    topk_idx = (x.reshape(-1, x.shape[-1]) @ router.t()).softmax(-1).topk(2, dim=-1).indices
    torch.manual_seed(11)  # the block draws its anchors and negatives first thing after routing
    indices = sample_contrastive_indices(topk_idx, 5, anchor, num_negatives)
    slow = contrastive_loss_of_outputs_literal(block_expert_representations(block, x), indices, 0.1)
    torch.testing.assert_close(fast, slow)

    params = adapter_parameters(block)
    fast_grads = torch.autograd.grad(fast, list(params.values()), allow_unused=True)
    slow_grads = torch.autograd.grad(slow, list(params.values()), allow_unused=True)
    for name, a, b in zip(params, fast_grads, slow_grads):
        if name == "comoe_router":
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"gradient of {n}: {m}")
            assert a.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_expert_outputs_equal_the_explicit_representations(kind, use_dora):
    block = make_block(kind, num_experts=5, use_dora=use_dora).eval()
    x = torch.randn(7, block.in_features, dtype=torch.float64)
    torch.testing.assert_close(block.expert_outputs(x, "default"), block_expert_representations(block, x))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_experts_start_as_the_base_model_with_finite_losses(builder, dtype, use_dora):
    base = builder().to(dtype)
    batch = token_batch()
    with torch.no_grad():
        expected = base(**batch).logits
    config = CoMoEConfig(target_modules=["mlp"], r=4, num_experts=4, top_k=2, use_dora=use_dora)
    model = get_peft_model(copy.deepcopy(base), config)
    assert sum(isinstance(m, Block) for m in model.modules()) == 2
    with torch.no_grad():  # the gated mix of k equal activations: the frozen block up to rounding
        torch.testing.assert_close(model(**batch).logits, expected, **({} if dtype == torch.float32 else
                                                                        {"atol": 2e-2, "rtol": 2e-2}))
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    aux = model.base_model.get_aux_losses()
    assert set(aux) == {"balance", "z", "contrastive"} and all(torch.isfinite(v) for v in aux.values())
    (out.loss + model.base_model.get_aux_loss()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("comoe_magnitude_out" in n for n in grads) == use_dora


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dora_block_magnitudes_start_at_the_row_norms_and_every_scale_at_one(kind, top_k):
    """m_p,j = ||W_p|| per output row for every projection and expert (B = 0), so every c_p,j is exactly 1 and the
    block equals its LoRA-expert twin (same A, router) and the frozen block; then a random B moves it off both."""
    model = tiny_llama() if kind == "llama" else tiny_gpt2()
    mlp = (model.model.layers[0].mlp if kind == "llama" else model.transformer.h[0].mlp).eval()
    settings = ExpertSettings(4, top_k, 0.0, False, 0.1, None, "random")
    torch.manual_seed(5)
    block = Block(copy.deepcopy(mlp), "default", r=4, lora_alpha=8, lora_dropout=0.0, settings=settings,
                  use_dora=True).eval()
    torch.manual_seed(5)
    twin = Block(copy.deepcopy(mlp), "default", r=4, lora_alpha=8, lora_dropout=0.0, settings=settings).eval()
    layout = block.layout
    for p, name in enumerate(layout.inputs):
        weight = dense_weight(getattr(mlp, name))  # (f, d)
        torch.testing.assert_close(block.comoe_magnitude["default"][p], weight.norm(dim=1).expand(4, -1))
    torch.testing.assert_close(block.comoe_magnitude_out["default"],
                               dense_weight(getattr(mlp, layout.output)).norm(dim=1).expand(4, -1))
    scales = block_scales(block, "default")
    assert torch.equal(scales.inputs, torch.ones_like(scales.inputs))
    assert torch.equal(scales.output, torch.ones_like(scales.output))
    x = torch.randn(3, 5, block.in_features)
    with torch.no_grad():
        torch.testing.assert_close(block(x), twin(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(block(x), mlp(x), atol=1e-6, rtol=1e-6)
        for up in (block.comoe_B["default"], block.comoe_B_out["default"]):
            up.normal_(std=0.5)
        assert not torch.allclose(block(x), mlp(x), atol=1e-3)


@pytest.mark.parametrize("first, second", [(True, True), (True, False), (False, True)],
                         ids=["dora+dora", "dora+lora", "lora+dora"])
def test_several_active_block_adapters_each_add_their_change(first, second):
    """Two active adapters on a GPT-2 block (a biased output projection: the bias counts once), the second with
    top-1 routing: y = E_a(x) + E_b(x) - MLP(x), each E from the loop reference."""
    block = make_block("gpt2", use_dora=first).eval()
    settings = ExpertSettings(3, 1, 0.0, False, 0.1, None, "random")
    block.update_layer("other", r=2, lora_alpha=3, lora_dropout=0.0, settings=settings, init_weights=False,
                       use_dora=second)
    if second:
        perturb_magnitudes(block, "other")
    x = torch.randn(2, 5, block.in_features, dtype=torch.float64)
    expected = block_moe_loop(block, x, 2) + block_moe_loop(block, x, 1, "other") - block.get_base_layer()(x)
    block.set_adapter(["default", "other"])
    torch.testing.assert_close(block(x), expected)


def mixlora_config(**overrides) -> CoMoEConfig:
    """MixLoRA's layout: per-linear experts on attention projections, block experts on the MLP."""
    kwargs = dict(target_modules=["q_proj", "v_proj", "mlp"], r=4, lora_alpha=8, num_experts=4, top_k=2,
                  init_weights=False)
    return CoMoEConfig(**(kwargs | overrides))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_mixlora_layout_saves_and_reloads_exactly(tmp_path, use_dora):
    batch = token_batch()
    model = get_peft_model(tiny_llama(), mixlora_config(use_dora=use_dora)).eval()
    kinds = {type(m) for m in model.modules() if hasattr(m, "comoe_A")}
    assert kinds == {Block, Linear}
    if use_dora:  # magnitudes away from their initial values, which a fresh model would recompute
        for module in model.modules():
            if isinstance(module, Block):
                perturb_magnitudes(module)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    saved = set(__import__("safetensors.torch").torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.comoe_A_out" in saved
    magnitudes = {"base_model.model.model.layers.0.mlp.comoe_magnitude",
                  "base_model.model.model.layers.0.mlp.comoe_magnitude_out"}
    assert (magnitudes <= saved) == use_dora
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=0, rtol=0)
    originals = dict(model.named_parameters())
    for name, param in reloaded.named_parameters():
        if "comoe_" in name:
            assert torch.equal(param, originals[name]), name


def test_a_block_and_a_projection_inside_it_are_refused():
    with pytest.raises(ValueError, match=r"both the FFN block 'model.layers.0.mlp' and 'model.layers.0.mlp.gate_proj'"):
        get_peft_model(tiny_llama(), CoMoEConfig(target_modules=["mlp", "gate_proj"]))
    model = get_peft_model(tiny_llama(), CoMoEConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="inside the FFN block 'model.layers.0.mlp'"):
        model.add_adapter("other", CoMoEConfig(target_modules=["gate_proj"]))
    model = get_peft_model(tiny_llama(), CoMoEConfig(target_modules=["gate_proj"]))
    with pytest.raises(ValueError, match="both the FFN block"):
        model.add_adapter("other", CoMoEConfig(target_modules=["mlp"]))


def test_an_unsupported_block_names_its_type_and_what_is_supported():
    with pytest.raises(ValueError, match=r"LlamaAttention, which CoMoE does not support.*gate_proj / up_proj / "
                                         r"down_proj \+ act_fn.*c_fc / c_proj \+ act"):
        get_peft_model(tiny_llama(), CoMoEConfig(target_modules=["self_attn"]))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_experts_keep_the_peft_contract(use_dora):
    """Disable, switch, mixed-adapter batches both ways, merge refused, delete, re-create and unload."""
    batch = token_batch()
    base = tiny_llama()
    with torch.no_grad():
        expected = base(**batch).logits
    model = get_peft_model(copy.deepcopy(base), CoMoEConfig(target_modules=["mlp"], r=4, init_weights=False,
                                                            use_dora=use_dora))
    model.add_adapter("second", CoMoEConfig(target_modules=["mlp"], r=2, num_experts=3, top_k=1,
                                            contrastive_loss_coef=0.0, init_weights=False, use_dora=use_dora))
    block = model.base_model.model.model.layers[0].mlp
    assert set(block.comoe_magnitude_out) == ({"default", "second"} if use_dora else set())
    model.eval()
    with torch.no_grad():
        first = model(**batch).logits
        assert not torch.allclose(first, expected)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)
        model.set_adapter("second")
        second = model(**batch).logits
        assert not torch.allclose(second, first)
        mixed = model(**batch, adapter_names=["second", "__base__"]).logits
        torch.testing.assert_close(mixed[0], second[0])
        torch.testing.assert_close(mixed[1], expected[1])
        model.set_adapter("default")
        mixed = model(**batch, adapter_names=["__base__", "default"]).logits
        torch.testing.assert_close(mixed[0], expected[0])
        torch.testing.assert_close(mixed[1], first[1])
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    model.delete_adapter("second")
    assert set(block.comoe_A) == set(block.comoe_router) == {"default"}
    assert set(block.comoe_magnitude) == set(block.comoe_magnitude_out) == ({"default"} if use_dora else set())
    block.update_layer("default", r=4, lora_alpha=8, lora_dropout=0.0, settings=block.comoe_settings["default"])
    assert not block.comoe_magnitude and not block.comoe_magnitude_out  # re-created without DoRA
    unloaded = model.unload()
    assert type(unloaded.model.layers[0].mlp).__name__ == "LlamaMLP"
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batch).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_rank_alpha_and_expert_patterns_apply_to_blocks(use_dora):
    config = CoMoEConfig(target_modules=["mlp"], r=4, num_experts=4, rank_pattern={"layers.0.mlp": 2},
                         alpha_pattern={"layers.1.mlp": 2.0}, num_experts_pattern={"layers.1.mlp": 3},
                         use_dora=use_dora)
    model = get_peft_model(tiny_llama(), config)
    first, second = (model.base_model.model.model.layers[i].mlp for i in (0, 1))
    assert first.comoe_A["default"].shape == (2 * 4 * 2, 32) and first.comoe_A_out["default"].shape == (4 * 2, 64)
    assert second.comoe_router["default"].shape == (3, 32) and second.comoe_B["default"].shape == (2, 64, 3 * 4)
    assert second.scaling["default"] == 2.0 / 4
    if use_dora:  # (n, N, f) and (N, d), the experts' number from the pattern
        assert first.comoe_magnitude["default"].shape == (2, 4, 64)
        assert second.comoe_magnitude["default"].shape == (2, 3, 64)
        assert second.comoe_magnitude_out["default"].shape == (3, 32)
        scales = block_scales(second, "default")  # the pattern's alpha in the norms: still exactly 1 at init
        assert torch.equal(scales.output, torch.ones_like(scales.output))
    else:
        assert not first.comoe_magnitude and not first.comoe_magnitude_out


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_compiles_without_graph_breaks_and_matches_eager(mode, use_dora):
    block = make_block("llama", dtype=torch.float32, use_dora=use_dora)
    getattr(block, mode)()
    x = torch.randn(2, 5, block.in_features)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for module in (block, compiled):
        torch.manual_seed(0)
        x_in = x.clone().requires_grad_(True)
        out = module(x_in)
        loss = out.square().sum()
        if mode == "train":
            loss = loss + block.recorded_aux_losses("default")["contrastive"]
        results.append((out.detach(), torch.autograd.grad(loss, [x_in, *adapter_parameters(block).values()])))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gradient_checkpointing_gives_the_same_block_gradients(use_dora):
    batch = token_batch()
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_llama(), mixlora_config(contrastive_loss_coef=0.0, use_dora=use_dora))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(**batch, labels=batch["input_ids"])
        (out.loss + model.base_model.get_aux_loss({"balance": 0.01})).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m, n=name: f"{n}: {m}")


def test_the_block_is_an_nn_module_without_its_own_weight():
    block = make_block("llama")
    assert isinstance(block, nn.Module) and not hasattr(block.get_base_layer(), "weight")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_adapters_take_the_output_projections_device_and_dtype(use_dora):
    """A block has no weight of its own: its adapters follow its output projection, as a projection's follow its
    weight, with every peft this package supports (peft 0.18 would leave them float32 on a float64 model)."""
    model = get_peft_model(tiny_llama().to(torch.float64), CoMoEConfig(target_modules=["mlp"], r=2, num_experts=4,
                                                                       top_k=2, use_dora=use_dora))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    params = [p for block in blocks for name in block.adapter_layer_names for p in getattr(block, name).values()]
    assert blocks and len(params) == len(blocks) * (7 if use_dora else 5)
    assert all(p.dtype == torch.float64 for p in params)
