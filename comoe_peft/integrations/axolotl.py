"""The axolotl plugin: `adapter: comoe` in an axolotl YAML trains a CoMoE adapter with the auxiliary losses.

```yaml
plugins:
  - comoe_peft.integrations.axolotl.CoMoEPlugin
adapter: comoe
comoe:                      # any CoMoEConfig field, with CoMoEConfig's names
  num_experts: 4
  top_k: 2
  contrastive_loss_coef: 0.01
```

The hooks of axolotl 0.19's `BasePlugin` it uses, in the order axolotl calls them:

- `get_input_args`: `CoMoEArgs`, the YAML fields (the `comoe` block and the trainer's `comoe_*` fields); its
  validator builds the `CoMoEConfig` while the YAML is read, so a bad value stops axolotl with CoMoEConfig's
  one-line message before anything loads.
- `get_adapter_capabilities`: declares the adapter name `comoe` (axolotl refuses adapter names no plugin declares).
- `get_training_args_mixin` / `get_training_args`: the trainer's `comoe_*` fields on axolotl's training arguments.
- `load_adapter`: `get_peft_model(model, CoMoEConfig(...))`, or `PeftModel.from_pretrained` for `lora_model_dir`.
- `get_trainer_cls`: axolotl's own trainer (or `trainer_cls`) with `CoMoETrainerMixin` in front, which adds the
  weighted auxiliary losses to the loss (gradient-accumulation-correct) and logs the `comoe/*` metrics.
- `post_train`: adds the "import comoe_peft first" note to the model card axolotl wrote.

axolotl saves the adapter as for LoRA (`adapter_config.json` with `peft_type: COMOE` and
`adapter_model.safetensors`); it loads with `PeftModel.from_pretrained` after `import comoe_peft`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from peft import PeftConfig, PeftModel, get_peft_model
from pydantic import BaseModel, Field, model_validator

from comoe_peft.training.trainer import CoMoEArgumentsMixin, CoMoETrainerMixin
from comoe_peft.tuner.config import CoMoEConfig
from comoe_peft.tuner.registration import write_loading_note

ADAPTER = "comoe"

# The fields a user may set in the `comoe:` block: CoMoEConfig's own (PeftConfig's bookkeeping fields are set here).
COMOE_FIELDS = tuple(
    f.name for f in dataclasses.fields(CoMoEConfig) if f.name not in {g.name for g in dataclasses.fields(PeftConfig)}
)
# CoMoEConfig field <- axolotl's LoRA key, used when the `comoe:` block leaves the field out.
LORA_KEYS = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
    "modules_to_save": "lora_modules_to_save",
}
TRAINER_FIELDS = tuple(f.name for f in dataclasses.fields(CoMoEArgumentsMixin))  # comoe_contrastive_loss_coef, ...


def _plain(value: Any) -> Any:
    """axolotl's DictDefault (and lists of them) as plain dicts and lists, so the config saves as plain JSON."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def comoe_config(cfg: Mapping[str, Any]) -> CoMoEConfig:
    """The `CoMoEConfig` an axolotl config asks for: the `comoe:` block, with axolotl's `lora_r`, `lora_alpha`,
    `lora_dropout`, `lora_target_modules` (or `lora_target_linear: true`, i.e. "all-linear") and
    `lora_modules_to_save` filling in the fields the block leaves out. Raises a one-line ValueError."""
    block = _plain(cfg.get("comoe") or {})
    if not isinstance(block, dict):
        raise ValueError(f"comoe: must be a mapping of CoMoEConfig fields (e.g. num_experts: 4), got {block!r}.")
    unknown = sorted(set(block) - set(COMOE_FIELDS))
    if unknown:
        raise ValueError(
            f"comoe.{unknown[0]} is not a CoMoEConfig field; the comoe: block takes: {', '.join(COMOE_FIELDS)}."
        )
    kwargs = {field: _plain(cfg.get(key)) for field, key in LORA_KEYS.items() if cfg.get(key) is not None}
    if "target_modules" not in kwargs and cfg.get("lora_target_linear"):
        kwargs["target_modules"] = "all-linear"
    kwargs.update(block)
    return CoMoEConfig(task_type="CAUSAL_LM", **kwargs)


def check_axolotl_config(cfg: Mapping[str, Any]) -> CoMoEConfig | None:
    """Refuse, with one line each, what the plugin cannot train; return the CoMoEConfig for `adapter: comoe`."""
    adapter = cfg.get("adapter")
    if adapter != ADAPTER:
        if cfg.get("comoe"):
            raise ValueError(
                f"comoe: is set but adapter is {adapter!r}; set adapter: comoe, or remove the comoe block."
            )
        return None
    refused = {
        "rl": "adapter: comoe trains with supervised fine-tuning only; remove rl",
        "reward_model": "adapter: comoe trains with supervised fine-tuning only; remove reward_model",
        "process_reward_model": "adapter: comoe trains with supervised fine-tuning only; remove process_reward_model",
        "load_in_4bit": "adapter: comoe takes a full-precision base in axolotl; remove load_in_4bit (comoe-peft's "
                        "own trainer trains quantized bases, see its QLoRA guide)",
        "load_in_8bit": "adapter: comoe takes a full-precision base in axolotl; remove load_in_8bit (comoe-peft's "
                        "own trainer trains quantized bases, see its QLoRA guide)",
        "gptq": "adapter: comoe takes a full-precision base in axolotl; remove gptq",
        "merge_lora": "a CoMoE adapter's routed experts cannot be merged into the base weights; remove merge_lora "
                      "and load the adapter with PeftModel.from_pretrained after `import comoe_peft`",
        "relora": "adapter: comoe has no ReLoRA restarts (they merge the adapter into the base); remove relora",
    }
    for key, message in refused.items():
        if cfg.get(key):
            value = getattr(cfg.get(key), "value", cfg.get(key))  # axolotl's enums (rl: RLType.DPO) as written
            raise ValueError(f"{message} (got {key}: {value!r}).")
    return comoe_config(cfg)


class CoMoEArgs(BaseModel):
    """The YAML fields of the plugin, merged by axolotl into its config schema."""

    comoe: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": "CoMoEConfig fields for adapter: comoe (num_experts, top_k, contrastive_loss_coef, ...); "
            "r, lora_alpha, lora_dropout, target_modules and modules_to_save default to axolotl's lora_* keys."
        },
    )
    comoe_contrastive_loss_coef: float | None = Field(
        default=None,
        ge=0,
        json_schema_extra={"description": "Overrides the adapter's contrastive_loss_coef in training."},
    )
    comoe_router_aux_loss_coef: float | None = Field(
        default=None,
        ge=0,
        json_schema_extra={"description": "Overrides the adapter's router_aux_loss_coef in training."},
    )
    comoe_router_z_loss_coef: float | None = Field(
        default=None,
        ge=0,
        json_schema_extra={"description": "Overrides the adapter's router_z_loss_coef in training."},
    )
    comoe_expert_load_history: bool = Field(
        default=True,
        json_schema_extra={"description": "Keep per-layer expert-load histories, saved next to checkpoints."},
    )
    comoe_router_lr_multiplier: float = Field(
        default=1.0, gt=0, json_schema_extra={"description": "The routers learn at learning_rate times this."}
    )

    @model_validator(mode="after")
    def _check_comoe(self):
        # `self` is axolotl's whole config here (this class is one of its bases), so the check sees adapter, lora_*
        check_axolotl_config(_FieldView(self))
        return self


class _FieldView(Mapping):
    """A pydantic model read as a mapping of its fields (None for a field it lacks)."""

    def __init__(self, model: BaseModel) -> None:
        self._model = model

    def __getitem__(self, key: str) -> Any:
        return getattr(self._model, key, None)

    def __iter__(self):
        return iter(type(self._model).model_fields)

    def __len__(self) -> int:
        return len(type(self._model).model_fields)


def comoe_trainer_cls(base: type) -> type:
    """`base` (a transformers Trainer subclass) with `CoMoETrainerMixin` in front, named `CoMoE<base name>`.

    Made on first use (importing axolotl's trainers when this module loads would build axolotl's training arguments
    before the plugins are registered) and kept as an attribute of this module, so that it pickles by name.
    """
    if issubclass(base, CoMoETrainerMixin):
        return base
    name = f"CoMoE{base.__name__}"
    made = globals().get(name)
    if made is None or made.__mro__[2] is not base:
        made = type(name, (CoMoETrainerMixin, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = made
    return made


class CoMoEPlugin(BasePlugin):
    """axolotl plugin for `adapter: comoe`: builds the CoMoE model, trains it with the auxiliary losses and
    `comoe/*` metrics, and lets axolotl save a standard peft adapter. See the module docstring for the hooks."""

    def get_input_args(self) -> str:
        return f"{__name__}.CoMoEArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER)]

    def get_training_args_mixin(self) -> str:
        return "comoe_peft.training.trainer.CoMoEArgumentsMixin"

    def get_training_args(self, cfg) -> dict[str, Any] | None:
        if cfg.get("adapter") != ADAPTER:
            return None
        defaults = {f.name: f.default for f in dataclasses.fields(CoMoEArgumentsMixin)}
        return {name: cfg.get(name) if cfg.get(name) is not None else defaults[name] for name in TRAINER_FIELDS}

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        config = check_axolotl_config(cfg)
        if config is None:
            return None  # another adapter: not ours
        if config_only:
            return None, config
        if cfg.get("lora_model_dir"):
            model = PeftModel.from_pretrained(model, cfg["lora_model_dir"], is_trainable=not inference)
            return model, model.peft_config["default"]
        model = get_peft_model(model, config)
        model.print_trainable_parameters()
        return model, config

    def get_trainer_cls(self, cfg):
        if cfg.get("adapter") != ADAPTER:
            return None
        if cfg.get("trainer_cls"):
            from axolotl.utils.import_helper import get_cls_from_module_str

            return comoe_trainer_cls(get_cls_from_module_str(cfg["trainer_cls"]))
        from axolotl.core.trainers.base import AxolotlTrainer

        return comoe_trainer_cls(AxolotlTrainer)

    def post_train(self, cfg, model) -> None:
        """Add the "import comoe_peft first" note to the model card axolotl has just written."""
        from axolotl.utils.distributed import is_main_process

        if cfg.get("adapter") == ADAPTER and is_main_process() and os.path.isdir(cfg["output_dir"]):
            write_loading_note(cfg["output_dir"])
