"""Tests of comoe_peft.experiments.hub_datasets with rows shaped like the hub datasets (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from comoe_peft.experiments import hub_datasets as hub
from comoe_peft.experiments.data import format_prompt

ARC = {
    "id": "Mercury_1",
    "question": "Which is a source of heat?",
    "choices": {"text": ["ice", "the Sun", "snow", "rain"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
BOOLQ = {"question": "is the sun a star", "answer": True, "passage": "The Sun is the star at the center ..."}
OBQA = {
    "id": "7-980",
    "question_stem": "The sun is responsible for",
    "choices": {"text": ["puppies", "plants sprouting", "cars", "rocks"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
PIQA = {"goal": "Dry wet shoes.", "sol1": "Put them in a fridge.", "sol2": "Stuff them with paper.", "label": 1}
SIQA = {
    "context": "Cameron had a barbecue.",
    "question": "How would others feel?",
    "answerA": "bored",
    "answerB": "happy",
    "answerC": "angry",
    "label": "2",
}
HELLASWAG = {
    "ind": 4,
    "activity_label": "Removing ice from car",
    "ctx_a": "Then, the man writes over the snow.",
    "ctx_b": "then",
    "ctx": "Then, the man writes over the snow. then",
    "endings": ["he leaves.", "he cleans the car.", "he sings.", "he sleeps."],
    "source_id": "activitynet~v_-1IBHYS3L-Y",
    "split": "train",
    "split_type": "indomain",
    "label": "1",
}
WINOGRANDE = {
    "sentence": "Sarah was a better surgeon than Maria so _ got the easy cases.",
    "option1": "Sarah",
    "option2": "Maria",
    "answer": "2",
}


@pytest.mark.parametrize(
    "mapper, row, prompt, choices, answer",
    [
        (
            hub.arc_row,
            ARC,
            (
                "Please choose the correct answer to the question: Which is a source of heat? (A) ice (B) the Sun "
                "(C) snow (D) rain"
            ),
            ["A", "B", "C", "D"],
            "B",
        ),
        (
            hub.boolq_row,
            BOOLQ,
            "Please answer the following question with true or false: is the sun a star?",
            ["true", "false"],
            "true",
        ),
        (
            hub.openbookqa_row,
            OBQA,
            (
                "Please choose the correct answer to the question: The sun is responsible for (A) puppies "
                "(B) plants sprouting (C) cars (D) rocks"
            ),
            ["A", "B", "C", "D"],
            "B",
        ),
        (
            hub.piqa_row,
            PIQA,
            (
                "Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
                "appropriate solution to achieve the task:\nDry wet shoes.\n\n(A) Put them in a fridge.\n"
                "(B) Stuff them with paper."
            ),
            ["A", "B"],
            "B",
        ),
        (
            hub.siqa_row,
            SIQA,
            (
                "Please choose the correct answer to the question.\nQuestion: Cameron had a barbecue. How would "
                "others feel?\n(A) bored\n(B) happy\n(C) angry"
            ),
            ["A", "B", "C"],
            "B",
        ),
        (
            hub.hellaswag_row,
            HELLASWAG,
            (
                "Please choose the correct ending to complete the given sentence.\nSentence: Removing ice from car. "
                "Then, the man writes over the snow. then\n(A) he leaves.\n(B) he cleans the car.\n(C) he sings.\n"
                "(D) he sleeps."
            ),
            ["A", "B", "C", "D"],
            "B",
        ),
        (
            hub.winogrande_row,
            WINOGRANDE,
            (
                "Please choose the correct answer to fill in the blank to complete the given sentence.\n"
                "Sentence: Sarah was a better surgeon than Maria so _ got the easy cases.\n(A) Sarah\n(B) Maria"
            ),
            ["A", "B"],
            "B",
        ),
    ],
)
def test_row_mapping(mapper, row: dict, prompt: str, choices: list[str], answer: str) -> None:
    assert mapper(row) == {"prompt": prompt, "choices": choices, "answer": answer}


def test_labels_in_other_shapes() -> None:
    assert hub.siqa_row({**SIQA, "label": "3\n"})["answer"] == "C"  # old hub versions carried a newline
    assert hub.hellaswag_row({**HELLASWAG, "label": 3})["answer"] == "D"  # some mirrors store ints
    assert hub.boolq_row({**BOOLQ, "answer": False})["answer"] == "false"
    numeric = {**ARC, "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert hub.arc_row(numeric)["choices"] == ["1", "2", "3"] and hub.arc_row(numeric)["answer"] == "3"


@pytest.mark.parametrize(
    "mapper, row",
    [
        (hub.hellaswag_row, {**HELLASWAG, "label": ""}),
        (hub.winogrande_row, {**WINOGRANDE, "answer": ""}),
        (hub.piqa_row, {**PIQA, "label": -1}),
        (hub.siqa_row, {**SIQA, "label": "4"}),
    ],
)
def test_unlabelled_rows_are_rejected_with_advice(mapper, row: dict) -> None:
    with pytest.raises(ValueError, match="is not a valid option \\(unlabelled test split\\?\\); use a labelled split"):
        mapper(row)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_benchmark_from_local_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "siqa.jsonl", [SIQA, {**SIQA, "label": "1"}])
    dataset = hub.load_benchmark("siqa", "validation", data_files=path)
    assert dataset.column_names == ["task", "prompt", "choices", "answer"]
    assert dataset["task"] == ["siqa", "siqa"]
    assert dataset["answer"] == ["B", "A"]
    assert format_prompt(dataset[0]).endswith("(C) angry\nOptions:\n- A\n- B\n- C\nAnswer:")


def test_load_benchmark_from_parquet_split_dict(tmp_path: Path) -> None:
    Dataset.from_list([ARC, ARC]).to_parquet(str(tmp_path / "train.parquet"))
    Dataset.from_list([{**ARC, "answerKey": "C"}]).to_parquet(str(tmp_path / "test.parquet"))
    files = {"train": tmp_path / "train.parquet", "test": [tmp_path / "test.parquet"]}
    assert hub.load_benchmark("arc-c", "test", data_files=files)["answer"] == ["C"]
    assert hub.load_benchmark("arc-c", "train", data_files=files).num_rows == 2
    with pytest.raises(ValueError, match="data_files has no split 'validation'"):
        hub.load_benchmark("arc-c", "validation", data_files=files)


def test_load_benchmark_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'; available: arc-e, arc-c, boolq"):
        hub.load_benchmark("mmlu", "test")
    with pytest.raises(ValueError, match="no such file"):
        hub.load_benchmark("piqa", "train", data_files=tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="must be .json/.jsonl files or .parquet files"):
        hub.load_benchmark("piqa", "train", data_files=tmp_path / "piqa.csv")


def test_load_benchmark_from_hub_uses_id_config_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def cached(name: str, config: object = None, split: object = None) -> Dataset:
        calls.append((name, config, split))
        return Dataset.from_list([WINOGRANDE])

    monkeypatch.setattr(datasets, "load_dataset", cached)
    assert hub.load_benchmark("winogrande", "validation")["answer"] == ["B"]
    assert calls == [("allenai/winogrande", "winogrande_debiased", "validation")]


def test_load_benchmark_offline_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'google/boolq' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="must already be in the Hugging Face cache"):
        hub.load_benchmark("boolq", "train")


def test_every_benchmark_has_a_mapper_and_eval_split() -> None:
    assert set(hub.BENCHMARKS) == {"arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande"}
    assert {b.eval_split for b in hub.BENCHMARKS.values()} <= {"test", "validation"}
    assert hub.BENCHMARKS["arc-e"].config == "ARC-Easy" and hub.BENCHMARKS["obqa"].config == "main"
