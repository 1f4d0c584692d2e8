"""comoe_peft: CoMoE (contrastive mixture of LoRA experts) as a plugin for Hugging Face PEFT.

Importing this package registers the `COMOE` peft type, so `get_peft_model(model, CoMoEConfig(...))`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` work with stock peft calls. Import it before loading
a saved CoMoE adapter.

Three layers, imports running downwards only:

- `comoe_peft.tuner`: the peft plugin (imported here: it registers the peft type);
- `comoe_peft.training`: `CoMoESFTTrainer` and friends (loaded on first use of their names, so that
  `import comoe_peft` does not import trl);
- `comoe_peft.experiments`: the `comoe-peft` main job (CLI, tasks, evaluation, analysis).
"""

from __future__ import annotations

import importlib
from typing import Any

from .tuner import COMOE, CoMoEConfig, CoMoELayer, CoMoEModel, RoutingStats, register

__version__ = "0.1.0"

# Names of the training layer, imported on first access (PEP 562) so the library import stays free of trl.
_LAZY = {
    name: "comoe_peft.training"
    for name in (
        "CoMoEArgumentsMixin",
        "CoMoESFTConfig",
        "CoMoESFTTrainer",
        "CoMoETrainer",
        "CoMoETrainerMixin",
        "CoMoETrainingArguments",
        "CPUTimeCallback",
        "ExpertLoadHistoryCallback",
    )
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'comoe_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["COMOE", "CoMoEConfig", "CoMoELayer", "CoMoEModel", "RoutingStats", "__version__", "register", *_LAZY]
