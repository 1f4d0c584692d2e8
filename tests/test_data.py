"""Tests of comoe_peft.experiments.data: schema validation, loading user files, per-task splits, SFT formatting."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict, List, Value
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from comoe_peft.experiments import data
from comoe_peft.experiments.data import (
    format_example,
    format_prompt,
    load_examples,
    pad_token_id,
    to_sft_dataset,
    train_test_split_per_task,
    validate_examples,
)

MC = {"task": "sentiment", "prompt": "Review: great food.", "choices": ["positive", "negative"], "answer": "positive"}
GEN = {"task": "addition", "prompt": "What is 12 plus 30?", "choices": [], "answer": "42"}


def rows(n_per_task: int = 10, tasks: tuple[str, ...] = ("a", "b", "c")) -> list[dict]:
    """Generation rows whose prompt encodes (task, index), so splits can be checked by content."""
    return [
        {"task": t, "prompt": f"{t} question {i}", "choices": [], "answer": str(i)}
        for t in tasks
        for i in range(n_per_task)
    ]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


# validation


@pytest.mark.parametrize(
    "bad_rows, expected",
    [
        ([{"task": "t", "prompt": "p", "choices": []}], "missing column(s) ['answer']"),
        ([MC, {**GEN, "answer": 42}], "row 1: 'answer' must be a str"),
        ([MC, GEN, {**MC, "answer": "neutral"}], "row 2: answer 'neutral' is not one of the choices"),
        ([{**MC, "choices": "positive"}], "'choices' must be a list of str"),
        ([{**MC, "choices": ["positive", "positive"]}], "'choices' has duplicates"),
        ([{**GEN, "prompt": "  "}], "row 0: 'prompt' is empty"),
        ([], "the dataset is empty"),
    ],
)
def test_validate_rejects_bad_rows_with_a_precise_message(bad_rows: list[dict], expected: str) -> None:
    with pytest.raises(ValueError) as error:
        validate_examples(bad_rows, source="my.jsonl")
    assert expected in str(error.value)
    assert str(error.value).startswith("my.jsonl")


def test_validate_dataset_names_missing_columns_and_schema() -> None:
    dataset = Dataset.from_list([{"question": "q", "label": "x"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['task', 'prompt', 'choices', 'answer'\]") as error:
        validate_examples(dataset, source="hub")
    assert "choices (list[str], [] for generation tasks)" in str(error.value)


def test_validate_dataset_checks_answers_row_by_row() -> None:
    dataset = Dataset.from_list([MC, {**MC, "answer": "meh"}], features=data.EXAMPLE_FEATURES)
    with pytest.raises(ValueError, match="row 1: answer 'meh' is not one of the choices"):
        validate_examples(dataset, source="ds")
    validate_examples(Dataset.from_list([MC, GEN], features=data.EXAMPLE_FEATURES), source="ds")  # no error


# loading


def test_load_jsonl_file_validates_and_normalises_types(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", [GEN, {**GEN, "prompt": "What is 1 plus 1?", "answer": "2"}])
    dataset = load_examples(str(path))
    assert dataset.num_rows == 2
    # all-empty choices are inferred as list<null> by the JSON reader; loading casts them to list<string>
    assert dataset.features["choices"] == List(Value("string"))
    assert dataset[0] == GEN


def test_load_json_array_and_parquet_files(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps([MC, GEN]))
    Dataset.from_list([MC, GEN], features=data.EXAMPLE_FEATURES).to_parquet(str(tmp_path / "rows.parquet"))
    assert load_examples(str(tmp_path / "rows.json"))["answer"] == ["positive", "42"]
    assert load_examples(str(tmp_path / "rows.parquet"))["task"] == ["sentiment", "addition"]


def test_load_folder_of_files_with_split_prefix(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [MC, GEN])
    write_jsonl(tmp_path / "test.jsonl", [GEN])
    assert load_examples(str(tmp_path)).num_rows == 3
    assert load_examples(str(tmp_path), split="test").num_rows == 1
    with pytest.raises(ValueError, match="no .json, .jsonl or .parquet file whose name starts with 'dev'"):
        load_examples(str(tmp_path), split="dev")


def test_load_save_to_disk_folders(tmp_path: Path) -> None:
    Dataset.from_list([MC, GEN]).save_to_disk(str(tmp_path / "single"))
    splits = DatasetDict(train=Dataset.from_list([MC, GEN]), test=Dataset.from_list([GEN]))
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(str(tmp_path / "single")).num_rows == 2
    assert load_examples(str(tmp_path / "dict"), split="test").num_rows == 1
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\]; pass split="):
        load_examples(str(tmp_path / "dict"))


def test_load_reports_the_bad_row_of_a_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [MC, {**MC, "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"bad.jsonl, row 1: answer 'maybe' is not one of the choices"):
        load_examples(str(path))


def test_load_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub must not be tried"))
    with pytest.raises(ValueError, match="no such file or folder"):
        load_examples(str(tmp_path / "absent.jsonl"))


def test_load_hub_failure_says_offline_needs_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/dataset' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError) as error:
        load_examples("someone/dataset", split="train")
    message = str(error.value)
    assert "'someone/dataset' is not a local file or folder" in message
    assert "must already be in the Hugging Face cache" in message
    assert "ConnectionError" in message


def test_load_hub_dataset_in_schema_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def cached(name: str, config: object = None, split: object = None) -> Dataset:
        calls.append((name, config, split))
        return Dataset.from_list([MC, GEN])

    monkeypatch.setattr(datasets, "load_dataset", cached)
    assert load_examples("someone/dataset", split="train").num_rows == 2
    assert calls == [("someone/dataset", None, "train")]


# splits


def test_split_is_per_task_disjoint_and_complete() -> None:
    dataset = Dataset.from_list(rows(10))
    split = train_test_split_per_task(dataset, test_size=3, seed=0)
    train, test = set(split["train"]["prompt"]), set(split["test"]["prompt"])
    assert not train & test
    assert train | test == set(dataset["prompt"])
    assert [split["test"]["task"].count(t) for t in "abc"] == [3, 3, 3]


def test_split_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    dataset = Dataset.from_list(rows(30))
    first = train_test_split_per_task(dataset, test_size=0.2, seed=1)["test"]["prompt"]
    again = train_test_split_per_task(dataset, test_size=0.2, seed=1)["test"]["prompt"]
    other = train_test_split_per_task(dataset, test_size=0.2, seed=2)["test"]["prompt"]
    assert first == again
    assert first != other
    assert len(first) == 18  # 20% of 30, per task


def test_split_of_a_task_does_not_depend_on_the_other_tasks() -> None:
    both = train_test_split_per_task(Dataset.from_list(rows(20, ("a", "b"))), test_size=5, seed=3)
    alone = train_test_split_per_task(Dataset.from_list(rows(20, ("a",))), test_size=5, seed=3)
    assert [p for p in both["test"]["prompt"] if p.startswith("a ")] == alone["test"]["prompt"]


def test_split_caps_training_rows_per_task() -> None:
    split = train_test_split_per_task(Dataset.from_list(rows(20)), test_size=2, seed=0, max_train_per_task=4)
    assert [split["train"]["task"].count(t) for t in "abc"] == [4, 4, 4]
    assert split["test"].num_rows == 6


@pytest.mark.parametrize(
    "test_size, match",
    [(10, "task 'a' has 10 examples: too few to hold out 10"), (0, "must be >= 1"), (1.5, "in \\(0, 1\\)")],
)
def test_split_rejects_impossible_sizes(test_size: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_test_split_per_task(Dataset.from_list(rows(10)), test_size=test_size, seed=0)


# text the model sees


def test_format_prompt_lists_choices_for_multiple_choice_only() -> None:
    assert format_prompt(MC) == "Review: great food.\nOptions:\n- positive\n- negative\nAnswer:"
    assert format_prompt(GEN) == "What is 12 plus 30?\nAnswer:"


def test_to_sft_dataset_gives_trl_prompt_completion_columns() -> None:
    sft = to_sft_dataset(Dataset.from_list([MC, GEN], features=data.EXAMPLE_FEATURES))
    assert sorted(sft.column_names) == ["completion", "prompt", "task"]
    assert sft["prompt"] == [format_prompt(MC), format_prompt(GEN)]
    assert sft["completion"] == [" positive", " 42"]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<|end|>": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), eos_token="<|end|>", unk_token="[UNK]"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def test_chat_template_only_when_asked() -> None:
    tokenizer = chat_tokenizer()
    assert format_example(GEN, tokenizer) == (format_prompt(GEN), " 42")  # plain unless use_chat_template
    prompt, completion = format_example(GEN, tokenizer, use_chat_template=True)
    assert prompt == "<|user|>What is 12 plus 30?\nAnswer:<|end|>\n<|assistant|>"
    assert completion == "42<|end|>"  # cut after EOS so TRL does not append a second one
    sft = to_sft_dataset(Dataset.from_list([GEN], features=data.EXAMPLE_FEATURES), tokenizer, use_chat_template=True)
    assert sft[0]["prompt"] == prompt


def test_chat_template_needs_a_tokenizer_with_one() -> None:
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        to_sft_dataset(Dataset.from_list([GEN], features=data.EXAMPLE_FEATURES), use_chat_template=True)


def test_pad_token_id_falls_back_to_eos_and_else_says_what_to_set():
    from types import SimpleNamespace

    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # id 0 is a real pad id
    with pytest.raises(ValueError, match="tokenizer.pad_token"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))
