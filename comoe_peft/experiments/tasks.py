"""Built-in tasks, named by strings such as `bigbench:navigate` or `synthetic:arithmetic`.

**Sources.**

- `bigbench:<task>` / `bigbench:<task>/<subtask>`: a task of BIG-bench 1.0.0 (167 JSON tasks). The data ships in
  the `bigbench` source distribution on the Python package index (358 MB), which is downloaded once with
  `pip download` into `<cache>/bigbench/sdist`; only the `task.json` files asked for are extracted, into
  `<cache>/bigbench/<task>/...` (the cache is `comoe_peft.experiments.cache.default_cache_dir()`: never the repository, since
  every file carries the BIG-bench canary string). `<task>` alone takes the task's own examples and those of all
  its subtasks (`bigbench:multiemo` alone is 110 subtasks and 1.4 M rows: name a subtask such as
  `bigbench:multiemo/all_text_en`).
- `synthetic:<name>`: generated from the seed, no files: `arithmetic` (2-3 digit addition and subtraction,
  generation), `parity` (even or odd number of 1s in a bit string, multiple choice), `sort_letters` (sort 4-7
  letters, generation).

`load_tasks` returns rows in the schema of `comoe_peft.experiments.data` with `task` set to the task string.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
import re
import string
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets

from .cache import default_cache_dir
from .data import EXAMPLE_FEATURES, validate_examples

BIGBENCH_VERSION = "1.0.0"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
_MEMBER_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)?$")
_MANIFEST = "_extracted.json"
_INDEX = "index.json"

SYNTHETIC_SIZE = 2000
"""Rows generated per synthetic task when `max_examples_per_task` is `None`."""

DEFAULT_TASKS: tuple[str, ...] = (
    "bigbench:multiemo/all_sentence_en",  # sentiment of review sentences, 4-way multiple choice (57k)
    "bigbench:epistemic_reasoning",  # natural language inference, entailment or not (2k)
    "bigbench:sports_understanding",  # plausibility of sports statements (1k)
    "bigbench:navigate",  # spatial reasoning: do the steps return to the start? (1k)
    "bigbench:arithmetic/3_digit_addition",  # exact-match generation (1k)
)
"""A heterogeneous mixture: sentiment, NLI, commonsense plausibility, navigation, arithmetic.

Prompts are short (median 35-400 characters). Sizes differ (multiemo sentences: 57k rows, the others 1-2k),
so pass `max_examples_per_task` (e.g. 1000) for a balanced mixture. `bigbench:multiemo/all_text_en` (8k
whole reviews, median 865 characters) is the longer-text alternative for sentiment.
"""

Downloader = Callable[[Path], None]
logger = logging.getLogger(__name__)


# BIG-bench: download and extraction


def bigbench_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding the BIG-bench sdist and extracted task files: `<cache>/bigbench`."""
    return Path(cache_dir or default_cache_dir()) / "bigbench"


# pip 26.3 refuses to download an sdist from the package index whose metadata declares a direct URL dependency,
# even with --no-deps; bigbench 1.0.0 declares one (bleurt). The last pip without that check does the download.
PIP_FOR_BIGBENCH = "26.2"
DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"


def download_bigbench_sdist(dest: Path) -> None:
    """Download the BIG-bench source distribution into `dest` with `pip download` (no install).

    When this environment's pip refuses the sdist for its direct URL dependency (pip >= 26.3), pip
    `PIP_FOR_BIGBENCH` is downloaded as a wheel into a temporary folder and run from there, installing nothing.
    """
    args = ["download", "--no-deps", "--no-binary", ":all:", f"bigbench=={BIGBENCH_VERSION}", "-d", str(dest)]
    command = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0 and DIRECT_URL_REFUSAL in result.stderr:
        with tempfile.TemporaryDirectory() as pip_dir:
            fetch_pip = [sys.executable, "-m", "pip", "download", "--no-deps", f"pip=={PIP_FOR_BIGBENCH}",
                         "-d", pip_dir]
            result = subprocess.run(fetch_pip, check=False, capture_output=True, text=True)
            if result.returncode == 0:
                wheel = Path(pip_dir) / f"pip-{PIP_FOR_BIGBENCH}-py3-none-any.whl"
                command = [sys.executable, str(wheel / "pip"), *args]  # pip runs from its own wheel
                result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"downloading the BIG-bench data failed ({' '.join(command)}):\n{result.stderr[-2000:]}\n"
            "It needs access to the Python package index; or put bigbench-1.0.0.tar.gz into "
            f"{dest.parent / 'sdist'} yourself."
        )


def fetch_bigbench_tasks(
    names: Sequence[str],
    cache_dir: str | os.PathLike[str] | None = None,
    download: Downloader = download_bigbench_sdist,
) -> dict[str, list[Path]]:
    """Make sure the `task.json` files of BIG-bench tasks are extracted in the cache; return their paths.

    Nothing is downloaded or extracted when the files are there already. Otherwise the sdist is downloaded
    (once, with `download`) and only the needed `task.json` files are extracted, each written atomically.

    Args:
        names: task names without the `bigbench:` prefix, `"navigate"` or `"multiemo/all_text_en"`.
        cache_dir: cache folder; default `comoe_peft.experiments.cache.default_cache_dir()`.
        download: function that downloads the sdist into the folder it is given (tests replace it).

    Returns:
        for every name, its `task.json` paths (the task's own first, then subtasks in sorted order).
    """
    root = bigbench_dir(cache_dir)
    for name in names:
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"invalid BIG-bench task name {name!r}; use 'task' or 'task/subtask'")
    _check_known(names, _read_index(root), root)
    missing = [name for name in names if not _is_extracted(root, name)]
    if missing:
        sdist = _ensure_sdist(root, download)
        logger.info("extracting BIG-bench task files %s into %s", missing, root)
        available = _extract(sdist, root, missing)
        _check_known(missing, available, root)
    return {name: _task_files(root, name) for name in names}


def _ensure_sdist(root: Path, download: Downloader) -> Path:
    sdist = root / "sdist" / SDIST_NAME
    if sdist.is_file():
        return sdist
    sdist.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading BIG-bench task data (%s, 358 MB) into %s; once", SDIST_NAME, sdist.parent)
    with tempfile.TemporaryDirectory(dir=root, prefix="download-") as tmp:
        download(Path(tmp))
        if not (Path(tmp) / SDIST_NAME).is_file():
            raise RuntimeError(f"the BIG-bench download did not produce {SDIST_NAME}")
        os.replace(Path(tmp) / SDIST_NAME, sdist)
    logger.info("downloaded %s", sdist)
    return sdist


def _is_extracted(root: Path, name: str) -> bool:
    if "/" in name:
        return (root / name / "task.json").is_file()
    return (root / name / _MANIFEST).is_file()


def _task_files(root: Path, name: str) -> list[Path]:
    if "/" in name:
        return [root / name / "task.json"]
    relative = json.loads((root / name / _MANIFEST).read_text())
    return [root / r for r in relative]


def _extract(sdist: Path, root: Path, names: Sequence[str]) -> set[str]:
    """Extract the task.json files of `names` in one pass over the archive; return all task names seen."""
    whole = {n for n in names if "/" not in n}
    subtasks = {n for n in names if "/" in n}
    extracted: dict[str, list[str]] = {n: [] for n in whole}
    available: set[str] = set()
    with tarfile.open(sdist, "r|gz") as archive:  # one sequential pass
        for member in archive:
            task_dir = _task_dir(member)
            if task_dir is None:
                continue
            available.add(task_dir)
            top = task_dir.split("/")[0]
            if top in whole or task_dir in subtasks:
                relative = f"{task_dir}/task.json"
                _write_atomic(root / relative, archive.extractfile(member).read())
                if top in whole:
                    extracted[top].append(relative)
    available |= {name.split("/")[0] for name in available}
    for name, relative in extracted.items():
        if relative:
            relative.sort(key=lambda r: (r.count("/"), r))
            _write_atomic(root / name / _MANIFEST, json.dumps(relative).encode())
    _write_atomic(root / _INDEX, json.dumps(sorted(available)).encode())
    return available


def _task_dir(member: tarfile.TarInfo) -> str | None:
    """`"task"` or `"task/subtask"` for a BIG-bench task.json member, else `None`."""
    if not member.isfile() or not member.name.startswith(_MEMBER_PREFIX):
        return None
    parts = member.name[len(_MEMBER_PREFIX) :].split("/")
    if parts[-1] != "task.json" or len(parts) not in (2, 3) or ".." in parts:
        return None
    return "/".join(parts[:-1])


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are plain cache files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_index(root: Path) -> set[str] | None:
    index = root / _INDEX
    return set(json.loads(index.read_text())) if index.is_file() else None


SUGGESTION_CUTOFF = 0.75  # difflib ratio: "navigat" -> navigate (0.93); "no_such_task" -> suicide_risk is 0.5


def close_matches(name: str, available: Sequence[str] | set[str], n: int = 5) -> list[str]:
    """The names of `available` close enough to `name` to be a typo of it (difflib), best first; [] if none is."""
    return difflib.get_close_matches(name, sorted(available), n=n, cutoff=SUGGESTION_CUTOFF)


def _check_known(names: Sequence[str], available: set[str] | None, root: Path) -> None:
    if available is None:
        return
    for name in names:
        if name not in available:
            close = close_matches(name, available)
            examples = close or sorted(n for n in available if "/" not in n)[:8]
            raise ValueError(
                f"unknown BIG-bench task {name!r}; {'did you mean' if close else 'available include'}: "
                f"{', '.join(examples)} (all tasks and subtasks are listed in {root / _INDEX})"
            )


# BIG-bench: parsing


def parse_bigbench_task(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Rows in the schema of `comoe_peft.experiments.data` from one parsed BIG-bench `task.json`.

    The prompt is the task prefix, the example input prefix and the input. An example with `target_scores`
    is multiple choice (choices: its keys; answer: the key with the highest score; examples with a tie for
    the highest score or no positive score are skipped), unless it also has `target` and the task is
    scored by exact match (`preferred_score`), as in `arithmetic`: then it is generation with the
    (first) target as answer.
    """
    generative = data.get("preferred_score") == "exact_str_match"
    rows = []
    for example in data.get("examples", []):
        prompt = _bigbench_prompt(data, example.get("input", ""))
        if "target_scores" in example and not (generative and "target" in example):
            answer_choices = _multiple_choice(example["target_scores"])
        else:
            answer_choices = _generation(example.get("target"))
        if prompt and answer_choices is not None:
            answer, choices = answer_choices
            rows.append({"task": task, "prompt": prompt, "choices": choices, "answer": answer})
    return rows


def _bigbench_prompt(data: dict[str, Any], text: str) -> str:
    parts = (data.get("task_prefix") or "", (data.get("example_input_prefix") or "") + str(text))
    return "\n".join(part.strip() for part in parts if part.strip())


def _multiple_choice(scores: dict[str, float]) -> tuple[str, list[str]] | None:
    choices = [key.strip() for key in scores]
    best = max(scores.values(), default=0)
    winners = [key.strip() for key, score in scores.items() if score == best]
    if best <= 0 or len(winners) != 1 or len(set(choices)) != len(choices) or not all(choices):
        return None
    return winners[0], choices


def _generation(target: Any) -> tuple[str, list[str]] | None:
    if isinstance(target, list):
        target = target[0] if target else None
    answer = str(target).strip() if target is not None else ""
    return (answer, []) if answer else None


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop exact repeats of (prompt, choices, answer), keeping the first."""
    seen, kept = set(), []
    for row in rows:
        key = (row["prompt"], tuple(row["choices"]), row["answer"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def load_bigbench_rows(name: str, files: Sequence[Path]) -> list[dict[str, Any]]:
    """Parse and de-duplicate the rows of one BIG-bench task from its extracted `task.json` files."""
    rows = []
    for path in files:
        rows += parse_bigbench_task(json.loads(path.read_text(encoding="utf-8")), f"bigbench:{name}")
    return _dedupe(rows)


# synthetic tasks


def _unique(make: Callable[[random.Random], dict[str, Any]], rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(10 * n + 1000):
        if len(rows) == n:
            break
        row = make(rng)
        rows.setdefault(row["prompt"], row)
    return list(rows.values())


def _arithmetic(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        return {"prompt": f"What is {a} plus {b}?", "choices": [], "answer": str(a + b)}
    return {"prompt": f"What is {a} minus {b}?", "choices": [], "answer": str(a - b)}


def _parity(rng: random.Random) -> dict[str, Any]:
    bits = "".join(rng.choice("01") for _ in range(rng.randint(6, 12)))
    answer = "even" if bits.count("1") % 2 == 0 else "odd"
    return {"prompt": f"Is the number of 1s in {bits} even or odd?", "choices": ["even", "odd"], "answer": answer}


def _sort_letters(rng: random.Random) -> dict[str, Any]:
    letters = rng.sample(string.ascii_lowercase, rng.randint(4, 7))
    return {
        "prompt": f"Sort these letters alphabetically: {' '.join(letters)}",
        "choices": [],
        "answer": " ".join(sorted(letters)),
    }


SYNTHETIC_TASKS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "arithmetic": _arithmetic,
    "parity": _parity,
    "sort_letters": _sort_letters,
}


def synthetic_rows(name: str, seed: int, n: int = SYNTHETIC_SIZE) -> list[dict[str, Any]]:
    """`n` distinct rows of the synthetic task `name`; the same seed gives the same rows."""
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; available: {', '.join(sorted(SYNTHETIC_TASKS))}")
    rows = _unique(SYNTHETIC_TASKS[name], random.Random(f"synthetic:{name}/{seed}"), n)
    if len(rows) < n:
        raise ValueError(f"synthetic:{name} has only about {len(rows)} distinct examples; ask for fewer than {n}")
    return [{"task": f"synthetic:{name}", **row} for row in rows]


# task specs


def parse_task_spec(spec: str | Sequence[str]) -> list[str]:
    """Split a spec (a comma-separated string or a list; `"default"` means `DEFAULT_TASKS`) into task strings."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        for name in DEFAULT_TASKS if item == "default" else [item] if item else []:
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no task in {spec!r}; name tasks like 'bigbench:navigate,synthetic:arithmetic'")
    for name in names:
        source, _, task = name.partition(":")
        if source not in ("bigbench", "synthetic") or not task:
            raise ValueError(
                f"unknown task {name!r}: use 'bigbench:<task>[/<subtask>]' or "
                f"'synthetic:<{'|'.join(sorted(SYNTHETIC_TASKS))}>'"
            )
    return names


def load_tasks(
    spec: str | Sequence[str],
    seed: int,
    max_examples_per_task: int | None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load built-in tasks as one dataset in the schema of `comoe_peft.experiments.data`.

    Args:
        spec: `"bigbench:navigate,synthetic:arithmetic"`, a list of such strings, or `"default"`.
        seed: seeds synthetic generation and the subset drawn when a task is larger than the cap.
        max_examples_per_task: cap per task (a seeded subset, in original order); `None` keeps all
            (synthetic tasks then have `SYNTHETIC_SIZE` rows).
        cache_dir: cache folder for BIG-bench files; default `comoe_peft.experiments.cache.default_cache_dir()`.
    """
    if max_examples_per_task is not None and max_examples_per_task < 1:
        raise ValueError(f"max_examples_per_task must be >= 1 or None, got {max_examples_per_task}")
    names = parse_task_spec(spec)
    bigbench = [n.partition(":")[2] for n in names if n.startswith("bigbench:")]
    files = fetch_bigbench_tasks(bigbench, cache_dir) if bigbench else {}
    parts = []
    for name in names:
        source, _, task = name.partition(":")
        if source == "bigbench":
            rows = _subsample(load_bigbench_rows(task, files[task]), max_examples_per_task, seed, name)
        else:
            rows = synthetic_rows(task, seed, max_examples_per_task or SYNTHETIC_SIZE)
        validate_examples(rows, source=name)
        parts.append(Dataset.from_list(rows, features=EXAMPLE_FEATURES))
    return concatenate_datasets(parts)


def _subsample(rows: list[dict[str, Any]], n: int | None, seed: int, name: str) -> list[dict[str, Any]]:
    if n is None or len(rows) <= n:
        return rows
    keep = sorted(random.Random(f"{name}/{seed}").sample(range(len(rows)), n))
    return [rows[i] for i in keep]
