"""`comoe-peft train --load-in-4bit / --load-in-8bit`: validated before anything loads, passed to model loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer
from test_qlora import width64_llama

import comoe_peft.experiments.jobs as jobs
import comoe_peft.experiments.pretrained as pretrained
from comoe_peft.experiments.cli import parse_train_args
from comoe_peft_launcher import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("width64-model")
    tokenizer = tiny_tokenizer()
    width64_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "examples.jsonl"
    rows = [{"task": "sentiment", "prompt": f"review {i}: a wonderful film", "choices": ["positive", "negative"],
             "answer": "positive" if i % 3 else "negative"} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "comoe-peft" in line]  # not progress
    assert len(lines) == 1 and lines[0].startswith("comoe-peft: error: "), lines
    return lines[0]


def test_flags_parse():
    options = parse_train_args(["--output-dir", "x", "--load-in-4bit"])
    assert options.load_in_4bit is True and options.load_in_8bit is False
    options = parse_train_args(["--output-dir", "x"])
    assert options.load_in_4bit is False and options.load_in_8bit is False


def test_both_flags_are_one_line_exit_2_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(jobs, "load_mixture", lambda *a, **k: pytest.fail("data was loaded"))
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--load-in-4bit", "--load-in-8bit",
                 "--output-dir", str(tmp_path / "run")])
    line = one_error_line(capsys)
    assert code == 2 and "--load-in-4bit and --load-in-8bit exclude each other" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_missing_bitsandbytes_says_what_to_install(tmp_path, capsys, monkeypatch, flag):
    real_find_spec = jobs.importlib.util.find_spec
    monkeypatch.setattr(jobs.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(jobs, "load_mixture", lambda *a, **k: pytest.fail("data was loaded"))
    code = main(["train", flag, "--output-dir", str(tmp_path / "run")])
    line = one_error_line(capsys)
    assert code == 2 and f"{flag} needs bitsandbytes" in line and "pip install bitsandbytes" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, expected", [("--load-in-4bit", "4bit"), ("--load-in-8bit", "8bit"), (None, None)])
def test_flags_reach_model_loading(tmp_path, capsys, monkeypatch, model_dir, examples_file, flag, expected):
    seen = {}

    def fake_load(path, dtype=torch.float32, cache_dir=None, **kwargs):
        seen.update(kwargs, path=path)
        raise ValueError("stop after the call")  # the job turns it into its one-line error

    monkeypatch.setattr(pretrained, "load_model_and_tokenizer", fake_load)
    argv = ["train", "--model", str(model_dir), "--dataset", str(examples_file), "--test-size", "4",
            "--output-dir", str(tmp_path / "run")] + ([flag] if flag else [])
    assert main(argv) == 2 and "stop after the call" in one_error_line(capsys)
    assert seen["path"] == str(model_dir)
    if expected is None:
        assert "quantization_config" not in seen
        return
    config = seen["quantization_config"]
    assert (config.load_in_4bit, config.load_in_8bit) == (expected == "4bit", expected == "8bit")
    if expected == "4bit":
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.float32  # CPU
    assert seen["device_map"] == "cpu"


@pytest.mark.slow
def test_quick_run_on_a_4bit_base_trains_and_evaluates(tmp_path, model_dir, examples_file, capsys):
    import bitsandbytes as bnb

    run = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--dataset", str(examples_file), "--preset", "quick",
                 "--max-steps", "2", "--test-size", "4", "--rank", "2", "--load-in-4bit", "--output-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "run_config.json").read_text())
    assert config["options"]["load_in_4bit"] is True and config["options"]["load_in_8bit"] is False
    assert main(["eval", str(run)]) == 0
    model, _ = jobs.load_run_model(run, config)  # eval loads the base the adapter was trained on
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), bnb.nn.Linear4bit)
