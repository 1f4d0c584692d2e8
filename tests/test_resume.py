"""Run folders that survive a stop (`--save-steps`), the `base` method, and routing measured during training."""

from __future__ import annotations

import json
import math

import pytest

from comoe_peft.experiments import jobs
from comoe_peft_launcher import main
from comoe_peft.experiments.runs import partial_dir


def train_args(model_dir, examples, run_dir, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(examples), "--preset", "quick", "--test-size", "4",
            "--rank", "2", "--output-dir", str(run_dir), *extra]


def error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "comoe-peft" in line]
    assert len(err) == 1 and err[0].startswith("comoe-peft: error: "), err
    return err[0]


def losses(run_dir):
    history = json.loads((run_dir / "log_history.json").read_text())
    return {e["step"]: e["loss"] for e in history if "loss" in e}


class StopAfter:
    """A callback that interrupts training after step `step` (as Ctrl-C would)."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):  # every other callback event does nothing
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, tiny_model_dir, examples_file):
    common = ["--method", "comoe", "--max-steps", "6", "--save-steps", "2", "--routing-eval-steps", "2", "5", "6"]
    assert main(train_args(tiny_model_dir, examples_file, tmp_path / "whole", *common)) == 0
    whole = json.loads((tmp_path / "whole" / "run_config.json").read_text())
    assert whole["resumed_from_step"] is None
    assert not list((tmp_path / "whole" / "trainer").glob("checkpoint-*")), "a finished run drops its checkpoints"

    # the same run, stopped after step 5 (checkpoints at 2 and 4 are written), then started again
    build = jobs.build_trainer

    def build_and_stop(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(StopAfter(5))
        return trainer

    monkeypatch.setattr(jobs, "build_trainer", build_and_stop)
    with pytest.raises(KeyboardInterrupt):
        jobs.train(jobs.TrainOptions(output_dir=str(tmp_path / "cut"), method="comoe", dataset=str(examples_file),
                                     model=str(tiny_model_dir), preset="quick", test_size=4, rank=2, max_steps=6,
                                     save_steps=2, routing_eval_steps=[2, 5, 6]))
    partial = partial_dir(tmp_path / "cut")
    assert not (tmp_path / "cut").exists() and (partial / "trainer" / "checkpoint-4").is_dir()
    monkeypatch.setattr(jobs, "build_trainer", build)

    assert main(train_args(tiny_model_dir, examples_file, tmp_path / "cut", *common)) == 0
    resumed = json.loads((tmp_path / "cut" / "run_config.json").read_text())
    assert resumed["resumed_from_step"] == 4 and not partial.exists()
    assert 0 < resumed["train_cpu_time_s"], "the CPU time of the steps before the stop is counted too"
    cut_losses, whole_losses = losses(tmp_path / "cut"), losses(tmp_path / "whole")
    assert sorted(cut_losses) == [1, 2, 3, 4, 5, 6], "the log history runs on from the checkpoint, nothing repeated"
    for step in (5, 6):  # steps trained after the resume: same data order, optimizer and RNG state
        assert cut_losses[step] == pytest.approx(whole_losses[step], rel=1e-4, abs=1e-5)

    history = json.loads((tmp_path / "cut" / "routing_history.json").read_text())
    assert [e["step"] for e in history["history"]] == [2, 5, 6], "the point before the stop came back from step 4"
    reference = json.loads((tmp_path / "whole" / "routing_history.json").read_text())["history"]
    for got, want in zip(history["history"], reference):
        assert 0 < got["routing_entropy"] <= 1.3863 + 1e-4  # log 4 = uniform over 4 experts
        assert got["routing_entropy"] == pytest.approx(want["routing_entropy"], rel=1e-4)
        assert got["mean_js_between_tasks"] == pytest.approx(want["mean_js_between_tasks"], rel=1e-3, abs=1e-7)
        assert set(got["per_task_entropy"]) == {"sentiment", "arithmetic"}


def test_an_unfinished_run_is_only_resumed_with_the_same_options(tmp_path, capsys, tiny_model_dir, examples_file):
    partial = partial_dir(tmp_path / "run")
    partial.mkdir()
    options = jobs.TrainOptions(output_dir=str(tmp_path / "run"), dataset=str(examples_file), preset="quick",
                                model=str(tiny_model_dir), test_size=4, rank=2, max_steps=6, save_steps=2).resolved()
    import dataclasses

    (partial / "train_options.json").write_text(json.dumps(dataclasses.asdict(options) | {"max_steps": 8}))
    (partial / "trainer" / "checkpoint-2").mkdir(parents=True)
    assert main(train_args(tiny_model_dir, examples_file, tmp_path / "run", "--max-steps", "6", "--save-steps",
                           "2")) == 2
    line = error_line(capsys)
    assert "unfinished run started with other settings" in line and "max_steps: stored 8, asked 6" in line
    assert (partial / "trainer" / "checkpoint-2").is_dir(), "nothing of the unfinished run is removed"


@pytest.mark.parametrize("extra, message", [
    (["--method", "base", "--max-steps", "3"], "trains nothing"),
    (["--method", "comoe", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["--method", "comoe", "--save-steps", "0"], "--save-steps must be at least 1"),
    (["--method", "lora", "--routing-eval-steps", "2"], "has none"),
    (["--method", "lora", "--router-lr-multiplier", "10"], "is for comoe / moe"),
    (["--method", "moe", "--router-lr-multiplier", "0"], "must be positive"),
])
def test_bad_step_options_are_one_line_exit_2_before_anything_is_written(tmp_path, capsys, tiny_model_dir,
                                                                          examples_file, extra, message):
    assert main(train_args(tiny_model_dir, examples_file, tmp_path / "run", *extra)) == 2
    assert message in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_base_run_scores_the_untrained_model_on_the_same_split(tmp_path, capsys, tiny_model_dir, examples_file):
    assert main(train_args(tiny_model_dir, examples_file, tmp_path / "base", "--method", "base")) == 0
    config = json.loads((tmp_path / "base" / "run_config.json").read_text())
    assert config["method"] == "base" and config["options"]["max_steps"] == 0
    assert config["trainable_parameters"] == 0 and not (tmp_path / "base" / "adapter").exists()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "base")]) == 0
    assert "sentiment" in capsys.readouterr().out
    results = json.loads((tmp_path / "base" / "eval_results.json").read_text())
    assert results["sentiment"]["n"] == 4 and 0 <= results["overall"]["accuracy"] <= 1

    # the base model's scores are those of the base model itself, evaluated directly with the same scorer
    from datasets import load_from_disk

    from comoe_peft.experiments.lm_eval_tasks import evaluate_examples
    from comoe_peft.experiments.pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    direct = evaluate_examples(model.eval(), tokenizer, load_from_disk(str(tmp_path / "base" / "data" / "test")),
                               tmp_path / "direct-tasks", batch_size=16)
    assert direct["overall"]["accuracy"] == results["overall"]["accuracy"]
    assert main(["analyze", str(tmp_path / "base")]) == 2
    assert "has no experts to analyse" in error_line(capsys)


@pytest.mark.parametrize("flag, option", [("--padding-free", "padding_free"), ("--bf16", "bf16")])
def test_cheaper_settings_train_and_are_recorded(tmp_path, monkeypatch, tiny_model_dir, examples_file, flag, option):
    built = []
    build = jobs.build_trainer
    monkeypatch.setattr(jobs, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, examples_file, run, "--method", "moe", "--max-steps", "2", flag,
                           "--routing-eval-steps", "2")) == 0
    config = json.loads((run / "run_config.json").read_text())
    assert config["options"][option] is True and config["train_cpu_time_s"] > 0
    # padding-free rows keep their examples apart only without a KV cache (tests/test_trainer.py)
    assert built[0].model.config.use_cache is False
    assert all(math.isfinite(loss) for loss in losses(run).values())
    assert [e["step"] for e in json.loads((run / "routing_history.json").read_text())["history"]] == [2]
