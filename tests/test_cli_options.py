"""`comoe-peft train` options: parsed from dataclasses by TRL's parser, `--config` and preset YAML files, every value
checked before anything is loaded or written (one line, exit 2, no folder), and the newcomer fixes (help without
TRL, quiet library warnings, sensible suggestions, no empty folders, SIGTERM clean-up)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import comoe_peft.experiments.jobs as jobs
import comoe_peft.experiments.pretrained as pretrained
from comoe_peft.experiments.cli import parse_train_args
from comoe_peft_launcher import main, quiet_libraries
from comoe_peft.experiments.options import PRESET_DIR, ScriptArguments, adapter_arguments
from comoe_peft.experiments.tasks import close_matches

ROOT = Path(__file__).resolve().parents[1]

# the issue's bad values, then every other numeric option of the job, the adapter and the trainer fields it uses
ISSUE_VALUES = [["--batch-size", "0"], ["--seed", "-1"], ["--learning-rate", "-1"], ["--num-experts", "0"],
                ["--top-k", "9"], ["--max-steps", "0"], ["--max-steps", "-5"]]
TRAINER_FIELDS = ["max_steps", "per_device_train_batch_size", "learning_rate", "seed", "gradient_accumulation_steps",
                  "logging_steps", "save_steps", "warmup_steps", "max_length", "weight_decay", "max_grad_norm",
                  "num_train_epochs", "save_total_limit", "per_device_eval_batch_size", "dataloader_num_workers",
                  "adam_beta1", "adam_beta2", "adam_epsilon", "data_seed", "eval_steps", "comoe_router_lr_multiplier",
                  "comoe_contrastive_loss_coef", "comoe_router_aux_loss_coef", "comoe_router_z_loss_coef"]


def numeric_fields(dataclass_type) -> list[str]:
    hints = {f.name: f.type for f in dataclasses.fields(dataclass_type)}
    return [name for name, kind in hints.items() if any(t in str(kind) for t in ("int", "float"))]


OTHER_VALUES = [[f"--{name}", "-1"] for name in
                numeric_fields(ScriptArguments) + numeric_fields(adapter_arguments()) + TRAINER_FIELDS]
BAD_VALUES = ISSUE_VALUES + OTHER_VALUES + [["--max-steps", "2.5"], ["--test-size", "0"], ["--top_k", "1"],
                                            ["--num_negatives", "3"], ["--lora_dropout", "1"], ["--adam_beta1", "1"],
                                            ["--seed", str(2**32)], ["--routing-eval-steps", "3", "0"]]


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("comoe-peft: error: "), lines
    assert "None" not in lines[0]
    return lines[0]


def status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(pretrained, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(jobs, "load_mixture", lambda *a, **k: pytest.fail("data was loaded"))


def test_the_bad_values_cover_every_numeric_option():
    flags = {argv[0].lstrip("-").replace("-", "_") for argv in BAD_VALUES}
    assert {"num_experts", "top_k", "r", "lora_alpha", "num_negatives", "contrastive_temperature", "test_size",
            "max_train_per_task", "routing_probe_per_task"} <= flags


@pytest.mark.parametrize("bad", BAD_VALUES, ids=" ".join)
def test_every_bad_value_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, nothing_loads, bad):
    assert status(["train", "--output-dir", str(tmp_path / "runs" / "run"), *bad]) == 2
    line = one_error_line(capsys)
    name = bad[0].lstrip("-")
    assert any(form in line for form in (name, name.replace("_", "-"), "--batch-size", "--rank", "--top-k",
                                            "--router-lr-multiplier")), line
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_in_a_config_file_is_one_line_exit_2(tmp_path, capsys, nothing_loads):
    config = tmp_path / "run.yaml"
    config.write_text("per_device_train_batch_size: 0\n")
    assert status(["train", "--config", str(config), "--output-dir", str(tmp_path / "runs" / "run")]) == 2
    assert "--batch-size must be at least 1 (got 0)" in one_error_line(capsys)
    config.write_text("max_step: 5\n")  # a typo of an option
    assert status(["train", "--config", str(config), "--output-dir", str(tmp_path / "runs" / "run")]) == 2
    assert "did you mean max_steps?" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


@pytest.mark.parametrize("argv", [["eval", "x", "--batch-size", "0"],
                                  ["analyze", "x", "--max-examples-per-task", "-1"],
                                  ["train", "--output-dir"], ["train", "--seed", "abc", "--output-dir", "x"]])
def test_eval_analyze_and_parser_errors_are_one_line_exit_2(capsys, argv):
    assert status(argv) == 2
    one_error_line(capsys)


def test_precedence_preset_then_config_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: quick\nmax_steps: 5\nper-device-train-batch-size: 2\nnum_negatives: 1\n"
                      "gradient_accumulation_steps: 3\nenv:\n  COMOE_PEFT_TEST_VARIABLE: set\n")
    options = parse_train_args(["--config", str(config), "--max-steps", "7", "--output-dir", "x"]).resolved()
    quick = jobs.PRESETS["quick"]
    assert options.max_steps == 7  # the flag over the config file
    assert options.batch_size == 2  # the config file over the preset
    assert (options.max_length, options.learning_rate) == (quick["max_length"], quick["learning_rate"])  # preset
    assert options.extra == {"gradient_accumulation_steps": 3} and options.adapter_extra == {"num_negatives": 1}
    assert os.environ.pop("COMOE_PEFT_TEST_VARIABLE") == "set"  # TRL's `env` mapping
    # a flag chooses the preset over the config file; without either, the default preset
    options = parse_train_args(["--config", str(config), "--preset", "default", "--output-dir", "x"]).resolved()
    assert options.max_length == jobs.PRESETS["default"]["max_length"] and options.max_steps == 5
    options = parse_train_args(["--output-dir", "x"]).resolved()
    assert options.max_steps == jobs.PRESETS["default"]["max_steps"] and options.seed == 0


@pytest.mark.parametrize("name", ["quick", "default", "mixlora"])
def test_a_shipped_preset_is_a_config_file(name):
    by_config = parse_train_args(["--config", str(PRESET_DIR / f"{name}.yaml"), "--output-dir", "x"]).resolved()
    by_preset = parse_train_args(["--preset", name, "--output-dir", "x"]).resolved()
    assert by_preset == jobs.TrainOptions(output_dir="x", preset=name).resolved()
    assert dataclasses.replace(by_config, preset=name) == by_preset  # the same values, recorded as given


def test_presets_ship_with_the_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"comoe_peft.experiments" = ["presets/*.yaml", "train_help.txt"]' in pyproject
    assert sorted(p.name for p in PRESET_DIR.glob("*.yaml")) == ["default.yaml", "mixlora.yaml", "quick.yaml"]


def test_old_flags_and_library_names_are_the_same_options():
    old = parse_train_args(["--batch-size", "3", "--rank", "4", "--router-lr-multiplier", "2", "--no-bf16",
                            "--output-dir", "x"])
    new = parse_train_args(["--per_device_train_batch_size", "3", "--r", "4", "--comoe_router_lr_multiplier", "2",
                            "--bf16", "false", "--output-dir", "x"])
    assert old == new and (old.batch_size, old.rank, old.router_lr_multiplier, old.bf16) == (3, 4, 2.0, False)
    assert parse_train_args(["--bf16", "--output-dir", "x"]).bf16 is True
    assert parse_train_args(["--target_modules", "q_proj", "v_proj", "--output-dir", "x"]).target_modules == [
        "q_proj", "v_proj"]


def test_config_and_flag_overrides_train_a_run(tmp_path, capsys, tiny_model_dir, examples_file):
    run = tmp_path / "run"
    code = main(["train", "--config", str(PRESET_DIR / "quick.yaml"), "--model", str(tiny_model_dir), "--dataset",
                 str(examples_file), "--max-steps", "2", "--test-size", "4", "--rank", "2", "--num_negatives", "1",
                 "--target_modules", "q_proj", "v_proj", "--gradient_accumulation_steps", "2", "--output-dir",
                 str(run)])
    assert code == 0, capsys.readouterr().err
    options = json.loads((run / "run_config.json").read_text())["options"]
    assert options["max_steps"] == 2 and options["batch_size"] == 4  # the flag, and quick.yaml
    assert options["extra"] == {"gradient_accumulation_steps": 2}
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["num_negatives"] == 1 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 4


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "-h"], [], ["trian"],
                                  ["eval", "--batch-size", "0", "run"]])
def test_help_and_usage_errors_import_neither_torch_nor_the_package(argv):
    """`comoe-peft --help` and the top level's one-line usage errors are answered by the launcher before the
    package (peft, torch: seconds of CPU) is imported."""
    code = ("import sys, comoe_peft_launcher\n"
            f"try:\n    code = comoe_peft_launcher.main({argv!r})\nexcept SystemExit as stop:\n    code = stop.code\n"
            "print(code, sorted(m for m in ('torch', 'peft', 'trl', 'comoe_peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    status, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]", out.stdout + out.stderr[-2000:]
    helps = "--help" in argv or "-h" in argv
    assert status == ("0" if helps else "2"), out.stdout
    if argv == ["--help"]:
        assert "train" in out.stdout and "analyze" in out.stdout
    elif helps:
        assert out.stdout.startswith("usage: comoe-peft train --output-dir RUN [options]")
    else:
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("comoe-peft: error:"), out.stderr


def test_bitsandbytes_optional_kernel_note_is_quiet_in_commands_only(caplog):
    import logging

    note = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        with quiet_libraries():
            bnb_logger.warning(note)
            bnb_logger.warning("another bitsandbytes warning")
        bnb_logger.warning(note)
    messages = [r.getMessage() for r in caplog.records if r.name == bnb_logger.name]
    assert messages == ["another bitsandbytes warning", note]


def test_train_help_all_lists_every_dataclass_field():
    out = subprocess.run([sys.executable, "-m", "comoe_peft", "train", "--help-all"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--method", "--config", "--per_device_train_batch_size", "--batch-size", "--num_experts",
                 "--target_modules", "--contrastive_loss_coef", "--report_to", "--comoe_router_aux_loss_coef",
                 "--push_to_hub"):
        assert flag in out.stdout
    assert "FutureWarning" not in out.stderr and "DeprecationWarning" not in out.stderr
    helps = " ".join(out.stdout.split())
    assert "--max-steps MAX_STEPS Optimizer steps to train. (default: 100)" in helps  # the preset's, not TRL's -1
    assert "(default: cosine)" in helps and "(default: max_steps / 30, at least 1)" in helps  # the job's, not TRL's


def help_defaults(text: str) -> dict[str, str]:
    """Each option of the grouped help and the default it shows: {'--max-steps': '100', ...}."""
    import re

    entries = re.split(r"\n  (?=-)", text)
    defaults = {}
    for entry in entries[1:]:
        entry = entry.split("\n\n")[0]  # the last of a group: without what follows the group
        flag = entry.split()[0].rstrip(",")
        shown = re.search(r"\(default: (.*?)\)\s*$", " ".join(entry.split()))
        if shown:
            defaults[flag] = shown.group(1)
    return defaults


def test_the_shipped_train_help_is_the_parsers_grouped_help():
    from comoe_peft.experiments import cli
    import comoe_peft_launcher

    shipped = (Path(cli.__file__).with_name(cli.TRAIN_HELP_FILE)).read_text(encoding="utf-8")
    assert shipped == cli.render_train_help(), (
        "comoe_peft/experiments/train_help.txt is stale: regenerate it with "
        "python -c 'from comoe_peft.experiments.cli import write_train_help; write_train_help()'")
    assert comoe_peft_launcher.TRAIN_HELP_FILE == cli.TRAIN_HELP_FILE
    assert comoe_peft_launcher.shipped_train_help() == shipped
    titles = [line for line in shipped.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert [t.split(" (")[0].split(":")[0] for t in titles] == ["the job", "CoMoE", "CoMoE", "the trainer"]
    assert "--report-to" not in help_defaults(shipped) and "--push-to-hub" not in help_defaults(shipped)
    assert len(shipped.splitlines()) < 200


def test_train_help_shows_the_defaults_the_job_uses(tiny_model_dir, examples_file, tmp_path):
    """Every trainer default --help shows is what `build_trainer` gives TRL for a default run (not TRL's own)."""
    from comoe_peft.experiments import cli

    shown = help_defaults(cli.render_train_help())
    options = parse_train_args(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run")]).resolved()
    _, model, tokenizer = jobs.load_base_model(str(tiny_model_dir))
    rows = jobs.load_examples(str(examples_file))
    trainer = jobs.build_trainer(options, model, tokenizer, rows, tmp_path / "trainer")
    args = trainer.args
    steps = args.max_steps
    expected = {"--max-steps": str(steps), "--per-device-train-batch-size": str(args.per_device_train_batch_size),
                "--learning-rate": str(args.learning_rate), "--max-length": str(args.max_length),
                "--lr-scheduler-type": args.lr_scheduler_type.value, "--weight-decay": str(args.weight_decay),
                "--max-grad-norm": str(args.max_grad_norm), "--seed": str(args.seed),
                "--gradient-accumulation-steps": str(args.gradient_accumulation_steps),
                "--save-total-limit": str(args.save_total_limit), "--optim": args.optim.value,
                "--gradient-checkpointing": str(args.gradient_checkpointing).lower(),
                "--padding-free": str(args.padding_free).lower(),
                "--comoe-router-lr-multiplier": str(args.comoe_router_lr_multiplier)}
    assert {flag: shown[flag] for flag in expected} == expected
    assert shown["--warmup-steps"] == "max_steps / 20, at least 1" and args.warmup_steps == max(1, steps // 20)
    assert shown["--logging-steps"] == "max_steps / 30, at least 1" and args.logging_steps == max(1, steps // 30)
    assert shown["--save-steps"].startswith("none") and args.save_strategy == "no"
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]


def test_library_deprecation_warnings_are_quiet_in_commands_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn_explicit("old", FutureWarning, "training_args.py", 1, module="transformers.training_args")
            warnings.warn_explicit("old", DeprecationWarning, "x.py", 1, module="trl.trainer.sft_trainer")
            warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="comoe_peft.tuner.layer")
        warnings.warn_explicit("outside", FutureWarning, "training_args.py", 1, module="transformers.training_args")
    assert [str(w.message) for w in seen] == ["ours", "outside"]


def test_suggestions_only_for_close_names():
    tasks = {"suicide_risk", "navigate", "sports_understanding"}
    assert close_matches("no_such_task", tasks) == []
    assert close_matches("navigat", tasks) == ["navigate"]


def test_a_failed_command_leaves_no_empty_folders(tmp_path, capsys, tiny_model_dir):
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "missing.jsonl"),
                 "--output-dir", str(tmp_path / "runs" / "deeper" / "run")])
    assert code == 2
    one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_removes_the_staging_folder(tmp_path, tiny_model_dir, examples_file):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "comoe_peft", "train", "--model", str(tiny_model_dir), "--dataset",
               str(examples_file), "--preset", "quick", "--max-steps", "100000", "--test-size", "4", "--rank", "2",
               "--output-dir", str(runs / "run")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(runs.glob(".run.staging-*")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)  # until the run has its staging folder
        time.sleep(8)  # loading and training
        assert process.poll() is None, process.communicate()[1][-2000:]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not runs.exists(), "the staging folder, and the runs/ folder the command created, are removed"


def test_an_unfinished_run_with_other_settings_is_named_without_python_none(tmp_path):
    from comoe_peft.experiments.runs import RunError, partial_dir, start_resumable_run

    start_resumable_run(tmp_path / "run", False, {"model": None, "max_steps": 6})
    with pytest.raises(RunError) as error:
        start_resumable_run(tmp_path / "run", False, {"model": "m", "max_steps": 6})
    assert "model: stored not set, asked \"m\"" in str(error.value) and "None" not in str(error.value)
    assert partial_dir(tmp_path / "run").is_dir()


def test_one_run_folder_is_written_by_one_process_at_a_time(tmp_path):
    from comoe_peft.experiments.runs import RunError, lock_path, lock_run

    run = tmp_path / "new" / "run"
    with lock_run(run):  # creates the folders above the run
        assert lock_path(run).read_text() == str(os.getpid())
        with pytest.raises(RunError, match=rf"'{run}' is being written by another process \(pid {os.getpid()}\)"):
            with lock_run(run):
                pass
        with lock_run(tmp_path / "new" / "other"):  # another run beside it is not held back
            pass
    assert list((tmp_path / "new").iterdir()) == [], "the lock files are removed"
    with lock_run(run):  # released
        pass


def test_a_base_run_from_python_may_say_zero_steps():
    options = jobs.TrainOptions(output_dir="x", method="base", max_steps=0, preset="quick").resolved()
    assert options.max_steps == 0
    with pytest.raises(jobs.RunError, match="trains nothing"):
        jobs.TrainOptions(output_dir="x", method="base", max_steps=-5).resolved()
