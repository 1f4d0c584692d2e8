"""CoMoESFTTrainer (TRL, trl >= 1.9): auxiliary losses, accumulation, metrics, checkpoints, refusals.

The plain transformers.Trainer path, which needs no trl: tests/test_transformers_trainer.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import multitask_rows, tiny_llama, tiny_tokenizer
from datasets import Dataset
from peft import PeftModel, get_peft_model

from comoe_peft import CoMoEConfig
from comoe_peft.training.callbacks import HISTORY_FILENAME
from comoe_peft.training.sft import CoMoESFTConfig, CoMoESFTTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def comoe_config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=TARGETS)
    kwargs.update(overrides)
    return CoMoEConfig(**kwargs)


def sft_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=64,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return CoMoESFTConfig(**kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(multitask_rows())


def base_model(tokenizer):
    return tiny_llama(vocab=len(tokenizer))


def history_values(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_sft_run_logs_metrics_the_contrastive_loss_falls_and_load_history_is_written(tmp_path, tokenizer, dataset):
    args = sft_args(tmp_path, max_steps=30, learning_rate=1e-2, comoe_contrastive_loss_coef=1.0,
                    gradient_checkpointing=True)
    trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=comoe_config(init_weights=False))
    trainer.train()
    for key in ("contrastive", "balance", "z", "routing_entropy", "expert_load_cv", "infonce_bound"):
        assert len(history_values(trainer, f"comoe/{key}")) == 30, key
    contrastive = history_values(trainer, "comoe/contrastive")
    assert sum(contrastive[-5:]) / 5 < sum(contrastive[:5]) / 5 - 0.05
    bound = history_values(trainer, "comoe/infonce_bound")
    assert bound[0] == pytest.approx(torch.log(torch.tensor(2.0)).item() - contrastive[0], abs=1e-5)
    history = json.loads((tmp_path / "run" / HISTORY_FILENAME).read_text())
    assert history["num_experts"] == 4 and len(history["history"]) == 30
    loads = history["history"][-1]["expert_load"]
    assert len(loads) == 8 and all(abs(sum(v) - 1) < 1e-5 for v in loads.values())


def test_dora_experts_with_a_different_number_of_experts_per_layer_train_and_log(tmp_path, tokenizer, dataset):
    config = comoe_config(use_dora=True, num_experts_pattern={"v_proj": 6, "o_proj": 3}, init_weights=False)
    trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path, max_steps=2),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=config)
    trainer.train()
    contrastive = history_values(trainer, "comoe/contrastive")
    bound = history_values(trainer, "comoe/infonce_bound")
    cv = history_values(trainer, "comoe/expert_load_cv")
    assert len(contrastive) == len(bound) == len(cv) == 2 and all(math.isfinite(v) for v in contrastive + cv)
    mean_log_negatives = (2 * math.log(2) + math.log(4) + math.log(1)) / 4  # q, k: N=4; v: N=6; o: N=3 (k=2)
    assert bound[0] == pytest.approx(mean_log_negatives - contrastive[0], abs=1e-5)
    history = json.loads((tmp_path / "run" / HISTORY_FILENAME).read_text())
    assert history["num_experts"] is None
    assert {len(v) for v in history["history"][-1]["expert_load"].values()} == {3, 4, 6}


def test_both_construction_paths_train(tmp_path, tokenizer, dataset):
    wrapped = get_peft_model(base_model(tokenizer), comoe_config())
    for name, kwargs in [("config", dict(model=base_model(tokenizer), peft_config=comoe_config())),
                         ("wrapped", dict(model=wrapped))]:
        trainer = CoMoESFTTrainer(args=sft_args(tmp_path / name, max_steps=2), train_dataset=dataset,
                                  processing_class=tokenizer, **kwargs)
        trainer.train()
        assert history_values(trainer, "comoe/contrastive"), name
        assert isinstance(trainer.model, PeftModel)


def test_coefficients_come_from_the_config_and_can_be_overridden(tmp_path, tokenizer, dataset):
    trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path, comoe_router_z_loss_coef=0.5),
                              train_dataset=dataset, processing_class=tokenizer,
                              peft_config=comoe_config(contrastive_loss_coef=0.2))
    assert trainer.comoe_loss_coefficients() == {"contrastive": 0.2, "balance": 0.0, "z": 0.5}


def test_gradient_accumulation_gives_the_same_gradient(tmp_path, tokenizer):
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(2, len(tokenizer), (16,), generator=generator).tolist()} for _ in range(8)]
    data = Dataset.from_list(rows)
    params = {}
    for name, batch, accumulation in [("big", 8, 1), ("accumulated", 4, 2)]:
        args = sft_args(tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                        max_grad_norm=0.0, comoe_contrastive_loss_coef=0.5, comoe_router_z_loss_coef=0.1)
        config = comoe_config(anchor="all", init_weights=False)  # deterministic anchors
        trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=args, train_dataset=data,
                                  processing_class=tokenizer, peft_config=config)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        params[name] = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters() if n in before}
    for key, update in params["big"].items():
        assert update.abs().sum() > 0, key
        torch.testing.assert_close(params["accumulated"][key], update, rtol=1e-4, atol=1e-6, msg=key)


def test_resume_from_checkpoint_gives_the_same_losses(tmp_path, tokenizer, dataset):
    def run(output_dir, resume=None):
        args = sft_args(output_dir, max_steps=6, save_strategy="steps", save_steps=3, output_dir=str(output_dir),
                        per_device_train_batch_size=4)
        trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=args, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=comoe_config())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {e["step"]: (e["loss"], e["comoe/contrastive"]) for e in trainer.state.log_history
                         if "loss" in e}

    _, full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / HISTORY_FILENAME).is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed_trainer, resumed = run(tmp_path / "full", resume=str(checkpoint))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    history = json.loads((tmp_path / "full" / HISTORY_FILENAME).read_text())["history"]
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5, 6]
    reloaded = PeftModel.from_pretrained(base_model(tokenizer), str(tmp_path / "full" / "checkpoint-6"))
    assert reloaded.peft_config["default"].num_experts == 4
    card = (tmp_path / "full" / "checkpoint-6" / "README.md").read_text()
    assert card.count("import comoe_peft") == 1 and card.startswith("---")


def test_router_lr_multiplier_gives_the_routers_their_own_param_groups(tmp_path, tokenizer, dataset):
    trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path, comoe_router_lr_multiplier=10.0,
                                                                         max_steps=2, warmup_steps=1),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=comoe_config())
    routers = {id(w) for m in trainer.model.modules() for w in getattr(m, "comoe_router", {}).values()}
    assert routers
    trainer.train()
    groups = trainer.optimizer.param_groups
    router_groups = [g for g in groups if g.get("comoe_router")]
    others = [g for g in groups if not g.get("comoe_router") and g["params"]]
    assert {id(p) for g in router_groups for p in g["params"]} == routers
    assert not any(id(p) in routers for g in others for p in g["params"])
    assert router_groups[0]["initial_lr"] == pytest.approx(10 * others[0]["initial_lr"])  # under the same schedule
    assert router_groups[0]["lr"] == pytest.approx(10 * others[0]["lr"])
    with pytest.raises(ValueError, match="comoe_router_lr_multiplier must be positive"):
        CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path, comoe_router_lr_multiplier=0.0),
                        train_dataset=dataset, processing_class=tokenizer, peft_config=comoe_config())


@pytest.mark.parametrize("use_cache", [False, True])
def test_padding_free_batches_equal_padded_ones_only_without_a_cache(tokenizer, use_cache):
    """Padded and padding-free batches give the same logits and CoMoE losses when the model builds no KV cache:
    transformers then reads the sequence boundaries from position_ids. With a cache (use_cache=True, the config's
    default, even in training) it does not, and the examples of a row attend to each other; so `jobs` turns the
    cache off for `--padding-free`."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = get_peft_model(base_model(tokenizer), comoe_config(contrastive_loss_coef=0.1)).eval()
    rows = [{"input_ids": tokenizer(text)["input_ids"]} for text in
            ["hello world this is a longer text", "short one", "a sentence of medium length"]]
    outputs = {}
    for padding_free in (False, True):
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id or 0, padding_free=padding_free)
        batch = collator(rows)
        with torch.no_grad(), model.base_model.recording():
            out = model(**batch, use_cache=use_cache)
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        outputs[padding_free] = (out.logits[mask], {k: v.item() for k, v in model.base_model.get_aux_losses().items()})
    (padded_logits, padded_losses), (free_logits, free_losses) = outputs[False], outputs[True]
    same = torch.allclose(free_logits, padded_logits, atol=1e-5)
    assert same == (not use_cache)
    if not use_cache:
        for name in ("z", "balance", "contrastive"):
            assert free_losses[name] == pytest.approx(padded_losses[name], rel=1e-5), name


def test_reentrant_gradient_checkpointing_is_refused(tmp_path, tokenizer, dataset):
    args = sft_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="Reentrant gradient checkpointing.*use_reentrant': False"):
        CoMoESFTTrainer(model=base_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer,
                        peft_config=comoe_config())


def test_a_model_without_a_comoe_adapter_is_refused(tmp_path, tokenizer, dataset):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="needs a model with a CoMoE adapter"):
        CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path), train_dataset=dataset,
                        processing_class=tokenizer, peft_config=LoraConfig(target_modules=["q_proj"]))


def test_eval_mode_metrics(tmp_path, tokenizer, dataset):
    trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path, per_device_eval_batch_size=8),
                              train_dataset=dataset, eval_dataset=dataset.select(range(16)),
                              processing_class=tokenizer, peft_config=comoe_config(init_weights=False))
    metrics = trainer.evaluate()
    for key in ("contrastive", "balance", "z", "routing_entropy", "expert_load_cv", "infonce_bound"):
        assert f"eval_comoe/{key}" in metrics, key
    assert not trainer.comoe_model.forward_context.record_in_eval
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(input_ids=torch.tensor([[3, 4, 5]]))
    assert trainer.comoe_model.get_aux_losses() == {}


def test_mixlora_layout_trains_logs_and_saves_an_adapter_that_reloads(tmp_path, tokenizer, dataset):
    """Per-linear experts on attention beside FFN-block experts on the MLP (MixLoRA's layout): the trainer adds the
    block routers to their own parameter group, logs comoe/* from both kinds of layer, and saves a stock peft
    adapter that reloads to the same outputs."""
    config = comoe_config(target_modules=["q_proj", "v_proj", "mlp"], init_weights=False, router_aux_loss_coef=0.001)
    trainer = CoMoESFTTrainer(model=base_model(tokenizer), args=sft_args(tmp_path, max_steps=3,
                                                                         comoe_router_lr_multiplier=2.0),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=config)
    block_routers = {id(m.comoe_router["default"]) for m in trainer.model.modules() if type(m).__name__ == "Block"}
    assert len(block_routers) == 2
    trainer.train()
    router_params = {id(p) for g in trainer.optimizer.param_groups if g.get("comoe_router") for p in g["params"]}
    assert block_routers <= router_params
    for key in ("contrastive", "balance", "z", "routing_entropy"):
        values = history_values(trainer, f"comoe/{key}")
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
    history = json.loads((tmp_path / "run" / HISTORY_FILENAME).read_text())
    assert "model.layers.0.mlp" in history["history"][-1]["expert_load"]
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = tokenizer(["question: what is 2 plus 2? answer: 4"], return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
        reloaded = PeftModel.from_pretrained(base_model(tokenizer), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(**batch).logits, expected)
