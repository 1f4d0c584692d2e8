"""Evaluation through lm-evaluation-harness: a run's held-out examples as local lm-eval tasks, and `lm_eval` on a
loaded (peft) model.

`write_tasks` writes one lm-eval task per task of the examples, a YAML config beside a JSON-lines file of its rows,
into a folder (`RUN/lm_eval_tasks/` for `comoe-peft eval`):

| kind | lm-eval `output_type` | what is scored | metric |
|---|---|---|---|
| multiple choice | `multiple_choice` | the summed log-likelihood of `" " + choice` after the prompt; the best choice wins | `acc` |
| generation | `generate_until` | greedy text after the prompt up to the first newline (at most 16 tokens) | `exact_match`, ends stripped |

The prompt is `format_prompt(row)`, the text the model was trained on; no few-shot examples, no chat template.
`evaluate_tasks` runs `lm_eval.simple_evaluate` with `HFLM(pretrained=model, tokenizer=tokenizer)` on such a folder
and on lm-eval's own tasks (`arc_easy`, `boolq`, ...) when their data is in the local Hugging Face cache, and returns
per-task accuracy in the shape `comoe-peft eval` prints:

```text
{task: {"accuracy": float, "n": int, "kind": "multiple_choice" | "generation", "metric": str, "stderr": float},
 "overall": {"accuracy": macro mean over tasks, "n": total examples, "kind": "macro_mean"}}
```

The same folder can be evaluated with lm-eval's own command line: `lm_eval --model hf --model_args
pretrained=MODEL,peft=RUN/adapter --include_path RUN/lm_eval_tasks --tasks <names in RUN/lm_eval_tasks/tasks.json>`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import unittest.mock
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import format_prompt
from .evaluation import OVERALL

Results = dict[str, dict[str, Any]]
TASK_PREFIX = "comoe_"  # keeps the written tasks apart from lm-eval's own names
NAMES_FILE = "tasks.json"  # lm-eval task name -> the examples' task name
MAX_GEN_TOKS = 16
METRICS = {"multiple_choice": "acc", "generate_until": "exact_match"}
KINDS = {"multiple_choice": "multiple_choice", "generate_until": "generation"}
QUIET_LOGGERS = ("lm-eval", "lm_eval", "evaluate", "absl")


# writing a run's examples as lm-eval tasks


def lm_eval_name(task: str, taken: Iterable[str] = ()) -> str:
    """An lm-eval task name (and file stem) for an examples task: `comoe_` + the name with other characters than
    letters, digits and `_` replaced by `_`; a number is added if it is already `taken`."""
    base = TASK_PREFIX + re.sub(r"[^0-9A-Za-z_]+", "_", task).strip("_")
    taken = set(taken)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def task_kind(task: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """`multiple_choice` when the task's rows have choices, `generation` when none has; mixed tasks are refused."""
    has_choices = {bool(row["choices"]) for row in rows}
    if len(has_choices) > 1:
        raise ValueError(
            f"Task {task!r} mixes rows with and without choices; a task must be all multiple choice "
            "or all generation (split it into two tasks)."
        )
    return "multiple_choice" if has_choices.pop() else "generation"


def task_config(name: str, kind: str, data_file: Path) -> dict[str, Any]:
    """The lm-eval YAML config of one written task; `doc_to_*` name columns of the JSON-lines rows (no templating)."""
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "text",
    }
    if kind == "multiple_choice":
        metric = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
        return config | {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
                         "target_delimiter": " ", "metric_list": [metric]}
    metric = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
              "regexes_to_ignore": [r"^\s+", r"\s+$"]}  # the old scorer's strip(), on both sides
    generation = {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False}
    return config | {"output_type": "generate_until", "doc_to_target": "answer", "generation_kwargs": generation,
                     "metric_list": [metric]}


def _doc(row: Mapping[str, Any]) -> dict[str, Any]:
    """One JSON-lines row: the prompt text the model sees, the choices, the answer and its index among the choices."""
    choices = list(row["choices"])
    stripped = [c.strip() for c in choices]
    if choices and row["answer"].strip() not in stripped:
        raise ValueError(f"Task {row['task']!r}: the answer {row['answer']!r} is not one of the choices "
                         f"{choices!r}; fix the data so the answer is a choice.")
    label = stripped.index(row["answer"].strip()) if choices else -1
    return {"text": format_prompt(row), "choices": choices, "answer": row["answer"], "label": label}


def write_tasks(rows: Iterable[Mapping[str, Any]], folder: str | Path) -> dict[str, str]:
    """Write each task of `rows` (the examples schema) as an lm-eval task: `NAME.yaml` + `NAME.jsonl` in `folder`.

    Also writes `tasks.json`, the map from lm-eval names to the examples' task names. Files of an earlier call are
    replaced. Returns that map.
    """
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    if not by_task:
        raise ValueError("The dataset is empty; nothing to evaluate.")
    if OVERALL in by_task:
        raise ValueError(f"A task is named {OVERALL!r}, which is reserved for the summary; rename it.")
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.yaml"), *folder.glob("*.jsonl")]:
        old.unlink()
    names: dict[str, str] = {}
    for task in sorted(by_task):
        name = lm_eval_name(task, names)
        kind = task_kind(task, by_task[task])
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(_doc(r)) + "\n" for r in by_task[task]), encoding="utf-8")
        config = task_config(name, kind, data_file)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names[name] = task
    (folder / NAMES_FILE).write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
    return names


# running lm-eval


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's (and its metrics libraries') INFO and WARNING lines and datasets' progress bars off for the
    duration; errors and lm-eval's request progress bars still show."""
    import datasets

    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


class TaskLoadError(ValueError):
    """An lm-eval task that is unknown, or whose data cannot be loaded (offline, not in the local cache)."""


@functools.cache
def _own_tasks():
    """lm-eval's index of its own tasks (some 15k YAML files; built once per process, ~10-30 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_tasks(names: Sequence[str], include_path: str | Path | None = None) -> dict[str, Any]:
    """lm-eval `Task` objects by name: the tasks written in `include_path` (lm-eval's own tasks not indexed) or, with
    no `include_path`, lm-eval's own tasks; a `TaskLoadError` naming the first task that is unknown or whose data
    is not local."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else _own_tasks()
    tasks: dict[str, Any] = {}
    for name in names:
        if name not in manager.all_tasks:
            raise TaskLoadError(f"unknown lm-eval task {name!r}; lm-eval's own task names are listed by "
                                "`lm_eval ls tasks` (e.g. arc_easy, boolq)")
        try:
            loaded = manager.load([name])["tasks"]
        except Exception as error:  # datasets raises many types when data is neither local nor reachable
            reason = " ".join(str(error).split())[:300]
            raise TaskLoadError(f"lm-eval task {name!r} could not load its data offline ({type(error).__name__}: "
                                f"{reason}); download it once with network (e.g. `datasets.load_dataset`) into the "
                                "local Hugging Face cache") from None
        tasks.update(loaded)
    return tasks


def run_lm_eval(model: torch.nn.Module, tokenizer, tasks: Sequence[Any], batch_size: int = 16,
                limit: int | None = None) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `model` (eval mode, e.g. a `PeftModel`) on loaded `tasks`, zero-shot; lm-eval's
    own result dict. `limit`: at most this many examples per task."""
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        # lm-eval records the git commit of the working directory with `git describe`, which prints "fatal: not a
        # git repository" outside one; that commit says nothing about the model, so it is not asked for
        with quiet_lm_eval(), unittest.mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, log_samples=False,
                                   apply_chat_template=False, task_manager=TaskManager(include_defaults=False))
    finally:
        model.train(was_training)


def to_results(output: Mapping[str, Any], tasks: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Results:
    """Per-task accuracy from lm-eval's result dict: `acc` for multiple choice, `exact_match` for generation (lm-eval
    tasks with neither: their first metric), keyed by the examples' task name when `names` maps it, plus `overall`."""
    names = names or {}
    results: Results = {}
    for name, task in tasks.items():
        metrics = output["results"][name]
        output_type = task.OUTPUT_TYPE
        metric = _metric_key(metrics, METRICS.get(output_type))
        stderr = metrics.get(metric.replace(",", "_stderr,", 1))
        results[names.get(name, name)] = {
            "accuracy": float(metrics[metric]),
            "n": int(output["n-samples"][name]["effective"]),
            "kind": KINDS.get(output_type, output_type),
            "metric": metric.split(",")[0],
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        }
    results = dict(sorted(results.items()))
    results[OVERALL] = {
        "accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
        "n": sum(r["n"] for r in results.values()),
        "kind": "macro_mean",
    }
    return results


def _metric_key(metrics: Mapping[str, Any], wanted: str | None) -> str:
    """The key (`"acc,none"`, ...) of the wanted metric, else of the first metric lm-eval reports."""
    keys = [k for k in metrics if "," in k and "_stderr," not in k]
    for key in keys:
        if key.split(",")[0] == wanted:
            return key
    if not keys:
        raise ValueError(f"lm-eval reported no metric: {dict(metrics)!r}")
    return keys[0]


def evaluate_tasks(model: torch.nn.Module, tokenizer, names: Sequence[str], include_path: str | Path | None = None,
                   batch_size: int = 16, limit: int | None = None) -> Results:
    """Accuracy of `model` on lm-eval tasks: those written by `write_tasks` into `include_path`, or, without it,
    lm-eval's own tasks (data in the local Hugging Face cache). Keys: the examples' task names for written tasks."""
    with quiet_lm_eval():
        tasks = load_tasks(names, include_path)
    mapping = {}
    if include_path is not None and (Path(include_path) / NAMES_FILE).is_file():
        mapping = json.loads((Path(include_path) / NAMES_FILE).read_text(encoding="utf-8"))
    output = run_lm_eval(model, tokenizer, list(tasks.values()), batch_size, limit)
    return to_results(output, tasks, mapping)


def evaluate_examples(model: torch.nn.Module, tokenizer, rows: Iterable[Mapping[str, Any]], folder: str | Path,
                      batch_size: int = 16, limit: int | None = None) -> Results:
    """Write `rows` as lm-eval tasks in `folder` (`write_tasks`) and evaluate `model` on them (`evaluate_tasks`)."""
    names = write_tasks(rows, folder)
    return evaluate_tasks(model, tokenizer, list(names), folder, batch_size, limit)
