"""The trainers by their public path: `CoMoETrainer`, `CoMoETrainerMixin`, `CoMoETrainingArguments`,
`CoMoEArgumentsMixin` (module `mixin`, no trl) and `CoMoESFTTrainer`, `CoMoESFTConfig` (module `sft`, trl >= 1.9,
imported on first use of their names, so this module imports without trl or beside an older one)."""

from __future__ import annotations

import importlib
from typing import Any

from .mixin import CoMoEArgumentsMixin, CoMoETrainer, CoMoETrainerMixin, CoMoETrainingArguments

_SFT_NAMES = ("CoMoESFTConfig", "CoMoESFTTrainer")


def __getattr__(name: str) -> Any:
    if name in _SFT_NAMES:
        return getattr(importlib.import_module(".sft", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CoMoEArgumentsMixin", "CoMoESFTConfig", "CoMoESFTTrainer", "CoMoETrainer", "CoMoETrainerMixin",
           "CoMoETrainingArguments"]
