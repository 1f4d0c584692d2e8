"""Registers CoMoE with peft through its public `register_peft_method` (no patching of peft code paths)."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import CoMoEConfig
from .model import CoMoEModel
from .peft_type import COMOE

METHOD_NAME = "comoe"


def register() -> None:
    """Make the `COMOE` peft type known to peft. Runs on `import comoe_peft`; calling it again does nothing."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(COMOE) is not None:
        if PEFT_TYPE_TO_CONFIG_MAPPING[COMOE].__qualname__ == CoMoEConfig.__qualname__:
            # registered already (possibly by an earlier import of a reloaded module): point at the current classes
            PEFT_TYPE_TO_CONFIG_MAPPING[COMOE] = CoMoEConfig
            PEFT_TYPE_TO_TUNER_MAPPING[COMOE] = CoMoEModel
            return
        raise RuntimeError(f"peft already has another method registered as {COMOE!r}; cannot register CoMoE.")
    register_peft_method(name=METHOD_NAME, config_cls=CoMoEConfig, model_cls=CoMoEModel, prefix=CoMoEModel.prefix)


def is_registered() -> bool:
    """Whether peft currently knows the `COMOE` type (and its prefix `comoe_`)."""
    return PEFT_TYPE_TO_PREFIX_MAPPING.get(COMOE) == CoMoEModel.prefix
