"""Callbacks: `ExpertLoadHistoryCallback` (per-layer expert-load histories of a training run, saved as JSON beside
checkpoints) and `CPUTimeCallback` (the CPU time of a run, across resumes)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comoe_peft.tuner.model import find_comoe_model

from comoe_peft.tuner.files import write_json_atomic

HISTORY_FILENAME = "expert_load_history.json"


class ExpertLoadHistoryCallback(TrainerCallback):
    """Records, at every logging step, each adapted layer's expert load averaged over the steps since the last log.

    The history is written as `expert_load_history.json` into every checkpoint folder and into `output_dir` at the
    end of training; on resume it is read back from the checkpoint. Format (`N` shares per module, summing to 1):

    ```text
    {"num_experts": N, "history": [{"step": 10, "expert_load": {"model.layers.0.self_attn.q_proj": [..N..]}}]}
    ```

    Each step contributes the load of its last micro-batch (the routing statistics of the last forward pass).
    `num_experts` is null when the layers have different numbers of experts (`num_experts_pattern`).
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step > 0 and not self.history:
            saved = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", HISTORY_FILENAME)
            if os.path.isfile(saved):
                with open(saved, encoding="utf-8") as handle:
                    self.history = [e for e in json.load(handle)["history"] if e["step"] <= state.global_step]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is None:
            return
        for name, stats in find_comoe_model(model).get_routing_stats().items():
            load = stats.expert_load.detach()
            self._sums[name] = self._sums[name] + load if name in self._sums else load.clone()
        self._count += 1

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self._count == 0:
            return
        loads = {name: (total / self._count).tolist() for name, total in self._sums.items()}
        self.history.append({"step": state.global_step, "expert_load": loads})
        self._sums, self._count = {}, 0

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                self.write(os.path.join(folder, HISTORY_FILENAME))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero and self.history:
            os.makedirs(args.output_dir, exist_ok=True)
            self.write(os.path.join(args.output_dir, HISTORY_FILENAME))

    def write(self, path: str) -> None:
        """Write the history to `path` atomically (a temporary file in the same folder, then a rename)."""
        num_experts: int | None = None
        if self.history and self.history[-1]["expert_load"]:
            sizes = {len(load) for load in self.history[-1]["expert_load"].values()}
            num_experts = sizes.pop() if len(sizes) == 1 else None  # None: N differs by layer
        payload = {"num_experts": num_experts, "history": self.history}
        write_json_atomic(path, payload)


CPU_TIME_FILENAME = "cpu_time.json"


class CPUTimeCallback(TrainerCallback):
    """Counts the process CPU time (all threads, seconds) spent in training, across stops and resumes.

    Each checkpoint gets `cpu_time.json` with the total up to that step; a resumed run starts from the total of its
    checkpoint, so `total()` at the end is the CPU time of the steps that were kept (work lost after the last
    checkpoint of a stopped run is not counted).
    """

    def __init__(self) -> None:
        self.before = 0.0  # CPU seconds of earlier starts, read back from the checkpoint
        self.started = time.process_time()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.started = time.process_time()
        saved = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", CPU_TIME_FILENAME)
        if state.global_step > 0 and os.path.isfile(saved):
            with open(saved, encoding="utf-8") as handle:
                self.before = json.load(handle)["train_cpu_time_s"]

    def total(self) -> float:
        """CPU seconds of training so far, earlier starts included."""
        return self.before + time.process_time() - self.started

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            write_json_atomic(os.path.join(folder, CPU_TIME_FILENAME), {"train_cpu_time_s": self.total()})
