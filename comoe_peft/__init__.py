"""comoe_peft: CoMoE (contrastive mixture of LoRA experts) as a plugin for Hugging Face PEFT.

Importing this package registers the `COMOE` peft type, so `get_peft_model(model, CoMoEConfig(...))`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` work with stock peft calls. Import it before loading
a saved CoMoE adapter.
"""

from .peft_type import COMOE  # noqa: I001  (adds PeftType.COMOE before the config is defined)
from .config import CoMoEConfig
from .layer import CoMoELayer, RoutingStats
from .model import CoMoEModel
from .registration import register

__version__ = "0.1.0"

register()

__all__ = ["COMOE", "CoMoEConfig", "CoMoELayer", "CoMoEModel", "RoutingStats", "__version__", "register"]
