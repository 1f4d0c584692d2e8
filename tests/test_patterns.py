"""rank_pattern, alpha_pattern, num_experts_pattern and use_rslora: peft's key matching, per-layer shapes and scaling,
validation, losses with a different number of experts per layer, and exact round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from comoe_peft import CoMoEConfig, CoMoELayer
from comoe_peft.tuner.losses import load_balancing_loss, router_z_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# a suffix key, a full name (wins over the suffix key because it comes first) and a regex, as peft documents them
RANK_PATTERN = {"model.layers.1.self_attn.q_proj": 6, "q_proj": 2, r"layers\.0\.self_attn\.(k|v)_proj": 3}
ALPHA_PATTERN = {"o_proj": 5.0, r".*\.1\.self_attn\.k_proj": 7.0}
EXPERTS_PATTERN = {"v_proj": 6, "model.layers.0.self_attn.o_proj": 3}


def comoe_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, CoMoELayer)}


def comoe(model, **overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=TARGETS, init_weights=False,
                  rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, num_experts_pattern=EXPERTS_PATTERN)
    kwargs.update(overrides)
    return get_peft_model(model, CoMoEConfig(**kwargs))


def test_rank_and_alpha_patterns_match_the_modules_peft_lora_matches():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN))
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    layers = comoe_layers(comoe(tiny_llama()))
    assert set(layers) == set(lora_layers) and len(layers) == 8
    for name, layer in layers.items():
        assert layer.r["default"] == lora_layers[name].r["default"], name
        assert layer.lora_alpha["default"] == lora_layers[name].lora_alpha["default"], name
        assert layer.scaling["default"] == pytest.approx(lora_layers[name].scaling["default"]), name
    assert {layers[f"model.layers.{i}.self_attn.q_proj"].r["default"] for i in (0, 1)} == {2, 6}
    assert layers["model.layers.1.self_attn.k_proj"].lora_alpha["default"] == 7.0


def test_num_experts_pattern_sets_every_per_layer_shape():
    layers = comoe_layers(comoe(tiny_llama(), use_dora=True))
    for name, layer in layers.items():
        expected = 6 if name.endswith("v_proj") else 3 if name == "model.layers.0.self_attn.o_proj" else 4
        r = layer.r["default"]
        assert layer.comoe_settings["default"].num_experts == expected, name
        assert layer.comoe_A["default"].shape == (expected * r, layer.in_features)
        assert layer.comoe_B["default"].shape == (layer.out_features, expected * r)
        assert layer.comoe_router["default"].shape == (expected, layer.in_features)
        assert layer.comoe_magnitude["default"].shape == (expected, layer.out_features)


def test_rslora_scales_by_alpha_over_sqrt_r_with_each_layers_own_r_and_alpha():
    plain = comoe_layers(comoe(tiny_llama()))
    rs = comoe_layers(comoe(tiny_llama(), use_rslora=True))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
                                                   rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN))
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    for name, layer in rs.items():
        r, alpha = layer.r["default"], layer.lora_alpha["default"]
        assert layer.scaling["default"] == pytest.approx(alpha / math.sqrt(r)), name
        assert plain[name].scaling["default"] == pytest.approx(alpha / r), name
        assert layer.scaling["default"] == pytest.approx(lora_layers[name].scaling["default"]), name


def test_rslora_changes_the_output_by_the_scaling_ratio(batch):
    """With identical weights, rsLoRA's layer output minus the base is sqrt(r) times the plain one's."""
    plain = comoe(tiny_llama(), rank_pattern={}, alpha_pattern={}, num_experts_pattern={}, target_modules=["q_proj"])
    rs = comoe(tiny_llama(), rank_pattern={}, alpha_pattern={}, num_experts_pattern={}, target_modules=["q_proj"],
               use_rslora=True)
    rs.load_state_dict(plain.state_dict())
    layer_plain = plain.base_model.model.model.layers[0].self_attn.q_proj
    layer_rs = rs.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32)
    base = layer_plain.get_base_layer()(x)
    torch.testing.assert_close(layer_rs(x) - base, (layer_plain(x) - base) * math.sqrt(4), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank_pattern": {"q_proj": 0}}, r"CoMoEConfig\.rank_pattern entry 'q_proj' must be a positive integer"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern entry 'q_proj' must be a positive integer"),
        ({"alpha_pattern": {"q_proj": -1}}, r"CoMoEConfig\.alpha_pattern entry 'q_proj' must be positive"),
        ({"num_experts_pattern": {"v_proj": 1}}, r"num_experts_pattern entry 'v_proj' must be an integer >= 2"),
        ({"num_experts_pattern": {"v_proj": 2}, "top_k": 3, "contrastive_loss_coef": 0},
         r"num_experts_pattern gives the modules matching 'v_proj' 2 experts, fewer than top_k=3"),
        ({"num_experts_pattern": {"v_proj": 2}},
         r"num_experts_pattern gives the modules matching 'v_proj' 2 experts while contrastive_loss_coef > 0"),
        ({"num_experts_pattern": {"v_proj": 3}, "num_negatives": 2},
         r"num_experts_pattern gives the modules matching 'v_proj' 3 experts, so 1 inactive .* num_negatives=2"),
        ({"rank_pattern": ["q_proj"]}, r"CoMoEConfig\.rank_pattern must be a dict"),
    ],
)
def test_invalid_patterns_are_rejected_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoMoEConfig(**kwargs)


def test_contrastive_layers_defer_the_check_to_injection_and_name_the_module():
    config = CoMoEConfig(num_experts_pattern={"layers.0.self_attn.v_proj": 2}, contrastive_layers=[0],
                         layers_pattern="layers", target_modules=["q_proj", "v_proj"])  # the pattern alone is fine
    with pytest.raises(ValueError, match=r"num_experts_pattern gives module 'model\.layers\.0\.self_attn\.v_proj' 2 "
                                         r"experts while contrastive_loss_coef > 0"):
        get_peft_model(tiny_llama(), config)
    fine = CoMoEConfig(num_experts_pattern={"layers.1.self_attn.v_proj": 2}, contrastive_layers=[0],
                       layers_pattern="layers", target_modules=["q_proj", "v_proj"])
    layers = comoe_layers(get_peft_model(tiny_llama(), fine))  # layer 1 has no contrastive term: 2 experts are fine
    assert layers["model.layers.1.self_attn.v_proj"].comoe_settings["default"].num_experts == 2


def ours(config: dict) -> dict:
    """A config's fields without `base_model_name_or_path`: peft's `get_peft_model` (not CoMoE) writes the base model's
    name into the config it is given, for every method; a from-config model's is '' up to peft 0.20, None from 0.21."""
    return {k: v for k, v in config.items() if k != "base_model_name_or_path"}


def test_the_users_config_and_pattern_dicts_are_not_changed():
    pattern = {"v_proj": 6}
    config = CoMoEConfig(target_modules=TARGETS, num_experts_pattern=pattern, rank_pattern={"q_proj": 2})
    before = copy.deepcopy(config.to_dict())
    get_peft_model(tiny_llama(), config)
    assert ours(config.to_dict()) == ours(before) and pattern == {"v_proj": 6}
    assert config.num_experts_pattern is not pattern


def test_losses_are_per_layer_means_when_layers_have_different_numbers_of_experts(batch):
    model = comoe(tiny_llama(), use_dora=True, contrastive_loss_coef=0.1, router_aux_loss_coef=0.01)
    model.train()
    captured = {}

    def keep_logits(name):
        def hook(module, args, output):
            tokens = args[0].reshape(-1, module.in_features)
            captured[name] = tokens @ module.comoe_router["default"].t()  # (T, N) router logits, float32 model
        return hook

    layers = comoe_layers(model)
    handles = [layer.register_forward_hook(keep_logits(n)) for n, layer in layers.items()]
    model(**batch)
    for handle in handles:
        handle.remove()
    aux = model.base_model.get_aux_losses()
    assert set(aux) == {"contrastive", "balance", "z"} and all(torch.isfinite(v) for v in aux.values())
    mask = batch["attention_mask"].reshape(-1)
    balance = [load_balancing_loss(captured[n], 2, mask) for n in layers]
    z = [router_z_loss(captured[n], mask) for n in layers]
    torch.testing.assert_close(aux["balance"], torch.stack(balance).mean())
    torch.testing.assert_close(aux["z"], torch.stack(z).mean())
    contrastive = [layer.recorded_aux_losses("default")["contrastive"] for layer in layers.values()]
    torch.testing.assert_close(aux["contrastive"], torch.stack(contrastive).mean())
    sizes = {layer.comoe_settings["default"].num_experts for layer in layers.values()}
    assert sizes == {3, 4, 6}
    loads = model.base_model.get_routing_stats()
    assert {s.expert_load.shape[0] for s in loads.values()} == {3, 4, 6}
    (aux["contrastive"] + aux["balance"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_contrastive_loss_at_init_reflects_each_layers_negatives(batch):
    """At B = 0 all cosines are 0, so each layer's loss is log(1 + (N - k) + eps): the mean over layers says whether
    each layer used its own N."""
    model = comoe(tiny_llama(), init_weights=True, rank_pattern={}, alpha_pattern={})
    model.train()
    model(**batch)
    sizes = [layer.comoe_settings["default"].num_experts for layer in comoe_layers(model).values()]
    expected = sum(math.log(1 + (n - 2) + 1e-3) for n in sizes) / len(sizes)
    assert model.base_model.get_aux_losses()["contrastive"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_and_load_restore_every_per_layer_shape_and_keep_the_patterns(tmp_path, batch, use_dora):
    model = comoe(tiny_llama(), use_dora=use_dora, use_rslora=True)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    config = loaded.peft_config["default"]
    assert config.rank_pattern == RANK_PATTERN and config.alpha_pattern == ALPHA_PATTERN
    assert config.num_experts_pattern == EXPERTS_PATTERN and config.use_rslora and config.use_dora == use_dora
    original, restored = comoe_layers(model), comoe_layers(loaded)
    for name, layer in original.items():
        for attr in layer.adapter_layer_names:
            if "default" in getattr(layer, attr):
                assert torch.equal(getattr(restored[name], attr)["default"], getattr(layer, attr)["default"]), name
        assert restored[name].scaling == layer.scaling
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)


def test_patterns_work_with_disable_unload_and_a_second_adapter(batch):
    base = tiny_llama()
    reference = copy.deepcopy(base)(**batch).logits
    model = comoe(base, use_rslora=True)
    second = CoMoEConfig(target_modules=["v_proj"], num_experts_pattern={"layers.0.self_attn.v_proj": 5},
                         rank_pattern={"v_proj": 3}, init_weights=False)
    model.add_adapter("second", second)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert (layer.comoe_settings["default"].num_experts, layer.comoe_settings["second"].num_experts) == (6, 5)
    assert (layer.r["default"], layer.r["second"]) == (3, 3)
    model.set_adapter("second")
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, reference)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, reference)
        model.delete_adapter("second")
        torch.testing.assert_close(model.unload()(**batch).logits, reference)
