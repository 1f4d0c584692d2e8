"""One model with both transformers `Conv1D` and `torch.nn.Linear` targets: each layer takes its orientation from its
own type, `fan_in_fan_out` only warns when it disagrees (as in peft LoRA), and the user's config is never changed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_gpt2, token_batch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe_peft import CoMoEConfig, CoMoELayer

TARGETS = ["c_attn", "c_fc"]


def mixed_gpt2(seed: int = 0):
    """A tiny GPT-2 whose first block's MLP input projection is a `torch.nn.Linear` (32 -> 128), not a `Conv1D`."""
    model = tiny_gpt2(seed)
    torch.manual_seed(seed + 1)
    model.transformer.h[0].mlp.c_fc = nn.Linear(32, 128)
    return model.eval()


def mixed_config(**overrides) -> CoMoEConfig:
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=TARGETS, init_weights=False,
                  contrastive_loss_coef=0.1)
    kwargs.update(overrides)
    return CoMoEConfig(**kwargs)


def adapted_layers(model) -> dict[str, CoMoELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CoMoELayer)}


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_each_layer_takes_its_orientation_from_its_type():
    model = get_peft_model(mixed_gpt2(), mixed_config())
    layers = adapted_layers(model)
    assert len(layers) == 4
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert layer.fan_in_fan_out == isinstance(base, Conv1D), name
        assert (layer.in_features, layer.out_features) == ((32, 96) if "c_attn" in name else (32, 128)), name
    linear = layers["base_model.model.transformer.h.0.mlp.c_fc"]
    assert type(linear.get_base_layer()) is nn.Linear and linear.fan_in_fan_out is False
    assert layers["base_model.model.transformer.h.1.mlp.c_fc"].fan_in_fan_out is True


@pytest.mark.parametrize("fan_in_fan_out, disagreeing", [(False, "`Conv1D`"), (True, "`torch.nn.Linear`")])
def test_config_is_not_mutated_and_a_disagreeing_value_warns(fan_in_fan_out, disagreeing):
    config = mixed_config(fan_in_fan_out=fan_in_fan_out)
    before = copy.deepcopy(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(mixed_gpt2(), config)
    messages = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert messages and all(f"fan_in_fan_out is set to {fan_in_fan_out} but the target module is {disagreeing}" in m
                            for m in messages)
    expected_count = 3 if disagreeing == "`Conv1D`" else 1  # c_attn x 2 and h.1's c_fc are Conv1D; h.0's c_fc not
    assert len(messages) == expected_count
    # peft's get_peft_model (not CoMoE) writes the base model's name into the config it is given, for every method:
    # a from-config model's is '' up to peft 0.20, None from 0.21. Everything else is CoMoE's to keep.
    before.base_model_name_or_path = config.base_model_name_or_path
    assert config == before and config.fan_in_fan_out is fan_in_fan_out
    assert model.peft_config["default"] is config


def test_linear_after_conv1d_is_accepted():
    """The order that used to fail: the first targets are Conv1D (flipping the config), then an nn.Linear."""
    model = tiny_gpt2()
    model.transformer.h[1].attn.c_proj = nn.Linear(32, 32)
    peft_model = get_peft_model(model, mixed_config(target_modules=["c_attn", "c_proj"]))
    kinds = {name.split("transformer.")[1]: layer.fan_in_fan_out for name, layer in adapted_layers(peft_model).items()}
    assert kinds["h.1.attn.c_proj"] is False and kinds["h.0.attn.c_proj"] is True and kinds["h.1.attn.c_attn"] is True


def test_mixed_model_trains_and_round_trips_exactly(tmp_path):
    config = mixed_config()
    before = copy.deepcopy(config)
    model = get_peft_model(mixed_gpt2(), config)
    batch = token_batch()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    out = model(**batch, labels=batch["input_ids"])
    (out.loss + model.base_model.get_aux_loss()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["base_model.model.transformer.h.0.mlp.c_fc.comoe_A.default"].abs().sum() > 0  # the nn.Linear trains
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(initial, trainable))
    before.base_model_name_or_path = config.base_model_name_or_path  # written by peft's get_peft_model (see above)
    assert config == before

    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mixed_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    assert {n: l.fan_in_fan_out for n, l in adapted_layers(loaded).items()} == {
        n: l.fan_in_fan_out for n, l in adapted_layers(model).items()
    }
    with loaded.disable_adapter():
        torch.testing.assert_close(logits(loaded, batch), logits(mixed_gpt2(), batch))
    unloaded = loaded.unload()
    assert not adapted_layers(unloaded)
    torch.testing.assert_close(logits(unloaded, batch), logits(mixed_gpt2(), batch))


def test_second_adapter_on_mixed_layers():
    model = get_peft_model(mixed_gpt2(), mixed_config())
    batch = token_batch()
    first = logits(model, batch)
    other = mixed_config(r=2, num_experts=3, contrastive_loss_coef=0.0, target_modules=["c_fc"], fan_in_fan_out=True)
    before = copy.deepcopy(other)
    model.add_adapter("other", other)
    model.set_adapter("other")
    assert not torch.allclose(logits(model, batch), first)
    assert other == before
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first)
