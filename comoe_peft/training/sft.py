"""`CoMoESFTTrainer`: TRL's `SFTTrainer` with CoMoE's auxiliary losses and metrics (`CoMoETrainerMixin`).

The only module of the package that imports trl, and it needs trl >= 1.9 (the `SFTTrainer` API it was tested with,
from axolotl's pin to the newest): an older or missing trl is one `ImportError` line naming the minimum. The plain
`transformers.Trainer` path (`comoe_peft.training.trainer.CoMoETrainer`, `CoMoETrainerMixin`) needs no trl.
"""

from __future__ import annotations

from dataclasses import dataclass

from comoe_peft.tuner.versions import MIN_TRL, installed_version, require

from .mixin import CoMoEArgumentsMixin, CoMoETrainerMixin

require("trl", MIN_TRL, "CoMoESFTTrainer", installed_version("trl"),
        alternative="or use CoMoETrainer, the plain transformers.Trainer path, which needs no trl")

from trl import SFTConfig, SFTTrainer  # noqa: E402  (after the version check, so an old trl fails in one line)


@dataclass
class CoMoESFTConfig(CoMoEArgumentsMixin, SFTConfig):
    """TRL's `SFTConfig` plus the `comoe_*` overrides of `CoMoEArgumentsMixin`."""


class CoMoESFTTrainer(CoMoETrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` that trains a CoMoE adapter with the paper's contrastive loss.

    Construct it like `SFTTrainer`, either with a base model and `peft_config=CoMoEConfig(...)` or with a model
    already wrapped by `get_peft_model`. Loss coefficients come from the `CoMoEConfig`; `CoMoESFTConfig` can
    override them. Reentrant gradient checkpointing is refused (it would silently drop the auxiliary gradient).

    Example:
        ```python
        from comoe_peft import CoMoEConfig, CoMoESFTConfig, CoMoESFTTrainer

        trainer = CoMoESFTTrainer(
            model=base_model,
            args=CoMoESFTConfig(output_dir="run", max_steps=2, bf16=False, report_to="none"),  # bf16=True on GPUs
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=CoMoEConfig(num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
        ```
    """
