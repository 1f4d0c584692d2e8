"""Presets and precedence: the job's defaults < the default preset < the chosen preset < --config < flags, for
every option a preset may set (layout fields and the trainer's and adapter's extra fields too), from the command
line and from Python alike."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

import comoe_peft.experiments.jobs as jobs
import comoe_peft.experiments.options as options
from comoe_peft.experiments.cli import build_train_parser, parse_train_args
from comoe_peft.experiments.runs import RunError
from comoe_peft_launcher import main

# a preset that sets layout fields, an adapter field and a trainer field, and one run-size field of its own
LAYOUT = "num_experts: 8\nlora_alpha: 32\ncomoe_router_aux_loss_coef: 0.001\nmax_steps: 7\n"
NOT_GIVEN_AFTER_RESOLVING = {"bf16", "save_steps"}  # None means something: bf16 where supported, no checkpoints


@pytest.fixture
def layout_preset(tmp_path, monkeypatch):
    """The shipped presets plus `layout` (LAYOUT), read from a folder of their own."""
    folder = tmp_path / "presets"
    shutil.copytree(options.PRESET_DIR, folder)
    (folder / "layout.yaml").write_text(LAYOUT)
    monkeypatch.setattr(options, "PRESET_DIR", folder)
    return folder


def test_a_preset_sets_layout_and_extra_fields_over_the_job_and_the_default_preset(layout_preset):
    got = jobs.TrainOptions(output_dir="x", preset="layout").resolved()
    default = jobs.PRESETS["default"]
    assert got.num_experts == 8 and default["num_experts"] == 4  # the preset over the job's default
    assert got.max_steps == 7  # the preset over the default preset
    assert (got.batch_size, got.learning_rate, got.test_size) == (default["batch_size"], default["learning_rate"],
                                                                   default["test_size"])  # the default preset's
    assert (got.top_k, got.rank, got.seed) == (2, 16, 0)  # the job's
    assert got.adapter_extra == {"lora_alpha": 32} and got.extra == {"comoe_router_aux_loss_coef": 0.001}


def test_config_over_preset_and_flags_over_config(layout_preset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: layout\nnum_experts: 6\nlora_alpha: 16\nmax_steps: 9\n")
    got = parse_train_args(["--config", str(config), "--num-experts", "5", "--output-dir", "x"]).resolved()
    assert got.num_experts == 5  # the flag over the config file
    assert got.adapter_extra == {"lora_alpha": 16} and got.max_steps == 9  # the config file over the preset
    assert got.extra == {"comoe_router_aux_loss_coef": 0.001}  # the preset, where nothing else sets it


def test_a_given_value_equal_to_the_jobs_default_is_kept(layout_preset):
    argv = ["--preset", "layout", "--num-experts", "4", "--comoe-router-aux-loss-coef", "0", "--output-dir", "x"]
    by_flags = parse_train_args(argv).resolved()
    by_python = jobs.TrainOptions(output_dir="x", preset="layout", num_experts=4,
                                  extra={"comoe_router_aux_loss_coef": 0.0}).resolved()
    for got in (by_flags, by_python):
        assert got.num_experts == 4 and got.extra == {"comoe_router_aux_loss_coef": 0.0}
        assert got.adapter_extra == {"lora_alpha": 32}  # not given: the preset's


def test_every_option_a_preset_may_set_is_unset_until_resolved():
    """A default that is not None could not tell "not given" from "given the job's value"."""
    unset = jobs.TrainOptions(output_dir="x")
    names = {**{f.name: f.name for f in dataclasses.fields(options.ScriptArguments)}, **options.TRAINER_NAMES,
             **options.ADAPTER_NAMES}
    may_set = [own for name, own in names.items() if name not in options.NOT_IN_PRESETS]
    assert [name for name in may_set if getattr(unset, name) is not None] == []
    resolved = unset.resolved()
    assert {name for name in may_set if getattr(resolved, name) is None} == NOT_GIVEN_AFTER_RESOLVING
    assert resolved.resolved() == resolved  # what run_config.json stores resolves to itself


def test_the_shipped_presets_set_only_options_a_preset_may_set():
    known = {action.dest for action in build_train_parser()._actions} - {"help", "config", "help_all"}
    for name in options.preset_names():
        keys = set(options.load_preset(name))
        assert keys <= known, f"{name}.yaml: {keys - known} are no options"
        assert not keys & set(options.NOT_IN_PRESETS), f"{name}.yaml sets {keys & set(options.NOT_IN_PRESETS)}"
        assert "env" not in keys


def test_an_unknown_preset_is_one_line_that_names_every_preset(tmp_path, capsys):
    assert main(["train", "--preset", "nope", "--output-dir", str(tmp_path / "run")]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("comoe-peft: error: --preset must be one of"), lines
    assert all(name in lines[0] for name in options.preset_names()) and "--config" in lines[0]
    with pytest.raises(RunError, match="--preset must be one of"):
        jobs.TrainOptions(output_dir="x", preset="nope").resolved()
    assert list(tmp_path.iterdir()) == []


def test_train_help_shows_the_jobs_defaults_under_the_default_preset():
    """The shipped `train --help` (read without importing torch) shows what a run without --preset gets."""
    from test_cli_options import help_defaults

    from comoe_peft.experiments import cli
    import comoe_peft_launcher

    shown = help_defaults(comoe_peft_launcher.shipped_train_help())
    expected = {"--" + name.replace("_", "-"): cli.shown_default(value)
                for name, value in options.preset_values("default").items()}
    assert {flag: shown.get(flag) for flag in expected} == expected
    assert shown["--num-experts"] == "4" and shown["--max-steps"] == "100"


def test_a_lora_run_leaves_a_presets_comoe_trainer_settings_out_and_refuses_given_ones(
        layout_preset, tiny_model_dir, examples_file, tmp_path, capsys):
    """`--method lora` beside a preset made for the experts: TRL's SFTConfig has no comoe_* fields."""
    from trl import SFTTrainer

    options = parse_train_args(["--preset", "layout", "--method", "lora", "--model", str(tiny_model_dir),
                                "--output-dir", str(tmp_path / "run")]).resolved()
    assert options.extra == {"comoe_router_aux_loss_coef": 0.001}  # recorded as the preset gave it
    _, model, tokenizer = jobs.load_base_model(str(tiny_model_dir))
    trainer = jobs.build_trainer(options, model, tokenizer, jobs.load_examples(str(examples_file)),
                                 tmp_path / "trainer")
    assert type(trainer) is SFTTrainer and not hasattr(trainer.args, "comoe_router_aux_loss_coef")
    capsys.readouterr()
    assert main(["train", "--method", "lora", "--comoe-router-aux-loss-coef", "0.01", "--output-dir",
                 str(tmp_path / "given")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("comoe-peft: error: --comoe-router-aux-loss-coef: options of the experts; --method "
                           "lora has none") and "\n" not in line


# ---------------------------------------------------------------------------------------------- --preset mixlora

MIXLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp"]
RUN_SIZE = ("max_steps", "batch_size", "max_length", "max_train_per_task", "test_size", "analysis_examples_per_task")


def test_the_mixlora_preset_is_mixloras_layout_at_the_default_presets_size():
    by_flags = parse_train_args(["--preset", "mixlora", "--output-dir", "x"]).resolved()
    assert by_flags == jobs.TrainOptions(output_dir="x", preset="mixlora").resolved()  # the Python API alike
    assert (by_flags.num_experts, by_flags.top_k, by_flags.rank, by_flags.lora_dropout) == (8, 2, 16, 0.05)
    assert by_flags.target_modules == MIXLORA_TARGETS and by_flags.learning_rate == 2e-4
    assert by_flags.adapter_extra == {} and by_flags.extra == {"comoe_router_aux_loss_coef": 0.001}  # alpha: 2 r
    default = jobs.PRESETS["default"]
    assert [getattr(by_flags, name) for name in RUN_SIZE] == [default[name] for name in RUN_SIZE]
    assert jobs.PRESETS["mixlora"]["num_experts"] == 8


def test_the_mixlora_preset_builds_block_experts_beside_attention_experts():
    from conftest import tiny_llama
    from peft import get_peft_model

    from comoe_peft.tuner.block import Block

    options = jobs.TrainOptions(output_dir="x", preset="mixlora").resolved()
    config = jobs.adapter_config(options, tiny_llama())
    assert config.lora_alpha == 32 and config.target_modules == set(MIXLORA_TARGETS) and config.num_experts == 8
    lora = jobs.adapter_config(dataclasses.replace(options, method="lora"), tiny_llama())
    assert lora.lora_alpha == 2 * lora.r and lora.r > options.rank  # the LoRA baseline keeps 2 r at its matched rank
    model = get_peft_model(tiny_llama(), config)
    assert sum(isinstance(m, Block) for m in model.modules()) == 2  # one per layer of the tiny Llama


def test_flags_and_config_override_the_mixlora_preset(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: mixlora\ntarget_modules: [mlp]\ncomoe_router_aux_loss_coef: 0.0\n")
    got = parse_train_args(["--config", str(config), "--num-experts", "4", "--lora-alpha", "16",
                            "--output-dir", "x"]).resolved()
    assert (got.num_experts, got.adapter_extra, got.target_modules) == (4, {"lora_alpha": 16}, ["mlp"])
    assert got.extra == {"comoe_router_aux_loss_coef": 0.0} and got.learning_rate == 2e-4


def test_the_preset_help_names_every_preset():
    import comoe_peft_launcher

    shipped = " ".join(comoe_peft_launcher.shipped_train_help().split())
    entry = shipped.split("--preset TEXT", 1)[1].split(" --config ", 1)[0]
    assert [name for name in options.preset_names() if f"{name} = " not in entry] == []
