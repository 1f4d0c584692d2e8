"""`CoMoEModel`: the peft tuner that puts CoMoE layers into a model and collects their auxiliary losses."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .block import Block, block_layout, describe_supported_blocks
from .bnb import dispatch_bnb, disable_cpu_inference_repacking, restore_cpu_inference_repacking
from .config import CoMoEConfig
from .layer import BASE_ROWS, CoMoELayer, ExpertSettings, ForwardContext, Linear, RoutingStats, raise_merge_error

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)
AUX_LOSS_NAMES = ("contrastive", "balance", "z")
AUX_LOSS_COEF_FIELDS = {
    "contrastive": "contrastive_loss_coef",
    "balance": "router_aux_loss_coef",
    "z": "router_z_loss_coef",
}


class CoMoEModel(BaseTuner):
    """Creates a CoMoE model from a pretrained transformers model; use it through `peft.get_peft_model`.

    Besides the usual peft tuner API (adapters added, set, deleted, disabled, unloaded) it offers
    `get_aux_losses()`, `get_aux_loss()` and `get_routing_stats()` for the last forward pass. Merging is
    impossible for routed experts and raises an error that explains why.
    """

    prefix: str = "comoe_"
    tuner_layer_cls = CoMoELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self.forward_context = ForwardContext()
        # 4-bit weights stay as loaded (bnb.py); before the layers are built, whose DoRA magnitudes read the weights
        repacking_flags = disable_cpu_inference_repacking(model)
        super().__init__(model, config, adapter_name, **kwargs)
        self._mask_hook = self.model.register_forward_pre_hook(self._capture_attention_mask, with_kwargs=True)
        self._repacking_flags = repacking_flags

    # ------------------------------------------------------------------ injection

    def _create_and_replace(
        self,
        peft_config: CoMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        self._refuse_output_head(target, current_key)
        settings = _expert_settings(peft_config, current_key)
        layer_args = dict(
            r=_pattern_value(peft_config.rank_pattern, current_key, peft_config.r),
            lora_alpha=_pattern_value(peft_config.alpha_pattern, current_key, peft_config.lora_alpha),
            lora_dropout=peft_config.lora_dropout,
            settings=settings,
            init_weights=peft_config.init_weights,
            router_init_std=peft_config.router_init_std,
            use_dora=peft_config.use_dora,
            use_rslora=peft_config.use_rslora,
        )
        self._refuse_overlapping_targets(peft_config, target, current_key)
        if isinstance(target, CoMoELayer):
            if not isinstance(target, Block):
                _warn_on_fan_in_fan_out(peft_config, target.get_base_layer())
            target.update_layer(adapter_name, **layer_args)
            target.forward_context = self.forward_context
            return
        new_module = _create_new_module(peft_config, target, current_key, adapter_name, **layer_args)
        new_module.forward_context = self.forward_context
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _refuse_output_head(self, target: nn.Module, current_key: str) -> None:
        get_output_embeddings = getattr(self.model, "get_output_embeddings", None)
        output_head = get_output_embeddings() if callable(get_output_embeddings) else None
        if output_head is not None and target is output_head:
            raise ValueError(
                f"CoMoE cannot adapt the output head '{current_key}': TRL and recent transformers compute the "
                "language-model head directly from its weight (a fused loss), which would silently bypass the "
                "experts. Remove it from target_modules ('all-linear' already leaves it out); to train the head, "
                "list it in modules_to_save instead."
            )

    def _check_new_adapter_config(self, config: CoMoEConfig) -> None:
        """peft's checks, then: a new adapter may not target projections inside FFN blocks that already have block
        experts (peft skips modules inside adapted ones and would only say that the targets were not found)."""
        super()._check_new_adapter_config(config)
        for name, block in self.model.named_modules():
            if not isinstance(block, Block):
                continue
            for inner, _ in block.get_base_layer().named_modules():
                key = f"{name}.{inner}".removesuffix(".")
                if inner and self._check_target_module_exists(config, key):
                    raise ValueError(f"target_modules selects '{key}', which lies inside the FFN block '{name}' that "
                                     "already has block experts; adapt the block or the projections inside it, not "
                                     "both")

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """peft's replacement, except when `unload()` puts an MLP block back: it has no weight of its own to carry."""
        if isinstance(child, Block) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _refuse_overlapping_targets(self, peft_config: CoMoEConfig, target: nn.Module, current_key: str) -> None:
        """One line when a block target and a projection inside it would both be adapted (by this config, or by this
        one and an adapter already in the model): a projection is either in a routed block or routed itself."""
        inside_block = next((name for name, module in self.model.named_modules()
                             if isinstance(module, Block) and current_key.startswith(f"{name}.")), None)
        if inside_block is not None:
            raise ValueError(f"target_modules selects '{current_key}', which lies inside the FFN block "
                             f"'{inside_block}' that already has block experts; adapt the block or the projections "
                             "inside it, not both")
        if isinstance(target, CoMoELayer) or block_layout(target, unwrap=True) is None:
            return
        overlapping = [f"{current_key}.{name}" for name, module in target.named_modules() if name
                       and (isinstance(module, CoMoELayer)
                            or self._check_target_module_exists(peft_config, f"{current_key}.{name}"))]
        if overlapping:
            raise ValueError(f"target_modules selects both the FFN block '{current_key}' and '{overlapping[0]}' "
                             "inside it; adapt the block (block experts) or its projections (per-linear experts), "
                             "not both")

    # ------------------------------------------------------------------ merging is impossible

    def _check_merge_allowed(self) -> None:
        raise_merge_error()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Always raises: routed experts cannot be merged into the base weights. Use `unload()` to drop them."""
        raise_merge_error()

    # ------------------------------------------------------------------ forward bookkeeping

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches: `adapter_names` (one name per row, "__base__" for none) reaches every CoMoE layer.

        peft's `PeftModel.forward` and `generate` enter this context with the call's arguments and then drop its
        own before calling the model, so the names travel to the layers by forward pre-hooks, as in peft's LoRA
        (with beam search each name is repeated for its row's beams). Inference only, without `recording()`.
        peft's `alora_offsets` (activated LoRA) is refused rather than ignored.
        """
        if kwargs.get("alora_offsets") is not None:
            raise ValueError("CoMoE does not support activated LoRA offsets (`alora_offsets`).")
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        self._check_mixed_batch(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = [module.register_forward_pre_hook(partial(_pass_adapter_names, adapter_names=adapter_names),
                                                    with_kwargs=True)
                   for module in self.model.modules() if isinstance(module, (CoMoELayer, AuxiliaryTrainingWrapper))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_mixed_batch(self, adapter_names: Any) -> None:
        """Refuse a mixed-adapter batch that cannot be run as asked: in training, while recording, unknown names."""
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got {type(adapter_names)}")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval().")
        if self.forward_context.record_in_eval:
            raise ValueError("Mixed-adapter batches record no routing statistics; call recording() per adapter.")
        known = {name for _, layer in self._comoe_layers() for name in layer.comoe_A}
        unknown = sorted({name for name in adapter_names if name != BASE_ROWS} - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model through `__call__`, as peft >= 0.21 does, so its forward pre-hooks (the attention
        mask's capture) run also where peft <= 0.20 would call `self.model.forward` directly."""
        return self.model(*args, **kwargs)

    def _capture_attention_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # called as model(input_ids, attention_mask)
        self.forward_context.new_forward(mask if isinstance(mask, torch.Tensor) else None)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record routing statistics and auxiliary losses in eval mode too, inside this block.

        In eval mode the layers take their lean inference path and record nothing, so `get_routing_stats()` and
        `get_aux_losses()` are empty after an eval forward. Wrap the forwards to analyse in `with
        model.base_model.recording():` to get them (the trainers do this while evaluating). Training-mode forwards
        always record.
        """
        previous = self.forward_context.record_in_eval
        self.forward_context.record_in_eval = True
        try:
            yield
        finally:
            self.forward_context.record_in_eval = previous

    def unload(self) -> nn.Module:
        """Remove every CoMoE layer and return the base model unchanged."""
        self._mask_hook.remove()
        restore_cpu_inference_repacking(self._repacking_flags)
        return super().unload()

    # ------------------------------------------------------------------ auxiliary losses and statistics

    def _comoe_layers(self) -> list[tuple[str, CoMoELayer]]:
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, CoMoELayer)]

    def get_aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward pass, each averaged over the adapted modules (and active adapters).

        Keys: "balance" and "z" (computed in training mode) and "contrastive" (in training mode, when
        contrastive_loss_coef > 0). Values are float32 scalars that carry gradients. Empty in eval mode, unless
        the forward ran inside `recording()`.
        """
        collected: dict[str, list[torch.Tensor]] = {}
        for _, layer in self._comoe_layers():
            for adapter_name in layer.active_adapters:
                for name, value in layer.recorded_aux_losses(adapter_name).items():
                    collected.setdefault(name, []).append(value)
        return {name: torch.stack(values).mean() for name, values in collected.items()}

    def get_aux_loss(self, coefficients: Mapping[str, float | None] | None = None) -> torch.Tensor | None:
        """The weighted sum of the auxiliary losses of the last forward, with each active adapter's coefficients.

        Add it to the task loss in a custom training loop (`CoMoESFTTrainer` does this for you). None if nothing
        was recorded (eval mode, or every coefficient is zero).

        Args:
            coefficients: optional overrides by loss name ("contrastive", "balance", "z"), applied to every active
                adapter; a missing name or None keeps the adapter config's coefficient (the trainer's `comoe_*`
                arguments arrive here).
        """
        total: torch.Tensor | None = None
        for adapter_name in self.active_adapters:
            weights = self.aux_loss_coefficients(adapter_name, coefficients)
            for name, value in self._adapter_aux_losses(adapter_name).items():
                if weights[name] > 0:
                    total = weights[name] * value if total is None else total + weights[name] * value
        return total

    def aux_loss_coefficients(
        self, adapter_name: str, overrides: Mapping[str, float | None] | None = None
    ) -> dict[str, float]:
        """The coefficient of each auxiliary loss for `adapter_name`: the override if given, else its config's."""
        config = self.peft_config[adapter_name]
        overrides = overrides or {}
        return {
            name: float(getattr(config, field) if overrides.get(name) is None else overrides[name])
            for name, field in AUX_LOSS_COEF_FIELDS.items()
        }

    def _adapter_aux_losses(self, adapter_name: str) -> dict[str, torch.Tensor]:
        collected: dict[str, list[torch.Tensor]] = {}
        for _, layer in self._comoe_layers():
            for name, value in layer.recorded_aux_losses(adapter_name).items():
                collected.setdefault(name, []).append(value)
        return {name: torch.stack(values).mean() for name, values in collected.items()}

    def get_routing_stats(self) -> dict[str, RoutingStats]:
        """Per-module routing statistics (expert load, routing entropy, valid tokens) of the last forward pass.

        Keys are module names (with the adapter name appended when several adapters are active). Eval-mode forwards
        record statistics only inside `recording()`; otherwise this is empty after them.
        """
        stats: dict[str, RoutingStats] = {}
        for module_name, layer in self._comoe_layers():
            active = layer.active_adapters
            for adapter_name in active:
                recorded = layer.recorded_routing_stats(adapter_name)
                if recorded is not None:
                    key = module_name if len(active) == 1 else f"{module_name}.{adapter_name}"
                    stats[key] = recorded
        return stats


def _create_new_module(
    peft_config: CoMoEConfig, target: nn.Module, current_key: str, adapter_name: str, **layer_args: Any
) -> Linear | Block:
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    quantized = dispatch_bnb(target, adapter_name, **layer_args)  # bitsandbytes 4-bit / 8-bit (nn.Linear subclasses)
    if quantized is not None:
        return quantized
    if block_layout(base) is not None:
        return Block(target, adapter_name, **layer_args)
    if not isinstance(base, SUPPORTED_LAYER_TYPES):
        supported = ", ".join(f"{t.__module__}.{t.__name__}" for t in SUPPORTED_LAYER_TYPES)
        raise ValueError(
            f"Target module '{current_key}' is a {type(base).__module__}.{type(base).__name__}, which CoMoE does "
            f"not support. Supported: the layer types {supported} (and bitsandbytes' Linear4bit and Linear8bitLt), "
            f"and MLP blocks made of such layers ({describe_supported_blocks()}). Change target_modules to select "
            "only such modules."
        )
    _warn_on_fan_in_fan_out(peft_config, base)
    return Linear(target, adapter_name, **layer_args)


def _pattern_value(pattern: dict[str, Any], current_key: str, default: Any) -> Any:
    """The value of the first `pattern` key that matches the module name, with peft's own rule (`get_pattern_key`,
    as `LoraModel._create_and_replace` uses it for rank_pattern and alpha_pattern), else `default`."""
    return pattern.get(get_pattern_key(pattern.keys(), current_key), default)


def _warn_on_fan_in_fan_out(config: CoMoEConfig, base: nn.Module) -> None:
    """Warn, as peft LoRA does, when `config.fan_in_fan_out` disagrees with the type of the base layer.

    Each CoMoE layer takes its orientation from its own base layer (`CoMoELayer.fan_in_fan_out`: True for
    transformers' `Conv1D`, whose weight is (in, out), False for `torch.nn.Linear`), so one model may mix both
    types. The config's value is not used for a layer it disagrees with, and the config itself is never changed.
    """
    transposed = isinstance(base, Conv1D)
    if config.fan_in_fan_out != transposed:
        kind = "`Conv1D`" if transposed else "`torch.nn.Linear`"
        warnings.warn(
            f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is {kind}. Using "
            f"fan_in_fan_out={transposed} for this layer (CoMoEConfig is left unchanged).",
            stacklevel=2,
        )


def _expert_settings(config: CoMoEConfig, current_key: str) -> ExpertSettings:
    num_experts = _pattern_value(config.num_experts_pattern, current_key, config.num_experts)
    contrastive = config.uses_contrastive_loss and _in_contrastive_layers(config, current_key)
    field_name = "num_experts_pattern" if num_experts != config.num_experts else "num_experts"
    config.check_layer_experts(num_experts, contrastive, field_name, f"module {current_key!r}")
    return ExpertSettings(
        num_experts=num_experts,
        top_k=config.top_k,
        router_jitter_noise=config.router_jitter_noise,
        contrastive=contrastive,
        contrastive_temperature=config.contrastive_temperature,
        num_negatives=config.num_negatives,
        anchor=config.anchor,
    )


def _in_contrastive_layers(config: CoMoEConfig, current_key: str) -> bool:
    if config.contrastive_layers is None:
        return True
    index = layer_index(current_key, config.layers_pattern)
    if index is None:
        raise ValueError(
            f"CoMoEConfig.contrastive_layers is set, but no layer index could be read from module '{current_key}'. "
            "Set layers_pattern to the name of the model's layer list (e.g. 'layers' or 'h')."
        )
    return index in config.contrastive_layers


def layer_index(module_key: str, layers_pattern: list[str] | str | None = None) -> int | None:
    """The transformer-layer index in a module name ('model.layers.3.self_attn.q_proj' -> 3), read the way peft's
    `layers_to_transform` reads it: the first numbered segment, or the one after `layers_pattern`."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def find_comoe_model(model: torch.nn.Module) -> CoMoEModel:
    """The `CoMoEModel` inside a (possibly DDP- or FSDP-wrapped) `PeftModel`; a clear error if there is none."""
    seen = model
    for _ in range(4):  # DDP/FSDP wrapper -> PeftModel -> CoMoEModel
        if isinstance(seen, CoMoEModel):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "base_model", None)
        if inner is None or inner is seen:
            break
        seen = inner
    raise ValueError(
        "This trainer needs a model with a CoMoE adapter: pass `peft_config=CoMoEConfig(...)` or a model wrapped "
        f"with `get_peft_model(model, CoMoEConfig(...))`; got {type(model).__name__}."
    )


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    """Forward pre-hook: give a layer the batch's per-row adapter names."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
