"""The axolotl plugin (`comoe_peft.integrations.axolotl.CoMoEPlugin`): axolotl 0.19 reads the YAML of
docs/integrations.md, builds the CoMoE model, trains it two steps on the CPU with the auxiliary losses (gradient-
accumulation-correct, `comoe/*` metrics logged) and saves an adapter that stock peft loads after `import comoe_peft`.

Runs where axolotl is installed (CI's axolotl venv: `pip install -e ".[axolotl]"`); skipped elsewhere. The training
run is one subprocess through axolotl's own Python entry points (`load_cfg`, `load_datasets`, `train`: what
`axolotl train` calls), with a tiny Llama and a JSONL file made here; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("axolotl")

import torch  # noqa: E402
import yaml  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

from conftest import tiny_tokenizer  # noqa: E402

from comoe_peft.integrations.axolotl import (  # noqa: E402
    COMOE_FIELDS,
    CoMoEPlugin,
    check_axolotl_config,
    comoe_config,
)
from comoe_peft.training.trainer import CoMoETrainerMixin  # noqa: E402
from comoe_peft.tuner.registration import LOADING_NOTE_MARKER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "integrations.md"
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "WANDB_MODE": "disabled",
}
PROBE = [[5, 17, 33, 9, 41, 2, 28, 11]]  # token ids whose logits the trained and the reloaded model must agree on


def docs_yaml() -> dict:
    """The ```yaml title="comoe.yml" block of docs/integrations.md."""
    text = DOCS_PAGE.read_text(encoding="utf-8")
    block = re.search(r'```yaml title="comoe.yml"\n(.*?)```', text, flags=re.DOTALL)
    assert block, "docs/integrations.md has no ```yaml title=\"comoe.yml\" block"
    return yaml.safe_load(block.group(1))


RUNNER = r'''
import json, sys
import torch
from axolotl.cli.args import TrainerCliArgs
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets
from axolotl.train import train

import comoe_peft
from comoe_peft.training.trainer import CoMoETrainerMixin
from comoe_peft.tuner.layer import CoMoELayer

def main():  # under the __main__ guard: datasets' worker processes re-import this file
    config_path, bad_config_path, report_path, logits_path = sys.argv[1:]
    report = {}

    # a bad value in the comoe: block stops axolotl's config validation with CoMoEConfig's message
    try:
        load_cfg(bad_config_path)
        report["bad_config_error"] = None
    except Exception as error:  # pydantic's ValidationError, as axolotl raises it
        report["bad_config_error"] = str(error)

    cfg = load_cfg(config_path)
    dataset_meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    model, tokenizer, trainer = train(cfg=cfg, dataset_meta=dataset_meta)

    report["trainer_mro"] = [cls.__name__ for cls in type(trainer).__mro__]
    report["comoe_layers"] = sum(isinstance(module, CoMoELayer) for module in model.modules())
    report["log_history"] = trainer.state.log_history
    report["router_lr_multiplier"] = trainer.args.comoe_router_lr_multiplier
    report["router_groups"] = sum(bool(group.get("comoe_router")) for group in trainer.optimizer.param_groups)

    # the loss of one micro-batch: the task loss of axolotl's trainer plus the weighted auxiliary losses / GA steps
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {key: value.to(trainer.args.device) for key, value in batch.items()}
    num_items = (batch["labels"][..., 1:] != -100).sum()
    model.train()
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        aux = trainer.comoe_model.get_aux_loss(trainer._comoe_overrides())
        task = super(CoMoETrainerMixin, trainer).compute_loss(model, dict(batch), num_items_in_batch=num_items)
    report["loss"] = {"total": total.item(), "task": task.item(), "aux": aux.item(),
                      "steps": trainer.current_gradient_accumulation_steps}

    model.eval()
    with torch.no_grad():
        ids = torch.tensor(PROBE)
        torch.save(model(input_ids=ids.to(trainer.args.device)).logits.cpu(), logits_path)
    json.dump(report, open(report_path, "w"), default=str)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def axolotl_run(tmp_path_factory):
    """Train with the docs' YAML (a tiny local Llama and JSONL data in place of base_model and datasets)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("axolotl")
    model_dir = folder / "model"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"instruction": f"what is {a} plus {a + 3}?", "input": "", "output": str(2 * a + 3)} for a in range(32)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    cfg = docs_yaml()
    cfg.update(
        base_model=str(model_dir),
        tokenizer_type="AutoTokenizer",
        datasets=[{"path": str(folder / "data.jsonl"), "ds_type": "json", "type": "alpaca"}],
        dataset_prepared_path=str(folder / "prepared"),
        output_dir=str(folder / "out"),
        sequence_len=128,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.01,
        lr_scheduler="constant",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        fp16=False,
        tf32=False,
        use_cpu=True,
        dataset_num_proc=1,
        comoe_router_lr_multiplier=2.0,  # a trainer field: reaches the trainer's arguments and the optimizer
    )
    cfg["comoe"] = {**cfg["comoe"], "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001}
    (folder / "comoe.yml").write_text(yaml.safe_dump(cfg))
    bad = {**cfg, "comoe": {**cfg["comoe"], "top_k": 9}}
    (folder / "bad.yml").write_text(yaml.safe_dump(bad))
    (folder / "runner.py").write_text(f"PROBE = {PROBE!r}\n" + RUNNER)

    env = dict(os.environ, **ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "runner.py", "comoe.yml", "bad.yml", "report.json", "logits.pt"]
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((folder / "report.json").read_text())
    return folder, cfg, report


def test_axolotl_builds_the_comoe_model_and_uses_the_comoe_trainer(axolotl_run):
    _, cfg, report = axolotl_run
    layers, target_modules = 2, cfg["lora_target_modules"]
    assert report["comoe_layers"] == layers * len(target_modules)
    assert report["trainer_mro"][:3] == ["CoMoEAxolotlTrainer", "CoMoETrainerMixin", "AxolotlTrainer"]


def test_the_loss_includes_the_auxiliary_losses_divided_by_the_accumulation_steps(axolotl_run):
    loss = axolotl_run[2]["loss"]
    assert loss["steps"] == 2 and loss["aux"] > 0
    assert loss["total"] == pytest.approx(loss["task"] + loss["aux"] / loss["steps"], rel=1e-5, abs=1e-6)


def test_comoe_metrics_are_logged_each_step(axolotl_run):
    steps = [entry for entry in axolotl_run[2]["log_history"] if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        for name in ("contrastive", "balance", "z", "routing_entropy", "expert_load_cv", "infonce_bound"):
            assert f"comoe/{name}" in entry, (name, entry)


def test_trainer_fields_reach_the_trainer(axolotl_run):
    report = axolotl_run[2]
    assert report["router_lr_multiplier"] == 2.0
    assert report["router_groups"] >= 1  # the routers have their own optimizer group at 2 x the learning rate


def test_a_bad_comoe_value_stops_axolotl_with_one_clear_line(axolotl_run):
    error = axolotl_run[2]["bad_config_error"]
    assert error is not None
    assert "CoMoEConfig.top_k must be an integer in [1, num_experts=4], got 9." in error


def test_the_saved_adapter_loads_with_stock_peft_and_gives_the_same_outputs(axolotl_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, cfg, _ = axolotl_run
    out = folder / "out"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "COMOE"
    assert (saved["num_experts"], saved["top_k"], saved["r"]) == (
        cfg["comoe"]["num_experts"], cfg["comoe"]["top_k"], cfg["lora_r"])
    assert set(saved["target_modules"]) == set(cfg["lora_target_modules"])
    assert (out / "adapter_model.safetensors").is_file()
    assert LOADING_NOTE_MARKER in (out / "README.md").read_text()  # the loading note, after axolotl's card

    base = AutoModelForCausalLM.from_pretrained(folder / "model")
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        logits = loaded(input_ids=ids).logits
    trained = torch.load(folder / "logits.pt")
    torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-5)
    assert (trained - base_logits).abs().max() > 1e-6  # the adapter trained: not the identity


def test_lora_model_dir_loads_the_saved_adapter_to_train_on(axolotl_run):
    from transformers import AutoModelForCausalLM

    folder, cfg, _ = axolotl_run
    base = AutoModelForCausalLM.from_pretrained(folder / "model")
    model, config = CoMoEPlugin().load_adapter(base, DictDefault({**cfg, "lora_model_dir": str(folder / "out")}))
    assert config.peft_type == "COMOE" and config.num_experts == cfg["comoe"]["num_experts"]
    routers = [p for name, p in model.named_parameters() if "comoe_router" in name]
    assert routers and all(p.requires_grad for p in routers)  # is_trainable: training goes on from the adapter
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(PROBE)).logits
    torch.testing.assert_close(logits, torch.load(folder / "logits.pt"), rtol=1e-5, atol=1e-5)


def test_the_trainer_class_is_made_once_and_pickles_by_name():
    import pickle

    from transformers import Trainer

    cfg = DictDefault(adapter="comoe", trainer_cls="transformers.Trainer")
    made = CoMoEPlugin().get_trainer_cls(cfg)
    assert CoMoEPlugin().get_trainer_cls(cfg) is made and made.__name__ == "CoMoETrainer"
    assert pickle.loads(pickle.dumps(made)) is made and issubclass(made, Trainer)


# ---------------------------------------------------------------------------------------------- the YAML, unit by unit


def test_the_comoe_block_takes_comoe_config_fields_and_lora_keys_fill_in():
    config = comoe_config(DictDefault(
        adapter="comoe", lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
        comoe={"num_experts": 8, "top_k": 2, "r": 4, "num_experts_pattern": {"layers.0.self_attn.q_proj": 4}},
    ))
    assert (config.r, config.lora_alpha, config.num_experts, config.top_k) == (4, 32, 8, 2)  # the block wins
    assert config.target_modules == {"q_proj", "v_proj"} and config.task_type == "CAUSAL_LM"
    assert config.num_experts_pattern == {"layers.0.self_attn.q_proj": 4}
    assert type(config.num_experts_pattern) is dict
    assert comoe_config(DictDefault(adapter="comoe", lora_target_linear=True)).target_modules == "all-linear"


@pytest.mark.parametrize(("cfg", "message"), [
    ({"adapter": "comoe", "comoe": {"num_expert": 4}},
     "comoe.num_expert is not a CoMoEConfig field; the comoe: block takes: r, lora_alpha"),
    ({"adapter": "comoe", "comoe": {"top_k": 1}}, "CoMoEConfig.top_k must be >= 2 while contrastive_loss_coef > 0"),
    ({"adapter": "lora", "comoe": {"top_k": 2}}, "comoe: is set but adapter is 'lora'; set adapter: comoe"),
    ({"adapter": "comoe", "rl": "dpo"},
     "adapter: comoe trains with supervised fine-tuning only; remove rl (got rl: 'dpo')."),
    ({"adapter": "comoe", "load_in_4bit": True},
     "adapter: comoe takes a full-precision base in axolotl; remove load_in_4bit"),
    ({"adapter": "comoe", "merge_lora": True},
     "routed experts cannot be merged into the base weights; remove merge_lora"),
])
def test_what_the_plugin_cannot_train_is_one_clear_line(cfg, message):
    with pytest.raises(ValueError) as error:
        check_axolotl_config(DictDefault(cfg))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_axolotl_enums_read_as_written():
    from axolotl.utils.schemas.enums import RLType

    with pytest.raises(ValueError, match=r"remove rl \(got rl: 'dpo'\)\.$"):
        check_axolotl_config(DictDefault(adapter="comoe", rl=RLType.DPO))


@pytest.mark.parametrize("field", ["comoe_router_lr_multiplier", "comoe_contrastive_loss_coef"])
def test_trainer_fields_are_checked_with_the_yaml(field):
    from pydantic import ValidationError

    from comoe_peft.integrations.axolotl import CoMoEArgs

    with pytest.raises(ValidationError, match=field):
        CoMoEArgs(**{field: -1.0})
    assert getattr(CoMoEArgs(**{field: 0.5}), field) == 0.5


def test_other_adapters_are_left_to_axolotl():
    plugin = CoMoEPlugin()
    lora = DictDefault(adapter="lora", lora_r=8)
    assert check_axolotl_config(lora) is None
    assert plugin.load_adapter(None, lora) is None
    assert plugin.get_trainer_cls(lora) is None and plugin.get_training_args(lora) is None
    assert [c.name for c in plugin.get_adapter_capabilities()] == ["comoe"]


def test_a_custom_trainer_cls_gets_the_comoe_mixin_in_front():
    from transformers import Trainer

    trainer_cls = CoMoEPlugin().get_trainer_cls(DictDefault(adapter="comoe", trainer_cls="transformers.Trainer"))
    assert trainer_cls.__mro__[1:3] == (CoMoETrainerMixin, Trainer)


def test_config_only_returns_the_config_without_touching_the_model():
    model, config = CoMoEPlugin().load_adapter(None, DictDefault(adapter="comoe", comoe={"num_experts": 6}),
                                               config_only=True)
    assert model is None and config.num_experts == 6


def test_the_docs_list_only_real_fields():
    text = DOCS_PAGE.read_text(encoding="utf-8")
    fields_section = text.split("### The fields", 1)[1].split("## What it does", 1)[0]
    block_fields = re.findall(r"`([a-z_]+)`", fields_section.split("Beside the block", 1)[0])
    unknown = {name for name in block_fields if name not in COMOE_FIELDS and not name.startswith("lora_")
               and name not in ("comoe", "true")}
    assert not unknown, f"docs/integrations.md names fields CoMoEConfig lacks: {sorted(unknown)}"
