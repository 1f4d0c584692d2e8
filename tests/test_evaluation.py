"""Evaluation through lm-evaluation-harness: the tasks written from a run's examples, lm-eval's predictions against a
per-row reference scorer, `comoe-peft eval` end to end and its errors, the results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comoe_peft.experiments.evaluation import format_table

CORPUS = [
    "Question: is the sky blue? Answer: yes",
    "Question: is grass red? Answer: no",
    "Review: great film. Sentiment: positive",
    "Review: boring plot. Sentiment: negative",
    "Add 2 and 3. Answer: 5\n",
    "the cat sat on the mat",
    "maybe yes maybe no",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained in memory on this file's sentences (no download)."""
    from conftest import tiny_tokenizer

    return tiny_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random Llama (hidden 64, 2 layers) over the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


MC_ROWS = [
    {"task": "sky", "prompt": "Question: is the sky blue?", "choices": ["yes", "no"], "answer": "yes"},
    {"task": "sky", "prompt": "Question: is grass red?", "choices": ["yes", "no", "maybe"], "answer": "no"},
    {
        "task": "sentiment",
        "prompt": "Review: a great film with a boring plot and the cat sat on the mat. Sentiment of it all?",
        "choices": ["positive", "negative", "the cat sat"],
        "answer": "negative",
    },
    {"task": "sentiment", "prompt": "Review: boring.", "choices": ["positive", "negative"], "answer": "negative"},
]


# the reference scorer: one unpadded forward per (prompt, choice), one generate per prompt


def _reference_loglikelihood(model, tokenizer, prompt: str, choice: str) -> float:
    """log p(" " + choice | prompt) from one unpadded forward over the whole text."""
    ctx = tokenizer(prompt).input_ids
    full = tokenizer(prompt + " " + choice).input_ids
    assert full[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full)))


def _reference_generation(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy text after `prompt` from one unpadded `generate`, cut at the first newline and stripped."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n", 1)[0].strip()


def _half_right_rows(model, tokenizer) -> list[dict]:
    """Rows whose answer is the reference prediction in even rows and another choice / text in odd rows: a scorer
    that predicts like the reference on every row gets exactly 0.5 on each task."""
    from comoe_peft.experiments.data import format_prompt

    prompts = ["Question: is the sky blue?", "Review: boring plot.", "Question: is grass red? maybe",
               "Review: a great film with the cat.", "Add 2 and 3.", "the cat sat on the"]
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"task": "bigbench:sky/mc", "prompt": prompt, "choices": ["yes", "no", "maybe yes"], "answer": "yes"}
        text = format_prompt(row)
        scores = [_reference_loglikelihood(model, tokenizer, text, c) for c in row["choices"]]
        best = max(range(3), key=scores.__getitem__)
        row["answer"] = row["choices"][best if i % 2 == 0 else (best + 1) % 3]
        rows.append(row)
        gen = {"task": "addition", "prompt": prompt, "choices": [], "answer": ""}
        predicted = _reference_generation(model, tokenizer, format_prompt(gen))
        gen["answer"] = (" " + predicted + " ") if i % 2 == 0 else predicted + " wrong"
        rows.append(gen)
    assert any(r["answer"].strip() for r in rows if not r["choices"]), "the tiny model generated only empty text"
    return rows


def test_written_tasks_hold_the_prompt_choices_and_answer(tmp_path):
    import yaml

    from comoe_peft.experiments.data import format_prompt
    from comoe_peft.experiments.lm_eval_tasks import write_tasks

    rows = MC_ROWS + [{"task": "bigbench:arith/3", "prompt": "What is 2 plus 3?", "choices": [], "answer": "5"}]
    names = write_tasks(rows, tmp_path / "tasks")
    assert names == {"comoe_bigbench_arith_3": "bigbench:arith/3", "comoe_sentiment": "sentiment", "comoe_sky": "sky"}
    assert json.loads((tmp_path / "tasks" / "tasks.json").read_text()) == names
    mc = yaml.safe_load((tmp_path / "tasks" / "comoe_sky.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["metric_list"][0]["metric"] == "acc"
    assert (mc["doc_to_text"], mc["doc_to_choice"], mc["doc_to_target"]) == ("text", "choices", "label")
    assert mc["target_delimiter"] == " "
    docs = [json.loads(line) for line in Path(mc["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert [d["text"] for d in docs] == [format_prompt(r) for r in MC_ROWS if r["task"] == "sky"]
    assert [(d["choices"], d["label"]) for d in docs] == [(["yes", "no"], 0), (["yes", "no", "maybe"], 1)]
    gen = yaml.safe_load((tmp_path / "tasks" / "comoe_bigbench_arith_3.yaml").read_text())
    assert gen["output_type"] == "generate_until" and gen["doc_to_target"] == "answer"
    assert gen["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    # writing again replaces the earlier tasks
    assert write_tasks(MC_ROWS[:1], tmp_path / "tasks") == {"comoe_sky": "sky"}
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["comoe_sky.jsonl", "comoe_sky.yaml", "tasks.json"]


def test_written_tasks_refuse_bad_rows(tmp_path):
    from comoe_peft.experiments.lm_eval_tasks import lm_eval_name, write_tasks

    mixed = [{"task": "a", "prompt": "1", "choices": ["yes"], "answer": "yes"},
             {"task": "a", "prompt": "2", "choices": [], "answer": "yes"}]
    with pytest.raises(ValueError, match="mixes"):
        write_tasks(mixed, tmp_path)
    with pytest.raises(ValueError, match="not one of the choices"):
        write_tasks([{"task": "a", "prompt": "1", "choices": ["yes", "no"], "answer": "perhaps"}], tmp_path)
    with pytest.raises(ValueError, match="empty"):
        write_tasks([], tmp_path)
    assert lm_eval_name("a:b", taken={"comoe_a_b"}) == "comoe_a_b_2"


@pytest.mark.parametrize("arch", ["llama", "llama-comoe"])
def test_lm_eval_predicts_like_the_reference_scorer(arch, model, tokenizer, tmp_path):
    """Same prompts, same log-likelihood choice and greedy exact match as a per-row unpadded reference (what the
    removed hand-written scorer computed, batched), on a plain and on a peft-wrapped CoMoE model: every task at
    exactly 0.5."""
    from comoe_peft.experiments.lm_eval_tasks import evaluate_examples

    if arch == "llama-comoe":
        from peft import get_peft_model

        from comoe_peft import CoMoEConfig

        torch.manual_seed(1)
        config = CoMoEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, init_weights=False)
        model = get_peft_model(model, config).eval()
    try:
        rows = _half_right_rows(model, tokenizer)
        results = evaluate_examples(model, tokenizer, rows, tmp_path / "tasks", batch_size=4)
        assert {t: r["accuracy"] for t, r in results.items()} == {"addition": 0.5, "bigbench:sky/mc": 0.5,
                                                                  "overall": 0.5}
        assert results["addition"] | {"accuracy": 0, "stderr": 0} == {
            "accuracy": 0, "n": 6, "kind": "generation", "metric": "exact_match", "stderr": 0}
        assert results["bigbench:sky/mc"]["kind"] == "multiple_choice" and results["bigbench:sky/mc"]["n"] == 6
    finally:
        if arch == "llama-comoe":
            model.unload()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_dir, examples_file):
    """A `--method base` run of the tiny model on the CLI examples (4 held-out per task)."""
    from comoe_peft_launcher import main

    run = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(examples_file), "--preset", "quick",
                 "--test-size", "4", "--method", "base", "--output-dir", str(run)]) == 0
    return run


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "comoe-peft" in line]
    assert len(err) == 1 and err[0].startswith("comoe-peft: error: "), err
    return err[0]


def test_cli_eval_scores_the_held_out_split_through_lm_eval(base_run, capsys):
    from comoe_peft_launcher import main

    capsys.readouterr()
    assert main(["eval", str(base_run)]) == 0
    out = capsys.readouterr().out
    assert "sentiment" in out and "arithmetic" in out
    results = json.loads((base_run / "eval_results.json").read_text())
    assert results["sentiment"]["metric"] == "acc" and results["sentiment"]["n"] == 4
    assert results["arithmetic"]["metric"] == "exact_match" and results["arithmetic"]["kind"] == "generation"
    names = json.loads((base_run / "lm_eval_tasks" / "tasks.json").read_text())
    assert names == {"comoe_arithmetic": "arithmetic", "comoe_sentiment": "sentiment"}
    assert (base_run / "lm_eval_tasks" / "comoe_sentiment.yaml").is_file()
    # --limit scores fewer examples and leaves the stored results alone
    assert main(["eval", str(base_run), "--limit", "2", "--overwrite"]) == 0
    assert json.loads((base_run / "eval_results.json").read_text()) == results


def test_cli_eval_unknown_or_missing_lm_eval_task_is_one_line(base_run, capsys):
    from comoe_peft_launcher import main

    capsys.readouterr()
    assert main(["eval", str(base_run), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task 'no_such_task_xyz'" in _error_line(capsys)
    assert main(["eval", str(base_run), "--tasks", "arc_easy"]) == 2  # offline, ARC not in the local cache
    line = _error_line(capsys)
    assert "lm-eval task 'arc_easy' could not load its data offline" in line
    assert main(["eval", str(base_run), "--tasks", " , "]) == 2
    assert "--tasks needs at least one" in _error_line(capsys)


# table


def test_format_table_single_and_several_methods():
    one = {
        "b": {"accuracy": 0.5, "n": 2, "kind": "generation"},
        "a": {"accuracy": 0.25, "n": 4, "kind": "multiple_choice"},
        "overall": {"accuracy": 0.375, "n": 6, "kind": "macro_mean"},
    }
    lines = format_table(one).splitlines()
    assert lines[0].split() == ["task", "kind", "n", "accuracy"]
    assert [line.split()[0] for line in lines[2:]] == ["a", "b", "overall"]
    assert lines[2].split()[-1] == "0.250"

    other = {"a": {"accuracy": 1.0, "n": 4, "kind": "multiple_choice"}}
    lines = format_table({"comoe": one, "lora": other}).splitlines()
    assert lines[0].split() == ["task", "kind", "n", "comoe", "lora"]
    assert lines[2].split()[-2:] == ["0.250", "1.000"]
    assert lines[3].split()[-2:] == ["0.500", "-"]


def test_cli_eval_without_lm_eval_installed_is_one_line(base_run, capsys, monkeypatch):
    import importlib.util

    from comoe_peft_launcher import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    capsys.readouterr()
    assert main(["eval", str(base_run), "--overwrite"]) == 2
    assert "pip install 'lm-eval" in _error_line(capsys)


def test_cli_eval_tasks_scores_lm_eval_tasks_that_are_local(base_run, capsys, monkeypatch, tmp_path):
    """`--tasks NAME` for a task lm-eval can load offline (here a local task standing in for lm-eval's index), the
    results kept under lm-eval's name and added to `lm_eval_results.json`."""
    from lm_eval.tasks import TaskManager

    from comoe_peft.experiments import lm_eval_tasks
    from comoe_peft_launcher import main

    rows = [{"task": "yes_no", "prompt": f"question {i}", "choices": ["yes", "no"], "answer": "yes"} for i in range(5)]
    lm_eval_tasks.write_tasks(rows, tmp_path / "index")
    monkeypatch.setattr(lm_eval_tasks, "_own_tasks",
                        lambda: TaskManager(include_path=str(tmp_path / "index"), include_defaults=False))
    capsys.readouterr()
    assert main(["eval", str(base_run), "--tasks", "comoe_yes_no"]) == 0
    assert "comoe_yes_no" in capsys.readouterr().out
    stored = json.loads((base_run / "lm_eval_results.json").read_text())
    assert set(stored) == {"comoe_yes_no"} and stored["comoe_yes_no"]["n"] == 5
    assert stored["comoe_yes_no"]["metric"] == "acc"
