"""The library layer: CoMoE as a peft tuner (config, registration, layer, fused down-projection, losses, model).

It imports peft, transformers and torch only; never trl, the trainer or the experiment harness. Importing it
registers the `COMOE` peft type. The modules map one to one onto a future `peft/tuners/comoe/`.
"""

from .peft_type import COMOE  # noqa: I001  (adds PeftType.COMOE before the config is defined)
from .config import CoMoEConfig
from .layer import CoMoELayer, RoutingStats
from .model import CoMoEModel
from .registration import register

register()

__all__ = ["COMOE", "CoMoEConfig", "CoMoELayer", "CoMoEModel", "RoutingStats", "register"]
