"""Tests of comoe_peft.experiments.tasks on a tiny fake BIG-bench sdist (no network) and on the synthetic tasks."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from datasets import List, Value

from comoe_peft.experiments import tasks
from comoe_peft.experiments.data import validate_examples
from comoe_peft.experiments.tasks import (
    DEFAULT_TASKS,
    SDIST_NAME,
    fetch_bigbench_tasks,
    load_tasks,
    parse_bigbench_task,
    parse_task_spec,
    synthetic_rows,
)

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"

MC_TASK = {
    "task_prefix": "Is the statement plausible?\n",
    "example_input_prefix": "\nStatement: ",
    "preferred_score": "multiple_choice_grade",
    "examples": [
        {"input": "The cat barked.", "target_scores": {"plausible": 0, "implausible": 1}},
        {"input": "The dog barked.", "target_scores": {"plausible": 1, "implausible": 0}},
        {"input": "The dog barked.", "target_scores": {"plausible": 1, "implausible": 0}},  # exact repeat
        {"input": "A tie.", "target_scores": {"plausible": 1, "implausible": 1}},  # skipped: tie
        {"input": "No winner.", "target_scores": {"plausible": 0, "implausible": 0}},  # skipped: no positive
    ],
}
GEN_TASK = {"preferred_score": "exact_str_match", "examples": [{"input": "Count: a b c", "target": ["three", "3"]}]}


def subtask(op: str, n: int) -> dict:
    """Like BIG-bench arithmetic: target and target_scores, scored by exact match."""
    examples = [
        {"input": f"What is {i} {op} 1?", "target": str(i), "target_scores": {str(i): 1, "banana": 0}}
        for i in range(n)
    ]
    return {"preferred_score": "exact_str_match", "examples": examples}


def make_sdist(path: Path) -> Path:
    """A tar.gz with the layout of the real bigbench-1.0.0 sdist (and some files that are not tasks)."""
    files = {
        f"{ROOT}/mc_task/task.json": json.dumps(MC_TASK),
        f"{ROOT}/mc_task/README.md": "not a task",
        f"{ROOT}/gen_task/task.json": json.dumps(GEN_TASK),
        f"{ROOT}/parent/task.json": json.dumps({"name": "parent", "subtasks": []}),
        f"{ROOT}/parent/plus/task.json": json.dumps(subtask("plus", 3)),
        f"{ROOT}/parent/minus/task.json": json.dumps(subtask("minus", 2)),
        "bigbench-1.0.0/setup.py": "",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


class FakeDownload:
    """Stands in for `pip download`: copies the fake sdist into the folder it is given and counts calls."""

    def __init__(self, sdist: Path) -> None:
        self.sdist, self.calls = sdist, 0

    def __call__(self, dest: Path) -> None:
        self.calls += 1
        shutil.copy(self.sdist, dest / SDIST_NAME)


def refuse_download(dest: Path) -> None:
    raise AssertionError("nothing should be downloaded")


@pytest.fixture
def fake(tmp_path: Path) -> FakeDownload:
    return FakeDownload(make_sdist(tmp_path / "fake.tar.gz"))


@pytest.fixture
def cache_with_sdist(tmp_path: Path) -> Path:
    """A cache folder that already holds the (fake) sdist, as after a first download."""
    cache = tmp_path / "cache"
    (cache / "bigbench" / "sdist").mkdir(parents=True)
    make_sdist(cache / "bigbench" / "sdist" / SDIST_NAME)
    return cache


# download and extraction


def test_fetch_downloads_once_and_extracts_only_what_is_asked(tmp_path: Path, fake: FakeDownload) -> None:
    cache = tmp_path / "cache"
    files = fetch_bigbench_tasks(["mc_task", "parent/plus"], cache, download=fake)
    root = cache / "bigbench"
    assert fake.calls == 1
    assert files == {"mc_task": [root / "mc_task/task.json"], "parent/plus": [root / "parent/plus/task.json"]}
    assert json.loads(files["mc_task"][0].read_text()) == MC_TASK
    assert not (root / "gen_task").exists() and not (root / "parent/minus").exists()
    assert not (root / "mc_task/README.md").exists()
    assert (root / "sdist" / SDIST_NAME).is_file()


def test_download_is_announced_before_and_after(tmp_path: Path, fake: FakeDownload, caplog) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="comoe_peft"):
        fetch_bigbench_tasks(["mc_task"], cache, download=fake)
    messages = [record.getMessage() for record in caplog.records]
    before = [m for m in messages if m.startswith("downloading BIG-bench task data (")]
    assert before and "358 MB" in before[0] and str(cache / "bigbench" / "sdist") in before[0] and "once" in before[0]
    after = messages.index(f"downloaded {cache / 'bigbench' / 'sdist' / SDIST_NAME}")
    extracting = next(i for i, m in enumerate(messages) if m.startswith("extracting BIG-bench task files"))
    assert messages.index(before[0]) < after < extracting  # in the order things happen
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="comoe_peft"):
        fetch_bigbench_tasks(["mc_task"], cache, download=refuse_download)
    assert not [r for r in caplog.records if "download" in r.getMessage()]  # cached: nothing to announce


def test_second_fetch_uses_the_extracted_files(tmp_path: Path, fake: FakeDownload) -> None:
    cache = tmp_path / "cache"
    first = fetch_bigbench_tasks(["mc_task", "parent"], cache, download=fake)
    (cache / "bigbench" / "sdist" / SDIST_NAME).unlink()  # neither download nor extraction may be needed now
    second = fetch_bigbench_tasks(["mc_task", "parent"], cache, download=refuse_download)
    assert first == second
    assert fake.calls == 1


def test_cached_sdist_is_not_downloaded_again(cache_with_sdist: Path) -> None:
    files = fetch_bigbench_tasks(["gen_task"], cache_with_sdist, download=refuse_download)
    assert files["gen_task"][0].is_file()


def test_whole_task_takes_its_own_file_and_all_subtasks(cache_with_sdist: Path) -> None:
    files = fetch_bigbench_tasks(["parent"], cache_with_sdist, download=refuse_download)["parent"]
    root = cache_with_sdist / "bigbench"
    assert files == [root / "parent/task.json", root / "parent/minus/task.json", root / "parent/plus/task.json"]


def test_unknown_task_suggests_names_and_uses_the_index_next_time(cache_with_sdist: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown BIG-bench task 'mc_tsk'; did you mean: mc_task"):
        fetch_bigbench_tasks(["mc_tsk"], cache_with_sdist, download=refuse_download)
    (cache_with_sdist / "bigbench" / "sdist" / SDIST_NAME).unlink()
    with pytest.raises(ValueError, match=r"unknown BIG-bench task 'parent/times'; did you mean: parent/"):
        fetch_bigbench_tasks(["parent/times"], cache_with_sdist, download=refuse_download)


def test_invalid_task_name_is_rejected_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid BIG-bench task name '../etc'"):
        fetch_bigbench_tasks(["../etc"], tmp_path, download=refuse_download)


def test_default_download_runs_pip_download_of_the_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        commands.append(command)
        make_sdist(Path(command[command.index("-d") + 1]) / SDIST_NAME)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    files = fetch_bigbench_tasks(["gen_task"], tmp_path)
    assert files["gen_task"][0].is_file()
    assert len(commands) == 1
    command = commands[0]
    assert command[:3] == [sys.executable, "-m", "pip"]
    assert command[3:9] == ["download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0", "-d"]


def test_download_refused_by_a_new_pip_runs_an_older_pip_from_its_wheel(tmp_path, monkeypatch) -> None:
    """pip >= 26.3 refuses bigbench's sdist (a direct URL dependency in its metadata): pip 26.2 does the download."""
    from comoe_peft.experiments.tasks import PIP_FOR_BIGBENCH

    commands = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        commands.append(command)
        if len(commands) == 1:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: Distributions from PyPI cannot declare "
                                               "direct URL dependencies.\nbigbench depends on bleurt @ file://...")
        if len(commands) == 2:
            return subprocess.CompletedProcess(command, 0, "", "")
        make_sdist(Path(command[command.index("-d") + 1]) / SDIST_NAME)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    files = fetch_bigbench_tasks(["gen_task"], tmp_path)
    assert files["gen_task"][0].is_file()
    assert commands[1][3:6] == ["download", "--no-deps", f"pip=={PIP_FOR_BIGBENCH}"]
    assert commands[2][1].endswith(f"pip-{PIP_FOR_BIGBENCH}-py3-none-any.whl/pip")
    assert commands[2][2:8] == ["download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0", "-d"]


def test_failed_download_explains_what_is_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda command, **k: subprocess.CompletedProcess(command, 1, "", "no net"))
    with pytest.raises(RuntimeError, match="(?s)downloading the BIG-bench data failed.*no net.*package index"):
        fetch_bigbench_tasks(["gen_task"], tmp_path)


# parsing


def test_parse_multiple_choice_skips_ties_and_no_positive() -> None:
    rows = parse_bigbench_task(MC_TASK, "bigbench:mc_task")
    assert len(rows) == 3
    assert rows[0] == {
        "task": "bigbench:mc_task",
        "prompt": "Is the statement plausible?\nStatement: The cat barked.",
        "choices": ["plausible", "implausible"],
        "answer": "implausible",
    }


def test_parse_generation_takes_the_first_target() -> None:
    assert parse_bigbench_task(GEN_TASK, "t") == [
        {"task": "t", "prompt": "Count: a b c", "choices": [], "answer": "three"}
    ]


def test_parse_target_and_scores_follows_the_preferred_score() -> None:
    exact = parse_bigbench_task(subtask("plus", 1), "t")[0]
    assert (exact["choices"], exact["answer"]) == ([], "0")
    example = {"input": "Q?", "target": "Yes. Because ...", "target_scores": {"Yes": 1, "No": 0}}
    graded = parse_bigbench_task({"preferred_score": "multiple_choice_grade", "examples": [example]}, "t")[0]
    assert (graded["choices"], graded["answer"]) == (["Yes", "No"], "Yes")


# load_tasks


def test_load_tasks_from_bigbench_dedupes_and_names_tasks(cache_with_sdist: Path) -> None:
    dataset = load_tasks(
        "bigbench:mc_task, bigbench:parent", seed=0, max_examples_per_task=None, cache_dir=cache_with_sdist
    )
    assert dataset["task"].count("bigbench:mc_task") == 2  # 5 examples: a repeat, a tie, no positive
    assert dataset["task"].count("bigbench:parent") == 5  # 3 + 2 subtask examples
    assert dataset.features["choices"] == List(Value("string"))


def test_load_tasks_caps_each_task_with_a_seeded_subset(cache_with_sdist: Path) -> None:
    def load(seed: int) -> list[str]:
        return load_tasks(["bigbench:parent"], seed, max_examples_per_task=2, cache_dir=cache_with_sdist)["prompt"]

    assert len(load(0)) == 2
    assert load(0) == load(0)
    assert {tuple(load(s)) for s in range(10)} != {tuple(load(0))}


def test_load_tasks_mixes_sources() -> None:
    dataset = load_tasks("synthetic:arithmetic,synthetic:parity", seed=0, max_examples_per_task=30)
    assert dataset.num_rows == 60
    assert set(dataset["task"]) == {"synthetic:arithmetic", "synthetic:parity"}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("glue:sst2", r"unknown task 'glue:sst2': use 'bigbench:<task>\[/<subtask>\]' or 'synthetic:<"),
        ("synthetic:chess", "unknown synthetic task 'chess'; available: arithmetic, parity, sort_letters"),
        (" , ", "no task in"),
        ("navigate", "unknown task 'navigate'"),
    ],
)
def test_load_tasks_rejects_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_tasks(spec, seed=0, max_examples_per_task=5)


def test_default_spec_expands_to_default_tasks() -> None:
    assert parse_task_spec("default") == list(DEFAULT_TASKS)
    assert parse_task_spec(["synthetic:parity", "default", "synthetic:parity"])[0] == "synthetic:parity"
    assert len({name.split(":")[1].split("/")[0] for name in DEFAULT_TASKS}) >= 4


# synthetic tasks


@pytest.mark.parametrize("name", sorted(tasks.SYNTHETIC_TASKS))
def test_synthetic_tasks_are_deterministic_distinct_and_valid(name: str) -> None:
    rows = synthetic_rows(name, seed=7, n=200)
    assert rows == synthetic_rows(name, seed=7, n=200)
    assert rows != synthetic_rows(name, seed=8, n=200)
    assert len({r["prompt"] for r in rows}) == 200
    validate_examples(rows, source=name)


def test_synthetic_task_refuses_more_rows_than_it_has() -> None:
    with pytest.raises(
        ValueError, match=r"synthetic:parity has only about \d+ distinct examples; ask for fewer than 9000"
    ):
        synthetic_rows("parity", seed=0, n=9000)


def test_synthetic_answers_are_correct() -> None:
    for row in synthetic_rows("arithmetic", seed=0, n=50):
        expression = (
            row["prompt"].removeprefix("What is ").removesuffix("?").replace("plus", "+").replace("minus", "-")
        )
        assert row["answer"] == str(eval(expression))  # digits and + / - only
    for row in synthetic_rows("parity", seed=0, n=50):
        bits = row["prompt"].split()[6]
        assert row["answer"] == ("even" if bits.count("1") % 2 == 0 else "odd")
    for row in synthetic_rows("sort_letters", seed=0, n=50):
        letters = row["prompt"].split(": ")[1].split()
        assert row["answer"].split() == sorted(letters)
