"""`RoutingHistoryCallback`: routing entropy and JS divergence between tasks at chosen steps of a training run.

At each step of `steps` the callback runs `comoe_peft.experiments.analysis.analyze_model` (the same metrics as
`comoe-peft analyze`, one implementation) on a small fixed probe set of held-out examples per task, and keeps the
summary. The history is written as `routing_history.json` into every checkpoint (read back on resume) and, by
`comoe_peft.experiments.jobs.train`, into the run folder. Format:

```text
{"steps": [...], "history": [{"step": 25, "routing_entropy": .., "mean_js_between_tasks": .., "load_cv": ..,
                              "per_task_entropy": {"task": ..}}]}
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comoe_peft.tuner.files import write_json_atomic
from .runs import ROUTING_HISTORY

SUMMARY_KEYS = ("routing_entropy", "mean_js_between_tasks", "load_cv")


def routing_point(model: torch.nn.Module, tokenizer: Any, probe: Any, max_length: int, seed: int) -> dict[str, Any]:
    """Routing entropy (nats), mean JS between tasks and load CV of `model` on `probe` (rows with task, prompt,
    choices, answer); the global RNG state is left as it was, so training draws the same dropout masks."""
    from .analysis import analyze_model

    with torch.random.fork_rng(devices=[]):
        result = analyze_model(model, tokenizer, probe, max_examples_per_task=None, max_length=max_length,
                               seed=seed, progress=False)
    point = {key: result["summary"][key] for key in SUMMARY_KEYS}
    point["per_task_entropy"] = {task: row["routing_entropy"] for task, row in result["per_task"].items()}
    return point


class RoutingHistoryCallback(TrainerCallback):
    """Measures the routing on `probe` after the optimizer steps listed in `steps` (see the module docstring)."""

    def __init__(self, probe: Any, tokenizer: Any, steps: Sequence[int], max_length: int, seed: int = 0) -> None:
        self.probe, self.tokenizer, self.max_length, self.seed = probe, tokenizer, max_length, seed
        self.steps = sorted(set(int(s) for s in steps))
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step > 0 and not self.history:
            saved = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", ROUTING_HISTORY)
            if os.path.isfile(saved):
                with open(saved, encoding="utf-8") as handle:
                    self.history = [e for e in json.load(handle)["history"] if e["step"] <= state.global_step]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is None or state.global_step not in self.steps:
            return
        if any(e["step"] == state.global_step for e in self.history):
            return
        point = routing_point(model, self.tokenizer, self.probe, self.max_length, self.seed)
        self.history.append({"step": state.global_step, **point})

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.write(os.path.join(folder, ROUTING_HISTORY))

    def write(self, path: str | os.PathLike) -> None:
        """Write the history to `path` atomically."""
        write_json_atomic(path, {"steps": self.steps, "history": self.history})
