"""The `comoe-peft` command: argument and input errors, and a quick end-to-end run on a tiny local model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tiny_llama

from comoe_peft_launcher import main
from comoe_peft.experiments.jobs import PRESETS, lora_target_modules, matched_lora_rank
from comoe_peft.experiments.runs import RunError, finish_run, start_run


def quick(tiny_model_dir, examples_file, run_dir, *extra):
    return main(["train", "--model", str(tiny_model_dir), "--dataset", str(examples_file), "--preset", "quick",
                 "--max-steps", "3", "--test-size", "4", "--rank", "2", "--output-dir", str(run_dir), *extra])


def error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "comoe-peft" in line]
    assert len(err) == 1 and err[0].startswith("comoe-peft: error: "), err
    return err[0]


def exit_status(argv):
    """main's status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_argparse_errors_exit_2(capsys):
    for argv in (["train"], ["train", "--output-dir", "x", "--method", "dora"], ["nonsense"]):
        assert exit_status(argv) == 2


def test_unknown_task_is_one_line_exit_2(tmp_path, capsys, tiny_model_dir):
    code = main(["train", "--model", str(tiny_model_dir), "--tasks", "bigbench:navigate,nosuch:task",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2 and "unknown task 'nosuch:task'" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_missing_model_is_one_line_exit_2(tmp_path, capsys, examples_file):
    code = main(["train", "--model", str(tmp_path / "no-model"), "--dataset", str(examples_file), "--test-size", "4",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2 and "does not exist" in error_line(capsys)


def test_dataset_with_wrong_columns(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "label": 1}))
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(bad), "--output-dir", str(tmp_path / "r")])
    line = error_line(capsys)
    assert code == 2 and "missing" in line and "prompt" in line


def test_unwritable_output_folder(tmp_path, capsys, tiny_model_dir, examples_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = quick(tiny_model_dir, examples_file, blocker / "run")
    assert code == 2 and "cannot write the output folder" in error_line(capsys)


def test_existing_run_folder_is_not_touched_without_overwrite(tmp_path, capsys, tiny_model_dir, examples_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    code = quick(tiny_model_dir, examples_file, run)
    assert code == 2 and "--overwrite" in error_line(capsys)
    assert (run / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left behind


def test_staging_is_moved_into_place_only_at_the_end(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("old")
    staging = start_run(run, overwrite=True)
    assert (run / "old.txt").exists()  # the old run survives until the new one is complete
    (staging / "new.txt").write_text("new")
    finish_run(staging, run)
    assert sorted(p.name for p in run.iterdir()) == ["new.txt"]
    with pytest.raises(RunError, match="already holds files"):
        start_run(run, overwrite=False)


def test_eval_and_analyze_refuse_folders_that_are_not_runs(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a comoe-peft run folder" in error_line(capsys)
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "does not exist" in error_line(capsys)


def test_matched_lora_rank():
    model = tiny_llama()  # q, o: 32 -> 32; k, v: 32 -> 16; 2 layers
    in_out = 2 * (64 + 48 + 48 + 64)
    ins = 2 * 4 * 32
    assert matched_lora_rank(model, num_experts=4, rank=4) == round((4 * 4 * in_out + 4 * ins) / in_out)


def test_matched_lora_rank_counts_a_block_as_its_projections_with_one_router():
    model = tiny_llama()  # gate, up: 32 -> 64; down: 64 -> 32; 2 layers
    in_out = 2 * 3 * (32 + 64)
    ins = 2 * 32
    assert matched_lora_rank(model, num_experts=4, rank=4, target_modules=["mlp"]) == round(
        (4 * 4 * in_out + 4 * ins) / in_out)
    assert lora_target_modules(model, ["q_proj", "mlp"]) == ["down_proj", "gate_proj", "q_proj", "up_proj"]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_matched_lora_has_comoes_trainable_parameters_to_one_rank_step(use_dora):
    """The matched rank's LoRA (DoRA with `use_dora`, as peft builds it) and CoMoE's experts, routers and magnitudes
    (per-linear and block) differ by at most half of what one more LoRA rank adds."""
    from peft import LoraConfig, get_peft_model

    from comoe_peft import CoMoEConfig

    targets = ["q_proj", "v_proj", "mlp"]
    comoe = get_peft_model(tiny_llama(), CoMoEConfig(r=4, num_experts=4, top_k=2, target_modules=targets,
                                                     use_dora=use_dora))
    rank = matched_lora_rank(tiny_llama(), num_experts=4, rank=4, target_modules=targets, use_dora=use_dora)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=rank, use_dora=use_dora,
                                                   target_modules=lora_target_modules(tiny_llama(), targets)))
    one_rank = 2 * (64 + 48 + 3 * (32 + 64))  # d_in + d_out of every adapted projection, 2 layers
    trainable = [m.get_nb_trainable_parameters()[0] for m in (comoe, lora)]
    assert abs(trainable[0] - trainable[1]) <= one_rank / 2, (trainable, rank)


def test_block_experts_and_their_matched_lora_from_the_command(tmp_path, tiny_model_dir, examples_file):
    """`--target-modules mlp`: comoe trains block experts; lora goes on the projections inside the blocks."""
    assert quick(tiny_model_dir, examples_file, tmp_path / "comoe", "--target-modules", "q_proj", "mlp") == 0
    assert quick(tiny_model_dir, examples_file, tmp_path / "lora", "--method", "lora", "--target-modules", "mlp") == 0
    comoe = json.loads((tmp_path / "comoe" / "adapter" / "adapter_config.json").read_text())
    lora = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert sorted(comoe["target_modules"]) == ["mlp", "q_proj"]
    assert sorted(lora["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    comoe_params = json.loads((tmp_path / "comoe" / "run_config.json").read_text())["trainable_parameters"]
    assert comoe_params > 0


def test_presets_name_every_tunable_field():
    for name in PRESETS:
        assert set(PRESETS[name]) == set(PRESETS["default"]), name


@pytest.mark.slow
def test_quick_end_to_end_three_methods_eval_table_and_analysis(tmp_path, capsys, tiny_model_dir, examples_file):
    for method in ("comoe", "moe", "lora"):
        assert quick(tiny_model_dir, examples_file, tmp_path / method, "--method", method) == 0
        config = json.loads((tmp_path / method / "run_config.json").read_text())
        assert config["method"] == method and config["test_examples"] == 8
        assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "comoe"), str(tmp_path / "moe"), str(tmp_path / "lora")]) == 0
    table = capsys.readouterr().out
    for name in ("comoe (comoe)", "moe (moe)", "lora (lora)", "sentiment", "arithmetic", "overall"):
        assert name in table
    results = json.loads((tmp_path / "comoe" / "eval_results.json").read_text())
    assert results["sentiment"]["n"] == 4 and 0 <= results["overall"]["accuracy"] <= 1

    assert main(["analyze", str(tmp_path / "lora")]) == 2
    assert "has no experts to analyse" in error_line(capsys)
    assert main(["analyze", str(tmp_path / "comoe")]) == 0
    assert (tmp_path / "comoe" / "analysis" / "analysis.json").is_file()
    assert (tmp_path / "comoe" / "analysis" / "analysis.md").is_file()
    assert main(["analyze", str(tmp_path / "comoe")]) == 2  # no silent overwrite
    assert "--overwrite" in error_line(capsys)

    # the same data and seed give the same held-out split for every method
    from datasets import load_from_disk

    tests = [load_from_disk(str(tmp_path / m / "data" / "test"))["prompt"] for m in ("comoe", "moe", "lora")]
    assert tests[0] == tests[1] == tests[2]


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "comoe_peft", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "analyze" in out.stdout


def test_tasks_can_mix_the_papers_benchmarks_with_built_in_tasks(monkeypatch):
    from datasets import Dataset

    from comoe_peft.experiments import hub_datasets
    from comoe_peft.experiments.data import EXAMPLE_FEATURES
    from comoe_peft.experiments.jobs import TrainOptions, load_mixture

    calls = []

    def fake_load_benchmark(name, split, data_files=None):
        calls.append((name, split))
        rows = [{"task": name, "prompt": f"q{i}", "choices": ["A", "B"], "answer": "A"} for i in range(5)]
        return Dataset.from_list(rows, features=EXAMPLE_FEATURES)

    monkeypatch.setattr(hub_datasets, "load_benchmark", fake_load_benchmark)
    options = TrainOptions(output_dir="unused", tasks="benchmark:arc-e,synthetic:parity,benchmark:boolq",
                           preset="quick").resolved()
    mixture = load_mixture(options)
    assert calls == [("arc-e", "train"), ("boolq", "train")]
    assert set(mixture["task"]) == {"arc-e", "boolq", "synthetic:parity"}


def test_unknown_benchmark_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--tasks", "benchmark:mmlu", "--output-dir", str(tmp_path / "r")]) == 2
    assert "unknown benchmark 'mmlu'" in error_line(capsys)


def test_run_folders_and_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from comoe_peft.tuner.files import write_json_atomic

    old = os.umask(0o022)
    try:
        staging = start_run(tmp_path / "run", overwrite=False)
        write_json_atomic(staging / "x.json", {"a": 1})
        assert stat.S_IMODE(os.stat(staging).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(staging / "x.json").st_mode) == 0o644
        assert json.loads((staging / "x.json").read_text()) == {"a": 1}
    finally:
        os.umask(old)


def test_a_missing_experiments_package_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Simulated: scipy cannot be imported (the library was installed without the experiments extra)."""
    for module in ("comoe_peft.experiments.analysis", "comoe_peft.experiments.analysis_metrics"):
        monkeypatch.delitem(sys.modules, module, raising=False)  # imported again, and failing, by the command
    for module in ["scipy", *[m for m in sys.modules if m.startswith("scipy.")]]:
        monkeypatch.setitem(sys.modules, module, None)  # `import scipy...` raises ModuleNotFoundError
    assert main(["analyze", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert "needs the experiments extra, which is not installed (missing: scipy)" in line
    assert 'pip install "comoe-peft[experiments]"' in line


def test_the_extra_is_checked_from_the_installed_metadata_before_any_work(tmp_path, capsys, monkeypatch):
    from comoe_peft.experiments import cli

    requires = ['torch>=2.6', 'matplotlib>=3.8; extra == "experiments"', 'pytest>=8; extra == "test"']
    monkeypatch.setattr(cli.importlib.metadata, "requires", lambda name: requires)
    real_distribution = cli.importlib.metadata.distribution

    def distribution(name):
        if name in ("matplotlib", "pytest"):
            raise cli.importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(cli.importlib.metadata, "distribution", distribution)
    assert cli.missing_extra_packages() == ["matplotlib"]  # pytest belongs to another extra
    monkeypatch.setattr(cli, "run_train", lambda args: pytest.fail("the command started"))
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 2
    assert "(missing: matplotlib); install it with pip install" in error_line(capsys)


def test_a_missing_package_outside_the_extra_is_not_blamed_on_it(tmp_path, monkeypatch):
    from comoe_peft.experiments import cli

    def run_train(args):
        raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")

    monkeypatch.setattr(cli, "run_train", run_train)
    with pytest.raises(ModuleNotFoundError):
        main(["train", "--output-dir", str(tmp_path / "run")])


def test_downloads_are_announced_on_stderr(tmp_path, capsys, monkeypatch):
    import logging

    from comoe_peft.experiments import cli

    monkeypatch.setattr(cli, "run_train", lambda args: logging.getLogger("comoe_peft.experiments.tasks").info(
        "downloading BIG-bench task data (358 MB) into X; once"))
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 0
    assert "downloading BIG-bench task data (358 MB) into X; once" in capsys.readouterr().err
    assert not [h for h in logging.getLogger("comoe_peft").handlers]  # the handler is removed afterwards
