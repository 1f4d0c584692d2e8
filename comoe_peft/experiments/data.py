"""Examples for the main job: the schema, loading user data, per-task splits and SFT formatting.

**Schema.** A dataset holds one row per example with four columns (further columns are allowed and kept):

| column | type | meaning |
|---|---|---|
| `task` | `str` | the task's name, non-empty (`"sentiment"`, `"bigbench:navigate"`); splits and metrics are per task |
| `prompt` | `str` | the input, non-empty, without an answer cue (`format_prompt` adds the choices and `"Answer:"`) |
| `choices` | `list[str]` | multiple choice: the distinct, non-empty candidates; generation: `[]` (exact match) |
| `answer` | `str` | the reference answer, non-empty; in a multiple-choice row exactly one of `choices` |

Two rows in JSON lines form (a `.jsonl` file, one object per line):

```json
{"task": "sentiment", "prompt": "Review: great food.", "choices": ["positive", "negative"], "answer": "positive"}
{"task": "addition", "prompt": "What is 12 plus 30?", "choices": [], "answer": "42"}
```

`load_examples` reads such rows from `.json` / `.jsonl` / `.parquet` files, a folder of them, a
folder written by `Dataset.save_to_disk`, or a Hugging Face hub dataset id, and checks them with
`validate_examples`.

What the model sees: `format_prompt(row)` is the prompt and `" " + answer` the completion:

```python
from comoe_peft.experiments.data import format_prompt

rows = [
    {"task": "sentiment", "prompt": "Review: great food, slow service.",
     "choices": ["positive", "negative", "ambivalent"], "answer": "ambivalent"},
    {"task": "addition", "prompt": "What is 12 plus 30?", "choices": [], "answer": "42"},
]
for row in rows:
    print(format_prompt(row) + " " + row["answer"])
# Review: great food, slow service.
# Options:
# - positive
# - negative
# - ambivalent
# Answer: ambivalent
# What is 12 plus 30?
# Answer: 42
```
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, List, Value

COLUMNS = ("task", "prompt", "choices", "answer")
EXAMPLE_FEATURES = Features(
    {"task": Value("string"), "prompt": Value("string"), "choices": List(Value("string")), "answer": Value("string")}
)
SCHEMA_HELP = (
    "expected one row per example with columns task (str), prompt (str), "
    "choices (list[str], [] for generation tasks) and answer (str, one of choices for multiple choice)"
)
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# validation


def validate_examples(dataset_or_rows: Dataset | Sequence[Mapping[str, Any]], source: str) -> None:
    """Check rows against the schema of this module; raise `ValueError` naming the first problem.

    Args:
        dataset_or_rows: a `datasets.Dataset` or a list of row dicts.
        source: where the rows came from (a path, a task spec); used in the error message.
    """
    rows: Iterable[Mapping[str, Any]] = dataset_or_rows
    if isinstance(dataset_or_rows, Dataset):
        if not set(COLUMNS) <= set(dataset_or_rows.column_names):
            _raise_missing(dataset_or_rows.column_names, source)
        rows = _iter_rows(dataset_or_rows.select_columns(list(COLUMNS)))
    if len(dataset_or_rows) == 0:
        raise ValueError(f"{source}: the dataset is empty; {SCHEMA_HELP}")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{source}, row {index}: expected a dict, got {type(row).__name__}; {SCHEMA_HELP}")
        if not set(COLUMNS) <= set(row):
            _raise_missing(list(row), f"{source}, row {index}")
        _check_row(row, f"{source}, row {index}")


def _raise_missing(columns: Sequence[str], where: str) -> None:
    missing = [c for c in COLUMNS if c not in columns]
    raise ValueError(f"{where}: missing column(s) {missing} (found {list(columns)}); {SCHEMA_HELP}")


def _iter_rows(dataset: Dataset, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _check_row(row: Mapping[str, Any], where: str) -> None:
    for column in ("task", "prompt", "answer"):
        value = row[column]
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{column}' must be a str, got {type(value).__name__} ({value!r})")
        if not value.strip():
            raise ValueError(f"{where}: '{column}' is empty")
    choices = row["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of str ([] for generation), got {choices!r}")
    if any(not c.strip() for c in choices):
        raise ValueError(f"{where}: 'choices' contains an empty string: {choices!r}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: 'choices' has duplicates: {choices!r}")
    if choices and row["answer"] not in choices:
        raise ValueError(f"{where}: answer {row['answer']!r} is not one of the choices {choices!r}")


# loading


def load_examples(path_or_name: str, split: str | None = None) -> Dataset:
    """Load and validate examples in the schema of this module.

    `path_or_name` is tried in this order:

    1. a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
    2. a folder of `.json` / `.jsonl` / `.parquet` files (all of them, or with `split` those whose
       name starts with it, e.g. `train.jsonl`, `train-00000-of-00001.parquet`);
    3. one such file;
    4. otherwise a Hugging Face hub dataset id. Without network it must already be in the local Hugging
       Face cache (set `HF_DATASETS_OFFLINE=1` to skip the network retries).

    Args:
        path_or_name: file, folder or hub dataset id.
        split: split to load from a `DatasetDict` folder, a file folder or a hub dataset; may be left out
            when there is only one.

    Returns:
        the rows as a `datasets.Dataset` whose four schema columns have the types of `EXAMPLE_FEATURES`.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        dataset = _pick_split(datasets.load_from_disk(str(path)), split, path_or_name)
    elif path.is_dir():
        dataset = _load_files(_folder_files(path, split), path_or_name)
    elif path.is_file():
        if split is not None:
            raise ValueError(f"{path_or_name}: split={split!r} applies to folders and hub datasets, not a single file")
        dataset = _load_files([path], path_or_name)
    elif path.suffix in _BUILDERS or str(path_or_name).startswith(("/", ".", "~")):
        raise ValueError(f"{path_or_name}: no such file or folder")
    else:
        dataset = load_hub_dataset(path_or_name, split)
    validate_examples(dataset, source=str(path_or_name))
    return dataset.cast(Features({**dataset.features, **EXAMPLE_FEATURES}))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _folder_files(folder: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _BUILDERS)
    if split is not None:
        files = [p for p in files if p.name.startswith(split)]
    if not files:
        which = f" whose name starts with {split!r}" if split is not None else ""
        raise ValueError(f"{folder}: no .json, .jsonl or .parquet file{which} in this folder")
    return files


def _load_files(files: list[Path], source: str) -> Dataset:
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise ValueError(f"{source}: unsupported file type {files[0].suffix!r}; use .json, .jsonl or .parquet")
    if len(builders) > 1:
        raise ValueError(f"{source}: mixes JSON and Parquet files; keep one format per folder")
    builder = builders.pop()
    # one file at a time: the JSON reader infers `choices` of a file with only generation rows as list<null>
    parts = [_typed_choices(_load_file(builder, p)) for p in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_file(builder: str, path: Path) -> Dataset:
    """One JSON / Parquet file as a dataset; a ValueError that names the file when it is empty or unreadable."""
    what = "rows with the columns task, prompt, choices and answer"
    size = path.stat().st_size
    if size == 0 or (builder == "json" and size < 2**16 and not path.read_bytes().strip()):
        raise ValueError(f"'{path}' is empty; give a file of {what}")
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its traceback: the error below says it
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except StopIteration:  # the JSON reader on a file without rows
        raise ValueError(f"'{path}' holds no rows; give a file of {what}") from None
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:  # pyarrow's errors are ValueErrors
        cause = error.__cause__ or error
        raise ValueError(f"cannot read '{path}' as {builder.upper()} ({type(cause).__name__}: {cause}); give a "
                         f"file of {what}") from None
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
    if len(dataset) == 0:
        raise ValueError(f"'{path}' holds no rows; give a file of {what}")
    return dataset


def _typed_choices(dataset: Dataset) -> Dataset:
    if dataset.features.get("choices") == List(Value("null")):
        return dataset.cast_column("choices", EXAMPLE_FEATURES["choices"])
    return dataset


def load_hub_dataset(name: str, split: str | None = None, config: str | None = None) -> Dataset:
    """Load one split of a hub dataset (any columns), turning every failure into one clear `ValueError`.

    Offline this works only for datasets already in the Hugging Face cache.
    """
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # the hub client raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise ValueError(
            f"{name!r} is not a local file or folder, and loading it as a hub dataset failed "
            f"({type(error).__name__}: {error}). Offline, a hub dataset must already be in the Hugging Face "
            "cache (HF_DATASETS_OFFLINE=1 skips the network retries); otherwise pass a .json/.jsonl/.parquet "
            "file, a folder of them, or a save_to_disk folder."
        ) from error
    return _pick_split(loaded, split, name)


def _pick_split(loaded: Dataset | DatasetDict, split: str | None, source: str) -> Dataset:
    if isinstance(loaded, Dataset):
        return loaded
    if split is None and len(loaded) == 1:
        return next(iter(loaded.values()))
    if split is None or split not in loaded:
        wanted = "pass split=" if split is None else f"split {split!r} not found;"
        raise ValueError(f"{source}: has splits {sorted(loaded)}; {wanted} one of them")
    return loaded[split]


# splits


def train_test_split_per_task(
    dataset: Dataset, test_size: float, seed: int, max_train_per_task: int | None = None
) -> DatasetDict:
    """Hold out examples from every task with a fixed seed.

    Each task is split on its own (seeded by `seed` and the task name), so adding or removing a task does
    not change the split of the others. Rows are split by position: no row is in both parts.

    Args:
        dataset: rows in the schema of this module.
        test_size: held-out rows per task: an int count, or a float fraction in (0, 1) (at least one row).
        seed: the same seed and data give the same split.
        max_train_per_task: cap on the training rows kept per task (a seeded subset); `None` keeps all.

    Returns:
        `DatasetDict` with `"train"` and `"test"`, each in the original row order.
    """
    _check_test_size(test_size)
    if max_train_per_task is not None and max_train_per_task < 1:
        raise ValueError(f"max_train_per_task must be >= 1 or None, got {max_train_per_task}")
    by_task: dict[str, list[int]] = {}
    for index, task in enumerate(dataset["task"]):
        by_task.setdefault(task, []).append(index)
    train, test = [], []
    for task, indices in by_task.items():
        n_test = test_size if isinstance(test_size, int) else max(1, round(len(indices) * test_size))
        if n_test >= len(indices):
            raise ValueError(
                f"task {task!r} has {len(indices)} examples: too few to hold out {n_test} and train on the rest; "
                "lower test_size or add examples"
            )
        shuffled = list(indices)
        random.Random(f"{seed}/{task}").shuffle(shuffled)
        test += shuffled[:n_test]
        train += shuffled[n_test:][:max_train_per_task]
    return DatasetDict(train=dataset.select(sorted(train)), test=dataset.select(sorted(test)))


def _check_test_size(test_size: float) -> None:
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(f"test_size must be an int count or a float fraction, got {test_size!r}")
    if isinstance(test_size, int) and test_size < 1:
        raise ValueError(f"test_size as a count must be >= 1, got {test_size}")
    if isinstance(test_size, float) and not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size as a fraction must be in (0, 1), got {test_size}")


# text the model sees


def format_prompt(row: Mapping[str, Any]) -> str:
    """The plain-text prompt of a row: the prompt, the choices one per line (multiple choice), `Answer:`.

    The completion that follows it is `" " + row["answer"]`. Evaluation uses the same function, so training
    and scoring see identical text.
    """
    text = row["prompt"].rstrip()
    if row["choices"]:
        text += "\nOptions:" + "".join(f"\n- {choice}" for choice in row["choices"])
    return text + "\nAnswer:"


def format_example(row: Mapping[str, Any], tokenizer: Any = None, use_chat_template: bool = False) -> tuple[str, str]:
    """Return `(prompt, completion)` for a row, as plain text or rendered with the tokenizer's chat template.

    Plain text: `(format_prompt(row), " " + answer)`. With `use_chat_template=True` the plain prompt is the
    user turn and the answer the assistant turn; the completion is the rendered assistant turn, cut after the
    tokenizer's end-of-sequence token when the template writes one (TRL then does not add a second).
    """
    if not use_chat_template:
        return format_prompt(row), " " + row["answer"]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template=True needs a tokenizer with a chat template; pass one or set it False")
    messages = [{"role": "user", "content": format_prompt(row)}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "this chat template does not render the prompt as a prefix of prompt + answer; use use_chat_template=False"
        )
    completion = full[len(prompt) :]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in completion:
        completion = completion[: completion.rindex(eos) + len(eos)]
    return prompt, completion


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token.

    Raises:
        ValueError: the tokenizer has neither (set `tokenizer.pad_token`).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return pad


def to_sft_dataset(dataset: Dataset, tokenizer: Any = None, use_chat_template: bool = False) -> Dataset:
    """Turn schema rows into a TRL prompt-completion dataset (columns `prompt`, `completion`, `task`).

    `task` is kept for per-task analysis; TRL's trainer drops columns the model does not take.
    The text is plain (see `format_example`) unless `use_chat_template=True` and a tokenizer with a chat
    template is given.
    """
    validate_examples(dataset, source="to_sft_dataset input")
    if use_chat_template and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise ValueError("use_chat_template=True needs a tokenizer with a chat template; pass one or set it False")

    def convert(row: dict[str, Any]) -> dict[str, str]:
        prompt, completion = format_example(row, tokenizer, use_chat_template)
        return {"prompt": prompt, "completion": completion}

    drop = [c for c in dataset.column_names if c not in ("task", "prompt")]
    return dataset.map(convert, remove_columns=drop, desc="Formatting prompts")
