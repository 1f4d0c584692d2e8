"""The properties peft's own suite checks for every tuner, held by CoMoE on tiny Llama and GPT-2 models."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from comoe_peft import CoMoEConfig, CoMoELayer

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def comoe(model, **overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS, init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(model, CoMoEConfig(**kwargs))


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batch, steps=8, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        loss = out.loss + model.base_model.get_aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("builder, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_trains_and_only_adapter_parameters_change(builder, targets, batch):
    model = comoe(builder(), target_modules=targets, init_weights=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".comoe_" in n for n in trainable)
    losses = train_steps(model, batch, steps=15)
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == (name in trainable) or ("comoe_router" in name and not changed), name


def test_gpt2_conv1d_layers_are_transposed_and_the_config_is_left_alone():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        model = comoe(tiny_gpt2(), target_modules=["c_attn"])
    assert model.peft_config["default"].fan_in_fan_out is False  # the user's value; each layer knows its own
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, CoMoELayer) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.fan_in_fan_out is True


def test_trainable_parameter_count_is_the_formula():
    model = comoe(tiny_llama(), target_modules=["q_proj", "v_proj"])
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer: q (32 -> 32) and v (32 -> 16): N*r*(d_in + d_out) + N*d_in
    per_layer = sum(4 * 4 * (32 + d_out) + 4 * 32 for d_out in (32, 16))
    assert trainable == 2 * per_layer


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_and_reload_give_identical_outputs(tmp_path, batch, safe_serialization):
    model = comoe(tiny_llama())
    train_steps(model, batch, steps=2)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    files = set(os.listdir(tmp_path))
    assert ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin") in files
    if safe_serialization:
        keys = load_file(tmp_path / "adapter_model.safetensors").keys()
        assert keys and all(".comoe_" in k for k in keys)
        assert not any(k.endswith(".default") for k in keys)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default


def test_disable_adapter_gives_the_base_model(batch):
    base = tiny_llama()
    reference = logits(copy.deepcopy(base), batch)
    model = comoe(base)
    assert not torch.allclose(logits(model, batch), reference)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), reference)
    assert not torch.allclose(logits(model, batch), reference)


def test_add_set_and_delete_adapters(batch):
    model = comoe(tiny_llama())
    first = logits(model, batch)
    model.add_adapter("other", CoMoEConfig(r=2, num_experts=3, top_k=2, target_modules=["q_proj"], init_weights=False))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, batch), first)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first)


def two_adapters(**other):
    """A tiny Llama with CoMoE adapters "default" and "other" (other on q_proj and v_proj only), in eval mode."""
    model = comoe(tiny_llama())
    model.add_adapter("other", CoMoEConfig(r=2, num_experts=3, top_k=2, target_modules=["q_proj", "v_proj"],
                                           init_weights=False, **other))
    return model.eval()


def rows_alone(model, batch, names):
    """Each row's logits with its adapter set (or the adapter disabled for "__base__"), one row at a time."""
    rows = []
    for i, name in enumerate(names):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(logits(model, one))
        else:
            model.set_adapter(name)
            rows.append(logits(model, one))
    model.set_adapter("default")
    return torch.cat(rows)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora-experts", "dora-experts"])
def test_mixed_adapter_batch_rows_equal_each_adapter_alone(use_dora):
    model = two_adapters(use_dora=use_dora)
    batch = token_batch(batch=5, pad_left=0)
    names = ["other", "default", "__base__", "other", "default"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
    torch.testing.assert_close(mixed, rows_alone(model, batch, names), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters really differ
    with torch.no_grad():  # the call leaves nothing behind: the next forward is the active adapter's again
        torch.testing.assert_close(model(**batch).logits, rows_alone(model, batch, ["default"] * 5), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_mixed_adapter_batches_equals_each_adapter_alone(num_beams):
    model = two_adapters()
    batch = token_batch(batch=3, pad_left=0)
    names = ["other", "__base__", "default"]
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(**batch, adapter_names=names, **settings)
        alone = []
        for i, name in enumerate(names):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model.generate(**one, **settings))
            else:
                model.set_adapter(name)
                alone.append(model.generate(**one, **settings))
    assert torch.equal(mixed, torch.cat(alone))


def test_mixed_adapter_batches_refuse_what_they_cannot_do(batch):
    model = two_adapters()
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(**batch, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="one name per row"):
        model(**batch, adapter_names=["default"])
    with pytest.raises(ValueError, match="record no routing statistics"), model.base_model.recording():
        model(**batch, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="activated LoRA offsets"):
        model(**batch, alora_offsets=[1, 1])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**batch, adapter_names=["default", "other"])


def test_unload_returns_the_untouched_base_model(batch):
    base = tiny_llama()
    reference = logits(copy.deepcopy(base), batch)
    model = comoe(base)
    unloaded = model.unload()
    assert not any(isinstance(m, CoMoELayer) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, batch), reference)


def test_merge_raises_and_names_the_alternative():
    model = comoe(tiny_llama())
    for call in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(NotImplementedError, match="cannot be merged.*unload"):
            call()


def test_generate_works(batch):
    model = comoe(tiny_llama())
    model.eval()
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_unsupported_layer_type_lists_the_supported_ones():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"Embedding, which CoMoE does not support.*torch.nn.modules.linear.Linear.*Conv1D"):
        get_peft_model(model, CoMoEConfig(target_modules=["embed_tokens"]))


def test_output_head_is_refused_with_an_explanation():
    with pytest.raises(ValueError, match="output head 'lm_head'.*modules_to_save"):
        get_peft_model(tiny_llama(), CoMoEConfig(target_modules=["q_proj", "lm_head"]))


def test_all_linear_adapts_every_linear_but_the_head():
    model = comoe(tiny_llama(), target_modules="all-linear")
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, CoMoELayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_trains_and_does_not_double_count(batch, use_reentrant):
    plain = comoe(tiny_llama(), contrastive_loss_coef=0.1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.base_model.model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    if use_reentrant:
        checkpointed.enable_input_require_grads()
    results = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(0)
        out = model(**batch, labels=batch["input_ids"])
        aux = model.base_model.get_aux_losses()
        (out.loss + model.base_model.get_aux_loss()).backward()
        after_backward = {k: v.item() for k, v in model.base_model.get_aux_losses().items()}
        results.append(({k: v.item() for k, v in aux.items()}, after_backward))
    for name in ("contrastive", "balance", "z"):
        assert results[1][0][name] == pytest.approx(results[0][0][name], rel=1e-5)
        assert results[1][1][name] == pytest.approx(results[0][0][name], rel=1e-5), "recomputation double counted"
    grads = [p.grad for n, p in checkpointed.named_parameters() if "comoe_A" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_padding_tokens_do_not_change_losses_or_statistics():
    model = comoe(tiny_llama(), contrastive_loss_coef=0.1)
    model.train()
    batch = token_batch(pad_left=4)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, :4] = torch.randint(1, 128, (4,))  # change only the padded positions
    results = []
    for b in (batch, other):
        torch.manual_seed(0)
        model(**b)
        aux = model.base_model.get_aux_losses()
        stats = model.base_model.get_routing_stats()
        load = torch.stack([s.expert_load for s in stats.values()])
        results.append((aux, load, next(iter(stats.values())).num_tokens))
    for name in ("contrastive", "balance", "z"):
        torch.testing.assert_close(results[0][0][name], results[1][0][name])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][2].item() == batch["attention_mask"].sum().item()


def test_the_attention_mask_reaches_the_layers_through_the_tuner_too():
    """`peft_model.base_model(...)` (the tuner's own forward, which LLaMA-Factory's trainer reaches) captures the
    mask like `peft_model(...)`: peft <= 0.20's BaseTuner.forward called `self.model.forward`, skipping the hook."""
    model = comoe(tiny_llama(), contrastive_loss_coef=0.1)
    model.train()
    batch = token_batch(pad_left=4)
    for call in (model, model.base_model):
        model.base_model.forward_context.new_forward(None)
        call(**batch)
        assert torch.equal(model.base_model.forward_context.attention_mask, batch["attention_mask"]), call


def test_losses_recorded_only_in_training_and_only_for_the_last_forward(batch):
    model = comoe(tiny_llama(), contrastive_layers=[1], layers_pattern="layers")
    model.train()
    model(**batch)
    assert set(model.base_model.get_aux_losses()) == {"contrastive", "balance", "z"}
    contrastive_layers = {
        n for n, m in model.named_modules() if isinstance(m, CoMoELayer) and "contrastive" in m.recorded_aux_losses("default")
    }
    assert contrastive_layers and all(".layers.1." in n for n in contrastive_layers)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert model.base_model.get_aux_losses() == {}
    assert model.base_model.get_aux_loss() is None
    assert model.base_model.get_routing_stats() == {}, "the lean eval path records nothing"
    with torch.no_grad(), model.base_model.recording():
        model(**batch)
    stats = model.base_model.get_routing_stats()
    assert len(stats) == 8 and all(abs(s.expert_load.sum().item() - 1) < 1e-5 for s in stats.values())


def test_bf16_model_is_finite_at_initialisation(batch):
    model = comoe(tiny_llama().to(torch.bfloat16), init_weights=True, contrastive_loss_coef=0.1)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    aux = model.base_model.get_aux_losses()
    total = out.loss + model.base_model.get_aux_loss()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in aux.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.comoe_A["default"].dtype == torch.float32


def test_aux_loss_weighting_lives_in_the_tuner_and_takes_overrides(batch):
    model = comoe(tiny_llama(), contrastive_loss_coef=0.1, router_aux_loss_coef=0.02, router_z_loss_coef=0.003)
    model.train()
    model(**batch)
    losses, tuner = model.base_model.get_aux_losses(), model.base_model
    expected = 0.1 * losses["contrastive"] + 0.02 * losses["balance"] + 0.003 * losses["z"]
    torch.testing.assert_close(tuner.get_aux_loss(), expected)
    overridden = tuner.get_aux_loss({"contrastive": 0.0, "balance": None, "z": 1.0})  # None keeps the config's
    torch.testing.assert_close(overridden, 0.02 * losses["balance"] + 1.0 * losses["z"])
    assert tuner.get_aux_loss({"contrastive": 0.0, "balance": 0.0, "z": 0.0}) is None
    assert tuner.aux_loss_coefficients("default", {"z": 0.5}) == {"contrastive": 0.1, "balance": 0.02, "z": 0.5}
