"""The plain transformers.Trainer path (CoMoETrainer, CoMoETrainerMixin): trains, accumulates and refuses without
trl, so it works beside LLaMA-Factory's trl 0.24; and the one-line errors of too old a trl or peft.

CI runs this file with the newest versions, with axolotl's pins and with LLaMA-Factory's (.ci/run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import multitask_rows, tiny_llama, tiny_tokenizer
from datasets import Dataset
from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling

from comoe_peft import CoMoEConfig
from comoe_peft.training.callbacks import HISTORY_FILENAME
from comoe_peft.training.trainer import CoMoETrainer, CoMoETrainingArguments
from comoe_peft.tuner.versions import MIN_PEFT, MIN_TRL, TooOldError, installed_version, require

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def comoe_model(tokenizer, **overrides):
    config = CoMoEConfig(**(dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=TARGETS) | overrides))
    return get_peft_model(tiny_llama(vocab=len(tokenizer)), config)


def training_args(output_dir, **overrides):
    kwargs = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    return CoMoETrainingArguments(**(kwargs | overrides))


def history_values(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_plain_transformers_trainer_with_the_mixin(tmp_path, tokenizer):
    texts = [r["prompt"] + r["completion"] for r in multitask_rows(4)]
    data = Dataset.from_dict(tokenizer(texts, truncation=True, max_length=48))
    args = training_args(tmp_path, comoe_contrastive_loss_coef=0.3)
    trainer = CoMoETrainer(model=comoe_model(tokenizer, init_weights=False), args=args, train_dataset=data,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    assert trainer.comoe_loss_coefficients()["contrastive"] == 0.3
    assert len(history_values(trainer, "comoe/contrastive")) == 3
    assert os.path.isfile(os.path.join(tmp_path, HISTORY_FILENAME))


def test_gradient_accumulation_gives_the_same_gradient(tmp_path, tokenizer):
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"input_ids": torch.randint(2, len(tokenizer), (16,), generator=generator).tolist()}
                              for _ in range(8)])
    updates = {}
    for name, batch, accumulation in [("big", 8, 1), ("accumulated", 4, 2)]:
        args = training_args(tmp_path / name, per_device_train_batch_size=batch, max_steps=1,
                             gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                             lr_scheduler_type="constant", max_grad_norm=0.0, seed=0,
                             comoe_contrastive_loss_coef=0.5, comoe_router_z_loss_coef=0.1)
        model = comoe_model(tokenizer, anchor="all", init_weights=False)  # deterministic anchors
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        CoMoETrainer(model=model, args=args, train_dataset=data,
                     data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
        updates[name] = {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}
    for key, update in updates["big"].items():
        assert update.abs().sum() > 0, key
        torch.testing.assert_close(updates["accumulated"][key], update, rtol=1e-4, atol=1e-6, msg=key)


def test_reentrant_gradient_checkpointing_is_refused(tmp_path, tokenizer):
    args = training_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="Reentrant gradient checkpointing.*use_reentrant': False"):
        CoMoETrainer(model=comoe_model(tokenizer), args=args)


def test_the_trainer_path_imports_without_trl():
    """`import trl` fails in the child (as if trl were absent); the Trainer path still imports and constructs, and
    the SFT names fail only when asked for."""
    result = run_python(
        "import sys; sys.modules['trl'] = None\n"
        "import comoe_peft\n"
        "from comoe_peft import CoMoETrainer, CoMoETrainerMixin, CoMoETrainingArguments\n"
        "from comoe_peft.training import ExpertLoadHistoryCallback\n"
        "assert CoMoETrainingArguments(output_dir='x', report_to='none', comoe_router_z_loss_coef=0.1)\n"
        "try:\n    comoe_peft.CoMoESFTTrainer\nexcept ImportError:\n    print('sft refused')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sft refused"


def test_the_sft_trainer_with_the_installed_trl():
    """With trl >= 1.9 the SFT trainer imports; with an older trl (LLaMA-Factory's 0.24) importing it is one
    ImportError line naming the minimum, and nothing else of the package breaks."""
    result = run_python("from comoe_peft import CoMoESFTTrainer")
    trl = installed_version("trl")
    if trl is not None and tuple(int(x) for x in trl.split(".")[:2]) >= (1, 9):
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        kind, message = last.split(": ", 1)
        assert kind.endswith("TooOldError") and issubclass(TooOldError, ImportError), last
        assert message.startswith(f"CoMoESFTTrainer needs trl>={MIN_TRL}, "), last
        assert "use CoMoETrainer" in last


@pytest.mark.parametrize("installed", ["1.9.0", "1.9.0.dev0", "1.16.0", "2.0.0"])
def test_new_enough_versions_pass(installed):
    require("trl", MIN_TRL, "CoMoESFTTrainer", installed)


@pytest.mark.parametrize(("package", "minimum", "installed", "found"), [
    ("trl", MIN_TRL, "0.24.0", "found trl 0.24.0"),
    ("trl", MIN_TRL, None, "it is not installed"),
    ("peft", MIN_PEFT, "0.17.1", "found peft 0.17.1"),
    ("peft", MIN_PEFT, "0.18.0", "found peft 0.18.0"),
])
def test_too_old_a_version_is_one_line_naming_the_minimum(package, minimum, installed, found):
    with pytest.raises(TooOldError) as error:
        require(package, minimum, "comoe_peft", installed)
    message = str(error.value)
    assert message == f"comoe_peft needs {package}>={minimum}, {found}: pip install '{package}>={minimum}'."
    assert "\n" not in message


def test_the_installed_versions_are_in_the_tested_ranges():
    """The floors of pyproject.toml hold where the tests run (a venv that drifted below them tests nothing)."""
    require("peft", MIN_PEFT, "the tests", installed_version("peft"))
    transformers = tuple(int(x) for x in installed_version("transformers").split(".")[:2])
    assert transformers >= (5, 6)
