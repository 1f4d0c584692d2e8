"""Bad input and interruptions of `comoe-peft`: one line, exit 2 (130 for Ctrl-C), no traceback, nothing left behind.

Each case is one a new user ran into (issue #27): target modules that match nothing, an empty dataset file, a damaged
run file, `--tasks ""`, a YAML value of the wrong type, Ctrl-C during training.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comoe_peft_launcher import main

INTERRUPTED = 130


def quick_args(tiny_model_dir, examples_file, run_dir, *extra):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(examples_file), "--preset", "quick",
            "--max-steps", "3", "--test-size", "4", "--rank", "2", "--output-dir", str(run_dir), *extra]


def one_line(capsys, prefix="comoe-peft: error: "):
    """The command's only line on stderr (library progress bars aside), which starts with `prefix`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "comoe-peft" in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, examples_file):
    run = tmp_path_factory.mktemp("runs") / "comoe"
    assert main(quick_args(tiny_model_dir, examples_file, run)) == 0
    return run


# ---------------------------------------------------------------------------------------------- train input


@pytest.mark.parametrize("method", ["comoe", "lora"])
def test_target_modules_that_match_nothing(tmp_path, capsys, tiny_model_dir, examples_file, method):
    run = tmp_path / "run"
    code = main(quick_args(tiny_model_dir, examples_file, run, "--method", method, "--target-modules", "no_such"))
    line = one_line(capsys)
    assert code == 2 and "--target-modules no_such matches no" in line and "q_proj" in line
    assert "lm_head" not in line  # the output head is no choice
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, says", [("", "is empty"), ("\n \n", "is empty"),
                                           ('{"task": "a", "prompt"', "cannot read")])
def test_unreadable_dataset_files(tmp_path, capsys, tiny_model_dir, content, says):
    data = tmp_path / "rows.jsonl"
    data.write_text(content)
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "r")])
    line = one_line(capsys)
    assert code == 2 and says in line and str(data) in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("tasks", ["", " , "])
def test_tasks_that_name_no_task(tmp_path, capsys, tiny_model_dir, tasks):
    code = main(["train", "--model", str(tiny_model_dir), "--tasks", tasks, "--output-dir", str(tmp_path / "r")])
    assert code == 2 and "--tasks names no task" in one_line(capsys)


@pytest.mark.parametrize("yaml_line, says", [
    ("max_steps: ten", "type error in '{cfg}': max_steps must be a whole number, not the text 'ten'"),
    ("max_steps: 2.5", "max_steps must be a whole number, not the number 2.5"),
    ("learning_rate: 5e-4", "learning_rate must be a number, not the text '5e-4'; YAML reads 5e-4 as text"),
    ("bf16: 1", "bf16 must be true or false, not the number 1"),
    ("routing_eval_steps: [10, x]", "routing_eval_steps must be a list of whole numbers, not the text 'x'"),
    ("tasks: [bigbench:navigate]", "tasks must be text, not a list"),
    ("lr_scheduler_type: 5", "sets lr_scheduler_type: 5, which is not one of linear, cosine"),
])
def test_config_values_of_the_wrong_type(tmp_path, capsys, tiny_model_dir, examples_file, yaml_line, says):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_line + "\n")
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(examples_file), "--config", str(config),
                 "--output-dir", str(tmp_path / "r")])
    assert code == 2 and says.format(cfg=config) in one_line(capsys)


def test_python_callers_get_type_errors_too(tmp_path):
    from comoe_peft.experiments.jobs import TrainOptions
    from comoe_peft.experiments.runs import RunError

    with pytest.raises(RunError, match="type error: --max-steps must be a number, not str 'ten'"):
        TrainOptions(output_dir=str(tmp_path / "r"), max_steps="ten").resolved()


# ---------------------------------------------------------------------------------------------- damaged runs


@pytest.mark.parametrize("command", [["eval"], ["analyze", "--overwrite"]])
@pytest.mark.parametrize("damaged", ["adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                     "run_config.json"])
def test_a_damaged_run_file_is_named_with_what_to_do(tmp_path, capsys, finished_run, command, damaged):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "eval_results.json").unlink(missing_ok=True)
    path = run / damaged
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])  # cut short, as by a full disk
    code = main([command[0], str(run), *command[1:]])
    line = one_line(capsys)
    assert code == 2 and f"'{path}' cannot be read" in line and "damaged or incomplete" in line
    assert "--overwrite" in line


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_a_run_another_process_is_writing_is_refused_and_a_dead_ones_lock_is_not(tmp_path, capsys, tiny_model_dir,
                                                                               examples_file):
    """Two study processes (or terminals) on one run folder: the second stops at once and names the first's pid; a
    lock file left by a killed process holds nothing back."""
    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom comoe_peft.experiments.runs import lock_run\n"
         f"with lock_run({str(runs / 'run')!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = quick_args(tiny_model_dir, examples_file, runs / "run", "--save-steps", "2")
        code = main(args)
        line = one_line(capsys)
        assert code == 2 and f"is being written by another process (pid {holder.pid})" in line and "--output-dir" in line
        assert [p.name for p in runs.iterdir()] == [".run.lock"], "no partial folder, no run"
    finally:
        holder.kill()
        holder.wait()
    assert (runs / ".run.lock").is_file(), "killed while holding it: the file stays, the lock does not"
    assert main(args) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["run"], "the finished run, its lock file removed"


def test_ctrl_c_without_checkpoints_says_nothing_was_kept(tmp_path, capsys, monkeypatch, tiny_model_dir,
                                                          examples_file):
    from comoe_peft.training.trainer import CoMoESFTTrainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CoMoESFTTrainer, "train", interrupted)
    code = main(quick_args(tiny_model_dir, examples_file, tmp_path / "run"))
    line = one_line(capsys, prefix="comoe-peft train: stopped at step 0 of 3; nothing was kept")
    assert code == INTERRUPTED and "--save-steps" in line
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_libraries_load(monkeypatch, capsys):
    import comoe_peft.experiments.cli as cli

    def interrupted(args, rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert main(["eval", "some-run"]) == INTERRUPTED
    one_line(capsys, prefix="comoe-peft eval: stopped while loading, before the command started (Ctrl-C)")


def test_too_old_a_trl_is_one_line(monkeypatch, capsys, tmp_path):
    """Forced beside a trl older than CoMoESFTTrainer's minimum (the experiments extra asks for >= 1.9), `train`
    says so in one line instead of a traceback."""
    import comoe_peft.tuner.versions as versions

    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: "0.24.0" if name == "trl" else real(name))
    monkeypatch.delitem(sys.modules, "comoe_peft.training.sft", raising=False)  # imported again: checks again
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 2
    line = one_line(capsys)
    assert line == ("comoe-peft: error: CoMoESFTTrainer needs trl>=1.9, found trl 0.24.0: pip install 'trl>=1.9' "
                    "(or use CoMoETrainer, the plain transformers.Trainer path, which needs no trl).")


@pytest.mark.slow
def test_ctrl_c_during_a_checkpointed_run_says_the_same_command_resumes_it(tmp_path, tiny_model_dir,
                                                                           examples_file):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "comoe_peft_launcher",
               *quick_args(tiny_model_dir, examples_file, run, "--save-steps", "2")]
    command[command.index("--max-steps") + 1] = "100000"  # stopped long before the end
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    checkpoints = str(tmp_path / ".run.partial" / "trainer" / "checkpoint-*" / "trainer_state.json")
    while not glob.glob(checkpoints) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert glob.glob(checkpoints), "no checkpoint was written in time"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED and "Traceback" not in err
    lines = [line for line in err.splitlines() if "comoe-peft" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("comoe-peft train: stopped at step ")
    assert "is kept in" in lines[0] and "the same command resumes the run" in lines[0]
    assert not run.exists() and any(Path(tmp_path, ".run.partial", "trainer").glob("checkpoint-*"))
