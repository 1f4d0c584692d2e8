"""Every invalid CoMoEConfig is rejected with a message that names the field and the allowed values."""

from __future__ import annotations

import pytest
from peft import PeftType

from comoe_peft import CoMoEConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"CoMoEConfig\.r must be a positive integer"),
        ({"r": -2}, r"CoMoEConfig\.r must be a positive integer"),
        ({"lora_alpha": 0}, r"lora_alpha must be positive"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"num_experts": 1}, r"num_experts must be an integer >= 2"),
        ({"num_experts": 4, "top_k": 5}, r"top_k must be an integer in \[1, num_experts=4\]"),
        ({"top_k": 0}, r"top_k must be an integer in \[1"),
        ({"top_k": 1}, r"top_k must be >= 2 while contrastive_loss_coef > 0"),
        ({"num_experts": 4, "top_k": 4}, r"top_k must be < num_experts while contrastive_loss_coef > 0"),
        ({"contrastive_temperature": 0}, r"contrastive_temperature must be positive"),
        ({"contrastive_temperature": -1.0}, r"contrastive_temperature must be positive"),
        ({"contrastive_loss_coef": -0.1}, r"contrastive_loss_coef must be >= 0"),
        ({"router_aux_loss_coef": -1}, r"router_aux_loss_coef must be >= 0"),
        ({"router_z_loss_coef": -1}, r"router_z_loss_coef must be >= 0"),
        ({"num_experts": 6, "top_k": 2, "num_negatives": 5}, r"num_negatives must be None .* \[1, num_experts - top_k = 4\]"),
        ({"num_negatives": 0}, r"num_negatives must be None"),
        ({"anchor": "first"}, r"anchor must be one of \('random', 'all'\)"),
        ({"bias": "lora_only"}, r"bias must be one of \('none', 'all', 'comoe_only'\)"),
        ({"router_init_std": 0}, r"router_init_std must be positive"),
        ({"router_jitter_noise": 1.5}, r"router_jitter_noise must be in \[0, 1\)"),
        ({"contrastive_layers": [-1]}, r"contrastive_layers must be non-negative"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoMoEConfig(**kwargs)


def test_top1_and_all_experts_are_fine_without_the_contrastive_term():
    assert CoMoEConfig(top_k=1, contrastive_loss_coef=0).top_k == 1
    assert CoMoEConfig(num_experts=4, top_k=4, contrastive_loss_coef=0).top_k == 4


def test_defaults_follow_the_paper_and_the_design_notes():
    config = CoMoEConfig()
    assert config.peft_type == PeftType.COMOE
    assert (config.contrastive_loss_coef, config.contrastive_temperature, config.anchor) == (0.01, 0.1, "random")
    assert (config.router_aux_loss_coef, config.router_z_loss_coef, config.num_negatives) == (0.0, 0.0, None)
    assert (config.use_dora, config.use_rslora) == (False, False)
    assert config.rank_pattern == config.alpha_pattern == config.num_experts_pattern == {}


def test_round_trips_through_json(tmp_path):
    config = CoMoEConfig(r=4, num_experts=6, top_k=3, target_modules=["q_proj", "v_proj"], num_negatives=2,
                         contrastive_layers=[0, 2], anchor="all", use_dora=True, use_rslora=True,
                         rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\..*": 3.0},
                         num_experts_pattern={"q_proj": 8})
    config.save_pretrained(tmp_path)
    loaded = CoMoEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert (loaded.use_dora, loaded.use_rslora, loaded.num_experts_pattern) == (True, True, {"q_proj": 8})
    assert loaded.target_modules == {"q_proj", "v_proj"}
