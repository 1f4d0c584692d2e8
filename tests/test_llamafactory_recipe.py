"""The LLaMA-Factory recipe (comoe_peft.integrations.llamafactory, docs/llama-factory.md): LLaMA-Factory's own SFT
run trains a CoMoE adapter with the auxiliary losses, and saves an adapter that stock peft loads.

Runs only where llamafactory is installed (its own CI venv, with LLaMA-Factory's version pins); a tiny Llama and
tokenizer built here, a tiny local dataset registered in a dataset_info.json, nothing downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("llamafactory")

import torch
from conftest import multitask_rows, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from comoe_peft import CoMoELayer
from comoe_peft.integrations.llamafactory import RecipeError, comoe_seq2seq_trainer, prepare_args, run_exp

COMOE = {"num_experts": 4, "top_k": 2, "r": 4, "target_modules": ["q_proj", "v_proj"], "contrastive_loss_coef": 0.5,
         "router_aux_loss_coef": 0.1, "router_z_loss_coef": 0.01}
ZERO_COEFS = {"contrastive_loss_coef": 0.0, "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama and tokenizer saved to a folder, and a dataset folder LLaMA-Factory reads (alpaca format)."""
    root = tmp_path_factory.mktemp("lf")
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    rows = [{"instruction": r["prompt"], "input": "", "output": r["completion"].strip()} for r in multitask_rows(4)]
    (data / "tiny.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return root


def lf_args(workspace, output_dir, **overrides):
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": str(workspace / "model"),
        "dataset": "tiny", "dataset_dir": str(workspace / "data"), "template": "default", "cutoff_len": 64,
        "output_dir": str(output_dir), "overwrite_output_dir": True, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "max_steps": 3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_reentrant_gc": False, "preprocessing_num_workers": None,
        "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 7, "comoe": dict(COMOE),
    }
    args.update(overrides)
    return args


class KeepModel(TrainerCallback):
    """Holds the model that LLaMA-Factory trains, for the checks after the run."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


def log_history(output_dir) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def trained(workspace):
    output_dir = workspace / "run"
    keep = KeepModel()
    run_exp(lf_args(workspace, output_dir), callbacks=[keep])
    return output_dir, keep.model


def test_llamafactory_trains_comoe_layers(trained):
    output_dir, model = trained
    layers = [name for name, module in model.named_modules() if isinstance(module, CoMoELayer)]
    assert len(layers) == 4, layers  # q_proj and v_proj in both layers of the tiny Llama
    init = load_file(output_dir / "comoe_init" / "adapter_model.safetensors")
    final = load_file(output_dir / "adapter_model.safetensors")
    assert init.keys() == final.keys() and any("comoe_router" in key for key in final)
    changed = [key for key in final if not torch.equal(init[key], final[key])]
    assert any("comoe_router" in key for key in changed) and any("comoe_B" in key for key in changed), changed


def test_auxiliary_losses_are_logged_and_enter_the_loss(workspace, trained):
    output_dir, _ = trained
    steps = [entry for entry in log_history(output_dir) if "loss" in entry]
    assert len(steps) == 3
    for name in ("contrastive", "balance", "z", "routing_entropy", "expert_load_cv", "infonce_bound"):
        assert all(f"comoe/{name}" in entry for entry in steps), name
    # The same run with every coefficient 0 (same seed: same fresh adapter, same batches) logs the task loss
    # alone at step 1; the difference is the weighted sum of the auxiliary losses logged at step 1.
    plain_dir = workspace / "run-plain"
    run_exp(lf_args(workspace, plain_dir, max_steps=1, comoe=COMOE | ZERO_COEFS))
    init, plain_init = (load_file(d / "comoe_init" / "adapter_model.safetensors") for d in (output_dir, plain_dir))
    assert all(torch.equal(init[key], plain_init[key]) for key in init)
    first, plain = steps[0], log_history(plain_dir)[0]
    weighted = (COMOE["contrastive_loss_coef"] * first["comoe/contrastive"]
                + COMOE["router_aux_loss_coef"] * first["comoe/balance"] + COMOE["router_z_loss_coef"] * first["comoe/z"])
    assert weighted > 1e-3
    assert first["loss"] - plain["loss"] == pytest.approx(weighted, rel=0.05, abs=2e-4)


def test_saved_adapter_loads_with_stock_peft(workspace, trained):
    from peft import PeftConfig, PeftModel

    output_dir, model = trained
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "COMOE"
    assert PeftConfig.from_pretrained(str(output_dir)).peft_type == "COMOE"
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    loaded = PeftModel.from_pretrained(base, str(output_dir)).eval()
    model.eval()
    input_ids = torch.randint(1, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        actual = loaded(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert "import comoe_peft" in (output_dir / "README.md").read_text()


def test_padding_stays_out_of_the_comoe_losses(trained):
    """LLaMA-Factory pads its batches: the attention mask must reach the CoMoE layers of the model it trains."""
    from comoe_peft.tuner.model import find_comoe_model

    _, model = trained
    comoe = find_comoe_model(model)
    input_ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    model.train()
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
        assert comoe.forward_context.attention_mask is not None, "the attention mask did not reach the CoMoE layers"
        assert torch.equal(comoe.forward_context.attention_mask, attention_mask)
        assert all(torch.isfinite(value) for value in comoe.get_aux_losses().values())
    finally:
        model.eval()


def test_the_trainer_is_llamafactorys_with_the_mixin():
    from llamafactory.train.sft import workflow
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    from comoe_peft import CoMoETrainerMixin

    trainer = comoe_seq2seq_trainer()
    assert trainer.__mro__[1:3] == (CoMoETrainerMixin, CustomSeq2SeqTrainer)
    assert workflow.CustomSeq2SeqTrainer is CustomSeq2SeqTrainer  # the patch ends with run_exp


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "dpo"}, "stage: dpo is not supported"),
    ({"finetuning_type": "full"}, "finetuning_type: full does not fit"),
    ({"use_reentrant_gc": True}, "set use_reentrant_gc: false"),
    ({"comoe": {"num_experts": 4, "experts": 2}}, "not CoMoEConfig fields: experts"),
    ({"comoe": {"num_experts": 2, "top_k": 3}}, "comoe: .*top_k"),
    ({"comoe": None}, "add a `comoe:` mapping"),
    ({"comoe": None, "adapter_name_or_path": "no/such/folder"}, "is not a peft adapter"),
])
def test_settings_the_recipe_cannot_run_are_one_line(workspace, tmp_path, overrides, message):
    args = lf_args(workspace, tmp_path / "out", **overrides)
    if args["comoe"] is None:
        del args["comoe"]
    with pytest.raises(RecipeError, match=message) as error:
        prepare_args(args)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # refused before anything is built


def test_a_lora_adapter_is_refused(workspace, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    args = lf_args(workspace, tmp_path / "out", adapter_name_or_path=str(tmp_path / "lora"))
    del args["comoe"]
    with pytest.raises(RecipeError, match="is a LORA adapter"):
        prepare_args(args)


def test_the_documented_command_trains_and_saves(workspace, tmp_path):
    """docs/llama-factory.md's command with the repository's config, the tiny model and data given as key=value
    overrides; gradient accumulation and a checkpoint on the way."""
    import subprocess
    import sys

    config = Path(__file__).resolve().parents[1] / "configs" / "llamafactory" / "comoe_sft.yaml"
    out = tmp_path / "out"
    overrides = {"model_name_or_path": workspace / "model", "dataset_dir": workspace / "data", "dataset": "tiny",
                 "template": "default", "output_dir": out, "bf16": "false", "cutoff_len": 64, "max_steps": 2,
                 "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
                 "gradient_accumulation_steps": 2, "preprocessing_num_workers": "null", "disable_tqdm": "true"}
    command = [sys.executable, "-m", "comoe_peft.integrations.llamafactory", str(config),
               *(f"{key}={value}" for key, value in overrides.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in (out, out / "checkpoint-2"):
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "COMOE"
        assert (folder / "expert_load_history.json").is_file()
    assert [entry["step"] for entry in log_history(out) if "comoe/contrastive" in entry] == [1, 2]


def test_the_command_refuses_with_one_line(workspace, tmp_path, monkeypatch, capsys):
    from comoe_peft.integrations.llamafactory import main

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(lf_args(workspace, tmp_path / "out", stage="pt")))
    monkeypatch.setattr("sys.argv", ["llamafactory.py", str(config)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: stage: pt is not supported; the CoMoE recipe runs LLaMA-Factory's sft stage.\n"


def test_the_command_help(monkeypatch, capsys):
    from comoe_peft.integrations.llamafactory import main

    monkeypatch.setattr("sys.argv", ["llamafactory.py", "--help"])
    main()
    out = capsys.readouterr().out
    assert out.startswith("CoMoE in LLaMA-Factory's SFT runs") and "config.yaml [key=value ...]" in out
