"""Run folders of the `comoe-peft` command: created atomically, never overwritten unless asked.

A run folder holds what one `comoe-peft train` produced and what `eval` and `analyze` add later:

| path in `RUN/` | content |
|---|---|
| `run_config.json` | the options used, the resolved model, library versions (`RUN_CONFIG`) |
| `adapter/` | the trained adapter, peft `save_pretrained` (`ADAPTER_DIR`) |
| `data/test/` | the held-out examples, datasets `save_to_disk` (`TEST_DATA_DIR`) |
| `trainer/` | TRL's output folder: logs, expert-load history (`TRAINER_DIR`) |
| `log_history.json` | the trainer's log history (`LOG_HISTORY`) |
| `eval_results.json` | written by `comoe-peft eval` (`EVAL_RESULTS`) |
| `analysis/` | written by `comoe-peft analyze` (`ANALYSIS_DIR`) |
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .files import default_permissions, write_json_atomic

RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
TEST_DATA_DIR = "data/test"
TRAINER_DIR = "trainer"
LOG_HISTORY = "log_history.json"
EVAL_RESULTS = "eval_results.json"
ANALYSIS_DIR = "analysis"


class RunError(Exception):
    """A problem with the user's input (command-line arguments, files, folders) that the CLI reports in one line."""


def start_run(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Check that `output_dir` may be written and return a fresh staging folder beside it.

    The run is built in the staging folder and moved into place by `finish_run`, so a failed or interrupted run
    never leaves a half-written folder, and an existing run is only replaced at the very end (with `overwrite`).
    """
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise RunError(f"output folder '{target}' exists and is a file; choose another --output-dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise RunError(
            f"output folder '{target}' already holds files; choose another --output-dir, or pass --overwrite to "
            "replace it (the old run is kept until the new one has finished)"
        )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))
        default_permissions(staging, directory=True)
    except OSError as error:
        raise RunError(f"cannot write the output folder '{target}': {error.strerror or error}") from None
    return staging


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
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        raise RunError(f"run folder '{folder}' has no trained adapter in '{ADAPTER_DIR}/'; the training did not finish")
    return folder, config


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    write_json_atomic(path, payload)
