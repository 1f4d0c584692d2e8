"""The training layer: the TRL / transformers trainers that add CoMoE's auxiliary losses, and their callbacks.

Imports the tuner layer below it, never the experiment harness above it. Only `CoMoESFTTrainer` and
`CoMoESFTConfig` (module `sft`) need trl (>= 1.9); they are imported on first use, so `CoMoETrainer`,
`CoMoETrainerMixin` and `CoMoETrainingArguments` work without trl or beside an older one (LLaMA-Factory's).
"""

from __future__ import annotations

import importlib
from typing import Any

from .callbacks import CPUTimeCallback, ExpertLoadHistoryCallback
from .mixin import CoMoEArgumentsMixin, CoMoETrainer, CoMoETrainerMixin, CoMoETrainingArguments

_SFT_NAMES = ("CoMoESFTConfig", "CoMoESFTTrainer")


def __getattr__(name: str) -> Any:
    if name in _SFT_NAMES:
        value = getattr(importlib.import_module(".sft", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CPUTimeCallback",
    "CoMoEArgumentsMixin",
    "CoMoESFTConfig",
    "CoMoESFTTrainer",
    "CoMoETrainer",
    "CoMoETrainerMixin",
    "CoMoETrainingArguments",
    "ExpertLoadHistoryCallback",
]
