"""Evaluation: choice log-likelihoods, batching and padding invariance, generation, accuracy bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comoe_peft.experiments import evaluation
from comoe_peft.experiments.evaluation import (
    choice_loglikelihoods,
    clean_generation,
    encode_pair,
    evaluate,
    format_table,
    generate_answers,
    score_choices,
    split_context_continuation,
)

CORPUS = [
    "Question: is the sky blue? Answer: yes",
    "Question: is grass red? Answer: no",
    "Review: great film. Sentiment: positive",
    "Review: boring plot. Sentiment: negative",
    "Add 2 and 3. Answer: 5\n",
    "the cat sat on the mat",
    "maybe yes maybe no",
] * 5


def prompt_fn(row: dict) -> str:
    return f"{row['prompt']}\nAnswer:"


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


# tokenisation at the prompt / choice boundary


def test_split_moves_trailing_space_into_the_continuation():
    assert split_context_continuation("Answer: ", "yes") == ("Answer:", " yes")
    assert split_context_continuation("Answer:", "yes") == ("Answer:", " yes")
    assert split_context_continuation("Answer:\n", "yes") == ("Answer:\n", "yes")


def test_encode_pair_keeps_the_whole_text_tokenisation(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer:", " yes")
    assert ctx + cont == tokenizer("Answer: yes").input_ids
    assert tokenizer.convert_ids_to_tokens(cont) == ["Ġyes"]


# log-likelihood scoring


def _reference_loglikelihood(model, tokenizer, prompt: str, choice: str) -> float:
    """log p(" " + choice | prompt) from one unpadded forward over the whole text."""
    ctx = tokenizer(prompt).input_ids
    full = tokenizer(prompt + " " + choice).input_ids
    assert full[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full)))


def test_loglikelihoods_match_an_unpadded_reference(model, tokenizer):
    scores = choice_loglikelihoods(model, tokenizer, MC_ROWS, prompt_fn, batch_size=16)
    for row, row_scores in zip(MC_ROWS, scores):
        expected = [_reference_loglikelihood(model, tokenizer, prompt_fn(row), c) for c in row["choices"]]
        assert row_scores == pytest.approx(expected, abs=1e-4)


def test_choices_share_their_prompt_s_cache(model, tokenizer, monkeypatch):
    """A model with a key-value cache runs each prompt once; the full-sequence fallback is not used."""
    calls = []
    monkeypatch.setattr(evaluation, "_continuation_logprobs", lambda *a: pytest.fail("fallback used"))
    original_forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    choice_loglikelihoods(model, tokenizer, MC_ROWS, prompt_fn, batch_size=16)
    assert calls[0][0] == len(MC_ROWS), "one sequence per prompt, not one per (prompt, choice)"
    assert len(calls) <= 2


def test_batched_scores_equal_per_row_scores(model, tokenizer):
    batched = choice_loglikelihoods(model, tokenizer, MC_ROWS, prompt_fn, batch_size=16)
    for row, row_scores in zip(MC_ROWS, batched):
        alone = choice_loglikelihoods(model, tokenizer, [row], prompt_fn, batch_size=1)[0]
        assert len(alone) == len(row["choices"])
        assert row_scores == pytest.approx(alone, abs=1e-4)


def test_padding_does_not_change_scores(model, tokenizer):
    short, long = MC_ROWS[3], MC_ROWS[2]
    alone = choice_loglikelihoods(model, tokenizer, [short], prompt_fn, batch_size=1)[0]
    # in one batch with a much longer row, the short row's sequences are right-padded
    padded = choice_loglikelihoods(model, tokenizer, [short, long], prompt_fn, batch_size=8)[0]
    assert padded == pytest.approx(alone, abs=1e-4)
    assert all(s < 0 for s in alone)


def test_scoring_restores_training_mode(model, tokenizer):
    model.train()
    try:
        score_choices(model, tokenizer, MC_ROWS[:1], prompt_fn)
        assert model.training
    finally:
        model.eval()


def test_rows_without_choices_are_rejected(model, tokenizer):
    row = {"task": "gen", "prompt": "Add 2 and 3.", "choices": [], "answer": "5"}
    with pytest.raises(ValueError, match="generate_answers"):
        score_choices(model, tokenizer, [row], prompt_fn)


# a stub model that prefers known tokens


class PreferTokens(torch.nn.Module):
    """Logits +10 for the given token ids at every position, 0 elsewhere."""

    def __init__(self, vocab: int, preferred: list[int]):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[preferred] = 10.0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))  # no key-value cache


@pytest.fixture
def prefers_yes(tokenizer):
    return PreferTokens(len(tokenizer), tokenizer(" yes").input_ids)


def test_score_choices_picks_the_preferred_choice(prefers_yes, tokenizer):
    rows = [
        {"task": "t", "prompt": "p", "choices": ["no", "yes"], "answer": "yes"},
        {"task": "t", "prompt": "q", "choices": ["yes", "no", "maybe"], "answer": "no"},
    ]
    assert score_choices(prefers_yes, tokenizer, rows, prompt_fn, batch_size=2) == [1, 0]


def test_evaluate_counts_accuracy_per_task(prefers_yes, tokenizer, monkeypatch):
    yes_no = lambda answer: {"choices": ["yes", "no"], "answer": answer}
    rows = [
        {"task": "a", "prompt": "1", **yes_no("yes")},
        {"task": "a", "prompt": "2", **yes_no("no")},
        {"task": "a", "prompt": "3", **yes_no("yes")},
        {"task": "b", "prompt": "4", **yes_no("no")},
        {"task": "gen", "prompt": "x", "choices": [], "answer": " 5 "},
        {"task": "gen", "prompt": "y", "choices": [], "answer": "7"},
    ]
    generated = {"x\nAnswer:": "5", "y\nAnswer:": "8"}
    monkeypatch.setattr(evaluation, "generate_answers", lambda m, t, rs, fn, *a, **k: [generated[fn(r)] for r in rs])
    results = evaluate(prefers_yes, tokenizer, rows, prompt_fn, batch_size=3, progress=False)
    assert results["a"] == {"accuracy": pytest.approx(2 / 3), "n": 3, "kind": "multiple_choice"}
    assert results["b"] == {"accuracy": 0.0, "n": 1, "kind": "multiple_choice"}
    assert results["gen"] == {"accuracy": 0.5, "n": 2, "kind": "generation"}
    assert results["overall"]["accuracy"] == pytest.approx((2 / 3 + 0.0 + 0.5) / 3)
    assert results["overall"]["n"] == 6


def test_evaluate_rejects_bad_rows(prefers_yes, tokenizer):
    mixed = [
        {"task": "a", "prompt": "1", "choices": ["yes"], "answer": "yes"},
        {"task": "a", "prompt": "2", "choices": [], "answer": "yes"},
    ]
    with pytest.raises(ValueError, match="mixes"):
        evaluate(prefers_yes, tokenizer, mixed, prompt_fn, progress=False)
    not_a_choice = [{"task": "a", "prompt": "1", "choices": ["yes", "no"], "answer": "perhaps"}]
    with pytest.raises(ValueError, match="not one of the choices"):
        evaluate(prefers_yes, tokenizer, not_a_choice, prompt_fn, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(prefers_yes, tokenizer, [], prompt_fn, progress=False)


# generation


def test_clean_generation_cuts_at_newline():
    assert clean_generation("  5 \nQuestion: next") == "5"
    assert clean_generation("\nfoo") == ""


def test_batched_generation_equals_one_by_one(model, tokenizer):
    rows = [
        {"task": "g", "prompt": "Add 2 and 3.", "choices": [], "answer": "5"},
        {
            "task": "g",
            "prompt": "Review: a great film with a boring plot, the cat sat on the mat.",
            "choices": [],
            "answer": "x",
        },
        {"task": "g", "prompt": "the cat", "choices": [], "answer": "y"},
    ]
    batched = generate_answers(model, tokenizer, rows, prompt_fn, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, tokenizer, [r], prompt_fn, max_new_tokens=6, batch_size=1)[0] for r in rows]
    assert batched == alone
    assert all("\n" not in text and text == text.strip() for text in batched)


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


@pytest.mark.parametrize("arch", ["gpt2", "llama-comoe"])
def test_shared_prompt_scores_equal_full_sequence_scores(arch, tokenizer, monkeypatch):
    """Other architectures and a peft-wrapped CoMoE model: the cached path gives the full-sequence scores."""
    from conftest import tiny_gpt2, tiny_llama

    if arch == "gpt2":
        model = tiny_gpt2(vocab=len(tokenizer)).eval()
    else:
        from peft import get_peft_model

        from comoe_peft import CoMoEConfig

        config = CoMoEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, init_weights=False)
        model = get_peft_model(tiny_llama(vocab=len(tokenizer)), config).eval()
    cached = choice_loglikelihoods(model, tokenizer, MC_ROWS, prompt_fn, batch_size=3)
    monkeypatch.setattr(evaluation, "_shared_context_logprobs", lambda *a: None)  # force the fallback
    full = choice_loglikelihoods(model, tokenizer, MC_ROWS, prompt_fn, batch_size=3)
    for a, b in zip(cached, full):
        assert a == pytest.approx(b, abs=1e-4)


# lm-evaluation-harness: the run's examples as lm-eval tasks


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
    """Same prompts, same log-likelihood choice and greedy exact match as a per-row unpadded reference (and as the
    old hand-written scorer), on a plain and on a peft-wrapped CoMoE model: every task at exactly 0.5."""
    from comoe_peft.experiments.data import format_prompt
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
        old = evaluate(model, tokenizer, rows, format_prompt, batch_size=4, progress=False)
        assert {t: r["accuracy"] for t, r in old.items()} == {t: r["accuracy"] for t, r in results.items()}
    finally:
        if arch == "llama-comoe":
            model.unload()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_dir, examples_file):
    """A `--method base` run of the tiny model on the CLI examples (4 held-out per task)."""
    from comoe_peft.experiments.cli import main

    run = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(examples_file), "--preset", "quick",
                 "--test-size", "4", "--method", "base", "--output-dir", str(run)]) == 0
    return run


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "comoe-peft" in line]
    assert len(err) == 1 and err[0].startswith("comoe-peft: error: "), err
    return err[0]


def test_cli_eval_scores_the_held_out_split_through_lm_eval(base_run, capsys):
    from comoe_peft.experiments.cli import main

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
    from comoe_peft.experiments.cli import main

    capsys.readouterr()
    assert main(["eval", str(base_run), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task 'no_such_task_xyz'" in _error_line(capsys)
    assert main(["eval", str(base_run), "--tasks", "arc_easy"]) == 2  # offline, ARC not in the local cache
    line = _error_line(capsys)
    assert "lm-eval task 'arc_easy' could not load its data offline" in line
    assert main(["eval", str(base_run), "--tasks", " , "]) == 2
    assert "--tasks needs at least one" in _error_line(capsys)
