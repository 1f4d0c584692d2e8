"""The training layer: the TRL / transformers trainers that add CoMoE's auxiliary losses, and their callbacks.

Imports the tuner layer below it, never the experiment harness above it.
"""

from .callbacks import CPUTimeCallback, ExpertLoadHistoryCallback
from .trainer import (
    CoMoEArgumentsMixin,
    CoMoESFTConfig,
    CoMoESFTTrainer,
    CoMoETrainer,
    CoMoETrainerMixin,
    CoMoETrainingArguments,
)

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
