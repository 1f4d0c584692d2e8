"""Run folders of the `comoe-peft` command: created atomically, never overwritten unless asked.

A run folder holds what one `comoe-peft train` produced and what `eval` and `analyze` add later:

| path in `RUN/` | content |
|---|---|
| `run_config.json` | the options used, the resolved model, library versions (`RUN_CONFIG`) |
| `adapter/` | the trained adapter, peft `save_pretrained` (`ADAPTER_DIR`; none for `--method base`) |
| `data/test/` | the held-out examples, datasets `save_to_disk` (`TEST_DATA_DIR`) |
| `trainer/` | TRL's output folder: logs, expert-load history (`TRAINER_DIR`) |
| `log_history.json` | the trainer's log history (`LOG_HISTORY`) |
| `eval_results.json` | written by `comoe-peft eval` (`EVAL_RESULTS`) |
| `lm_eval_tasks/` | the held-out examples as lm-eval tasks, YAML + JSONL, written by `comoe-peft eval` (`LM_EVAL_TASKS_DIR`) |
| `lm_eval_results.json` | written by `comoe-peft eval --tasks arc_easy,...`: lm-eval's own tasks (`LM_EVAL_RESULTS`) |
| `analysis/` | written by `comoe-peft analyze` (`ANALYSIS_DIR`) |
| `routing_history.json` | routing entropy and JS between tasks during training (`ROUTING_HISTORY`, comoe / moe) |

A run trained with checkpoints (`--save-steps`) is built in `.RUN.partial/` beside `RUN` instead of a temporary
folder: it holds the options it was started with and TRL's checkpoints, survives a stop, and the same command
started again resumes from its last checkpoint (`start_resumable_run`).

While `train` writes a run, it holds an exclusive lock on `.RUN.lock` beside it (`lock_run`; removed when the run
ends, released by the system if the process dies): a second `train` into the same folder (two terminals, two
study processes on two cores) is refused with the first one's pid instead of both writing one partial folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded against a second writer there
    fcntl = None

from comoe_peft.tuner.files import default_permissions, write_json_atomic

RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
TEST_DATA_DIR = "data/test"
TRAINER_DIR = "trainer"
LOG_HISTORY = "log_history.json"
EVAL_RESULTS = "eval_results.json"
LM_EVAL_TASKS_DIR = "lm_eval_tasks"
LM_EVAL_RESULTS = "lm_eval_results.json"
ANALYSIS_DIR = "analysis"
ROUTING_HISTORY = "routing_history.json"
PARTIAL_OPTIONS = "train_options.json"
# options that may differ between the first start of a run and its resumption
RESUME_IGNORED = ("output_dir", "overwrite")


class RunError(Exception):
    """A problem with the user's input (command-line arguments, files, folders) that the CLI reports in one line."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a command, with one line that says where it stopped and what was kept (the CLI prints it and
    exits with 130)."""


def check_target(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved `output_dir`, or a `RunError` if it is a file or an existing run not to be overwritten."""
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise RunError(f"output folder '{target}' exists and is a file; choose another --output-dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise RunError(
            f"output folder '{target}' already holds files; choose another --output-dir, or pass --overwrite to "
            "replace it (the old run is kept until the new one has finished)"
        )
    return target


def start_run(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Check that `output_dir` may be written and return a fresh staging folder beside it.

    The run is built in the staging folder and moved into place by `finish_run`, so a failed or interrupted run
    never leaves a half-written folder, and an existing run is only replaced at the very end (with `overwrite`).
    """
    target = check_target(output_dir, overwrite)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))
        default_permissions(staging, directory=True)
    except OSError as error:
        raise RunError(f"cannot write the output folder '{target}': {error.strerror or error}") from None
    return staging


def missing_parents(output_dir: str | os.PathLike) -> list[Path]:
    """The folders above `output_dir` that do not exist yet (deepest first): what starting a run there creates."""
    parent = Path(output_dir).expanduser().resolve().parent
    return [folder for folder in [parent, *parent.parents] if not folder.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) as long as they are empty: a failed run leaves no empty `runs/` behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def lock_path(output_dir: str | os.PathLike) -> Path:
    """The lock file of a run being written: `.NAME.lock` beside the run folder `NAME`."""
    target = Path(output_dir).expanduser().resolve()
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def lock_run(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the run `output_dir` while it is written; a `RunError` naming the holder's pid if
    another process holds it. Creates the folders above the run; the lock file is removed on leaving."""
    target, path = Path(output_dir).expanduser().resolve(), lock_path(output_dir)
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    except OSError as error:
        raise RunError(f"cannot write the output folder '{target}': {error.strerror or error}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunError(f"'{target}' is being written by another process (pid {holder}); wait for it to finish, "
                           "or choose another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: a waiting start then makes a fresh file


def partial_dir(output_dir: str | os.PathLike) -> Path:
    """Where a checkpointed run is built until it finishes: `.NAME.partial/` beside the run folder `NAME`."""
    target = Path(output_dir).expanduser().resolve()
    return target.with_name(f".{target.name}.partial")


def start_resumable_run(output_dir: str | os.PathLike, overwrite: bool, options: dict[str, Any]) -> Path:
    """The staging folder of a checkpointed run: a new `partial_dir`, or the one an earlier start left behind.

    An existing partial folder is only taken over when it was started with the same `options` (all but
    `RESUME_IGNORED`); otherwise a `RunError` names the differences and nothing is touched.
    """
    check_target(output_dir, overwrite)
    staging = partial_dir(output_dir)
    saved = staging / PARTIAL_OPTIONS
    wanted = {k: v for k, v in options.items() if k not in RESUME_IGNORED}
    if saved.is_file():
        stored = {k: v for k, v in json.loads(saved.read_text(encoding="utf-8")).items() if k not in RESUME_IGNORED}
        differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        if differ:
            details = ", ".join(f"{k}: stored {_show(stored.get(k))}, asked {_show(wanted.get(k))}" for k in differ)
            raise RunError(f"'{staging}' holds an unfinished run started with other settings ({details}); start it "
                           "with the same options to resume it, or delete that folder to start again")
        return staging
    try:
        staging.mkdir(parents=True, exist_ok=True)
        default_permissions(staging, directory=True)
        write_json(saved, options)
    except OSError as error:
        raise RunError(f"cannot write the output folder '{staging.parent}': {error.strerror or error}") from None
    return staging


def last_checkpoint(staging: Path) -> str | None:
    """The newest complete `checkpoint-STEP` folder of TRL's output folder in `staging`, or None.

    A checkpoint counts once its `trainer_state.json` is there (the trainer writes it last), so one cut short
    by a kill while saving is passed over for the one before.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = staging / TRAINER_DIR
    steps = [int(p.name.rsplit("-", 1)[1]) for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(folder / f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


def finish_run(staging: Path, output_dir: str | os.PathLike) -> Path:
    """Move the finished staging folder to `output_dir`, replacing an older run only now."""
    target = Path(output_dir).expanduser().resolve()
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return target


def open_run(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Return the folder and the run configuration of a finished run, or a `RunError` saying what is missing."""
    folder = Path(run_dir).expanduser().resolve()
    config_path = folder / RUN_CONFIG
    if not folder.is_dir():
        raise RunError(f"run folder '{folder}' does not exist; pass a folder written by `comoe-peft train`")
    if not config_path.is_file():
        raise RunError(f"'{folder}' is not a comoe-peft run folder (no {RUN_CONFIG}); pass the --output-dir of a train")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise damaged_file_error(config_path, error) from None
    if config.get("method") != "base" and not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        raise RunError(f"run folder '{folder}' has no trained adapter in '{ADAPTER_DIR}/'; the training did not finish")
    return folder, config


def damaged_file_error(path: Path, error: Exception) -> RunError:
    """The one-line error for a run file that exists but cannot be read (truncated, overwritten, half copied)."""
    return RunError(f"'{path}' cannot be read ({' '.join(str(error).split())}): the file is damaged or incomplete; "
                    "restore it from a copy of the run, or train the run again with --overwrite")


def _show(value: Any) -> str:
    """An option's value in a message: as JSON (a list as [2, 5]; no value as not set), never Python's None."""
    return "not set" if value is None else json.dumps(value)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    write_json_atomic(path, payload)
