"""The paper's commonsense benchmarks, mapped from their Hugging Face hub datasets to the example schema.

Prompts follow the MoE-PEFT / MixLoRA framework the paper builds on: the question and its options labelled
`(A)`, `(B)`, ... (BoolQ: `true` / `false`), and the answer is the option's label. `choices` holds the
labels, so `comoe_peft.experiments.data.format_prompt` adds the label list and `Answer:`. As in that framework, BoolQ
shows the question without its passage.

| name | hub dataset (config) | columns read | eval split |
|---|---|---|---|
| `arc-e` | `allenai/ai2_arc` (`ARC-Easy`) | `question`, `choices{text,label}`, `answerKey` | test |
| `arc-c` | `allenai/ai2_arc` (`ARC-Challenge`) | same | test |
| `boolq` | `google/boolq` | `question`, `answer` (bool) | validation |
| `obqa` | `allenai/openbookqa` (`main`) | `question_stem`, `choices{text,label}`, `answerKey` | test |
| `piqa` | `ybisk/piqa` | `goal`, `sol1`, `sol2`, `label` (0/1) | validation |
| `siqa` | `allenai/social_i_qa` | `context`, `question`, `answerA/B/C`, `label` "1"-"3" | validation |
| `hellaswag` | `Rowan/hellaswag` | `activity_label`, `ctx`, `endings`, `label` "0"-"3" | validation |
| `winogrande` | `allenai/winogrande` (`winogrande_debiased`) | `sentence`, `option1/2`, `answer` "1"/"2" | validation |

Nothing here downloads in tests: `load_benchmark(..., data_files=...)` reads local JSON / Parquet files
with the hub columns. Test splits of PIQA, SIQA, HellaSwag and WinoGrande are unlabelled and rejected.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from .data import EXAMPLE_FEATURES, load_hub_dataset, validate_examples

Row = Mapping[str, Any]
_LETTERS = string.ascii_uppercase
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# helpers


def _lettered(texts: Sequence[str], labels: Sequence[str] | None = None, sep: str = "\n") -> str:
    """`"\\n(A) first\\n(B) second"`: options with their labels (letters unless given)."""
    labels = labels or _LETTERS[: len(texts)]
    return "".join(f"{sep}({label}) {text}" for label, text in zip(labels, texts))


def _label_index(value: Any, n_options: int, first: int, benchmark: str) -> int:
    """0-based option index from a label such as `"2"` (`first` = the label of the first option)."""
    try:
        index = int(str(value).strip()) - first
    except ValueError:
        index = -1
    if not 0 <= index < n_options:
        raise ValueError(
            f"{benchmark}: label {value!r} is not a valid option (unlabelled test split?); "
            "use a labelled split such as 'train' or 'validation'"
        )
    return index


# one row mapping per benchmark: hub row -> {"prompt", "choices", "answer"}


def arc_row(row: Row) -> dict[str, Any]:
    """ARC-Easy / ARC-Challenge (`allenai/ai2_arc`); labels are `A`-`E` or `1`-`5` as in the data."""
    labels = list(row["choices"]["label"])
    prompt = "Please choose the correct answer to the question: " + row["question"]
    prompt += _lettered(row["choices"]["text"], labels, sep=" ")
    return {"prompt": prompt, "choices": labels, "answer": row["answerKey"]}


def boolq_row(row: Row) -> dict[str, Any]:
    """BoolQ (`google/boolq`): a yes/no question answered `true` or `false`."""
    prompt = f"Please answer the following question with true or false: {row['question']}?"
    return {"prompt": prompt, "choices": ["true", "false"], "answer": "true" if row["answer"] else "false"}


def openbookqa_row(row: Row) -> dict[str, Any]:
    """OpenBookQA (`allenai/openbookqa`, config `main`)."""
    labels = list(row["choices"]["label"])
    prompt = "Please choose the correct answer to the question: " + row["question_stem"]
    prompt += _lettered(row["choices"]["text"], labels, sep=" ")
    return {"prompt": prompt, "choices": labels, "answer": row["answerKey"]}


def piqa_row(row: Row) -> dict[str, Any]:
    """PIQA (`ybisk/piqa`): pick the solution that achieves the goal."""
    prompt = (
        "Below is a common task along with two possible solutions labeled (A) and (B). "
        f"Please select the appropriate solution to achieve the task:\n{row['goal']}\n"
        + _lettered([row["sol1"], row["sol2"]])
    )
    return {"prompt": prompt, "choices": ["A", "B"], "answer": _LETTERS[_label_index(row["label"], 2, 0, "piqa")]}


def siqa_row(row: Row) -> dict[str, Any]:
    """Social IQa (`allenai/social_i_qa`): labels `"1"`-`"3"`."""
    prompt = "Please choose the correct answer to the question.\n"
    prompt += f"Question: {row['context']} {row['question']}"
    prompt += _lettered([row["answerA"], row["answerB"], row["answerC"]])
    return {"prompt": prompt, "choices": ["A", "B", "C"], "answer": _LETTERS[_label_index(row["label"], 3, 1, "siqa")]}


def hellaswag_row(row: Row) -> dict[str, Any]:
    """HellaSwag (`Rowan/hellaswag`): pick the ending of the sentence; labels `"0"`-`"3"`."""
    endings = list(row["endings"])
    prompt = "Please choose the correct ending to complete the given sentence.\n"
    prompt += f"Sentence: {row['activity_label']}. {row['ctx']}" + _lettered(endings)
    answer = _LETTERS[_label_index(row["label"], len(endings), 0, "hellaswag")]
    return {"prompt": prompt, "choices": list(_LETTERS[: len(endings)]), "answer": answer}


def winogrande_row(row: Row) -> dict[str, Any]:
    """WinoGrande (`allenai/winogrande`): fill the blank with option 1 or 2 (answer `"1"`/`"2"`)."""
    prompt = "Please choose the correct answer to fill in the blank to complete the given sentence.\n"
    prompt += f"Sentence: {row['sentence']}" + _lettered([row["option1"], row["option2"]])
    answer = _LETTERS[_label_index(row["answer"], 2, 1, "winogrande")]
    return {"prompt": prompt, "choices": ["A", "B"], "answer": answer}


# registry and loading


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the hub and how its rows map to the example schema."""

    hub_id: str
    config: str | None
    to_row: Callable[[Row], dict[str, Any]]
    eval_split: str


BENCHMARKS: dict[str, Benchmark] = {
    "arc-e": Benchmark("allenai/ai2_arc", "ARC-Easy", arc_row, "test"),
    "arc-c": Benchmark("allenai/ai2_arc", "ARC-Challenge", arc_row, "test"),
    "boolq": Benchmark("google/boolq", None, boolq_row, "validation"),
    "obqa": Benchmark("allenai/openbookqa", "main", openbookqa_row, "test"),
    "piqa": Benchmark("ybisk/piqa", None, piqa_row, "validation"),
    "siqa": Benchmark("allenai/social_i_qa", None, siqa_row, "validation"),
    "hellaswag": Benchmark("Rowan/hellaswag", None, hellaswag_row, "validation"),
    "winogrande": Benchmark("allenai/winogrande", "winogrande_debiased", winogrande_row, "validation"),
}

DataFiles = str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]


def load_benchmark(name: str, split: str, data_files: DataFiles | None = None) -> Dataset:
    """Load one split of a benchmark as rows in the example schema, with `task` set to `name`.

    Args:
        name: one of `BENCHMARKS` (`"arc-e"`, `"arc-c"`, `"boolq"`, `"obqa"`, `"piqa"`, `"siqa"`,
            `"hellaswag"`, `"winogrande"`).
        split: `"train"`, `"validation"` or `"test"` (see `Benchmark.eval_split` for what the
            framework evaluates on).
        data_files: local `.json` / `.jsonl` / `.parquet` files with the hub columns instead of the hub:
            a path or a list of paths (all of them form the split), or a `{split: paths}` dict.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[name]
    if data_files is None:
        raw = load_hub_dataset(benchmark.hub_id, split, benchmark.config)
    else:
        raw = _load_local(data_files, split, name)
    rows = raw.map(
        lambda row: {"task": name, **benchmark.to_row(row)},
        remove_columns=raw.column_names,
        features=EXAMPLE_FEATURES,
        desc=f"Mapping {name}",
    )
    validate_examples(rows, source=f"{name} ({split})")
    return rows


def _load_local(data_files: DataFiles, split: str, name: str) -> Dataset:
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ValueError(f"{name}: data_files has no split {split!r}; it has {sorted(data_files)}")
        files = data_files[split]
    else:
        files = data_files
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    builders = {_BUILDERS.get(p.suffix) for p in paths}
    if not paths or None in builders or len(builders) > 1:
        raise ValueError(f"{name}: data_files must be .json/.jsonl files or .parquet files, got {paths}")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{name}: no such file {path}")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in paths], split="train")
