"""The library layer: CoMoE as a peft tuner (config, registration, layer, fused down-projection, losses, model).

It imports peft, transformers and torch only; never trl, the trainer or the experiment harness. Importing it
registers the `COMOE` peft type. The modules map one to one onto a future `peft/tuners/comoe/`.
"""

from .versions import MIN_PEFT, installed_version, require  # noqa: I001  (before anything imports peft)

require("peft", MIN_PEFT, "comoe_peft", installed_version("peft"))

from .peft_type import COMOE  # noqa: I001,E402  (adds PeftType.COMOE before the config is defined)
from .config import CoMoEConfig  # noqa: E402
from .layer import CoMoELayer, RoutingStats  # noqa: E402
from .model import CoMoEModel  # noqa: E402
from .registration import register  # noqa: E402

register()

__all__ = ["COMOE", "CoMoEConfig", "CoMoELayer", "CoMoEModel", "RoutingStats", "register"]
