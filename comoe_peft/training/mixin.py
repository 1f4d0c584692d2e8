"""Training CoMoE with transformers: the auxiliary losses added to the task loss, and their metrics (no trl).

`CoMoETrainerMixin.compute_loss` adds
`contrastive_loss_coef * L_con + router_aux_loss_coef * L_balance + router_z_loss_coef * L_z` to the task loss
and logs the `comoe/*` metrics; `CoMoETrainer` is a plain `transformers.Trainer` with it. TRL's `SFTTrainer` with
the mixin is `CoMoESFTTrainer` (module `sft`, trl >= 1.9). All are public from `comoe_peft.training.trainer`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .callbacks import ExpertLoadHistoryCallback
from comoe_peft.tuner.model import AUX_LOSS_COEF_FIELDS, CoMoEModel, find_comoe_model
from comoe_peft.tuner.registration import write_loading_note

METRIC_PREFIX = "comoe/"


@dataclass
class CoMoEArgumentsMixin:
    """Optional overrides of the CoMoE loss coefficients; None keeps the value of the adapter's `CoMoEConfig`.

    They have their own names: TRL's `router_aux_loss_coef` is for MoE base models and refuses other models.
    """

    comoe_contrastive_loss_coef: float | None = field(
        default=None, metadata={"help": "Overrides CoMoEConfig.contrastive_loss_coef when set."}
    )
    comoe_router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Overrides CoMoEConfig.router_aux_loss_coef when set."}
    )
    comoe_router_z_loss_coef: float | None = field(
        default=None, metadata={"help": "Overrides CoMoEConfig.router_z_loss_coef when set."}
    )
    comoe_expert_load_history: bool = field(
        default=True, metadata={"help": "Keep per-layer expert-load histories and save them next to checkpoints."}
    )
    comoe_router_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "The routers learn at learning_rate times this (their own optimizer parameter group, "
                          "under the same schedule); 1 trains them like the experts."},
    )


@dataclass
class CoMoETrainingArguments(CoMoEArgumentsMixin, TrainingArguments):
    """transformers' `TrainingArguments` plus the `comoe_*` overrides of `CoMoEArgumentsMixin`."""


def keep_routers_float32(comoe_model: CoMoEModel) -> int:
    """Cast every fp16 / bf16 router weight back to float32 and return how many were cast.

    TRL's `SFTTrainer` casts all trainable parameters of a quantized (QLoRA) model to bf16, following the QLoRA
    paper for LoRA weights. The experts may stay so, but the router's probabilities decide the top-k and must stay
    float32, as in Mixtral. Runs before the optimizer is built, so the optimizer sees the float32 tensors.
    """
    cast = 0
    for module in comoe_model.model.modules():
        for name, weight in getattr(module, "comoe_router", {}).items():
            if weight.dtype in (torch.float16, torch.bfloat16):
                weight.data = weight.data.float()
                cast += 1
    return cast


def split_router_groups(optimizer: torch.optim.Optimizer, router_ids: set[int], multiplier: float) -> None:
    """Move the parameters in `router_ids` out of each param group into a copy of it with `lr * multiplier`
    (marked `comoe_router`); does nothing to an optimizer already split. Call it before the first step."""
    if any(group.get("comoe_router") for group in optimizer.param_groups):
        return
    for group in list(optimizer.param_groups):
        routers = [p for p in group["params"] if id(p) in router_ids]
        if not routers:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in router_ids]
        extra = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group(extra | {"params": routers, "lr": group["lr"] * multiplier, "comoe_router": True})


class CoMoETrainerMixin:
    """Adds the CoMoE auxiliary losses and `comoe/*` metrics to a `transformers.Trainer` subclass.

    Use it first in the bases: `class MyTrainer(CoMoETrainerMixin, Trainer)`; its `__init__` runs the trainer's
    own and then finds the CoMoE adapter (an error if the model has none). The losses of each micro-batch are
    divided by the number of gradient-accumulation steps whenever the task loss is normalised over the whole
    accumulated batch (`num_items_in_batch` given), so accumulation gives the same gradient as one large batch.
    Logged each logging step, in training and evaluation: `comoe/contrastive`, `comoe/balance`, `comoe/z`,
    `comoe/routing_entropy`, `comoe/expert_load_cv` and `comoe/infonce_bound` (log M - L_con, M negatives).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._comoe_setup()

    def _comoe_setup(self) -> None:
        if getattr(self, "_comoe_metrics", None) is not None:
            return  # already set up (a subclass that also calls it)
        self.comoe_model = find_comoe_model(self.model)
        keep_routers_float32(self.comoe_model)
        self._comoe_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._refuse_reentrant_checkpointing()
        if getattr(self.args, "comoe_router_lr_multiplier", 1.0) <= 0:
            raise ValueError(
                f"comoe_router_lr_multiplier must be positive, got {self.args.comoe_router_lr_multiplier}."
            )
        if getattr(self.args, "comoe_expert_load_history", True):
            self.add_callback(ExpertLoadHistoryCallback())

    def comoe_loss_coefficients(self) -> dict[str, float]:
        """The coefficient of each auxiliary loss: the `comoe_*` argument if set, else the active adapter's config."""
        return self.comoe_model.aux_loss_coefficients(self.comoe_model.active_adapters[0], self._comoe_overrides())

    def _comoe_overrides(self) -> dict[str, float | None]:
        """The `comoe_*` coefficient arguments by loss name (None: not set, the adapter's config decides)."""
        return {name: getattr(self.args, f"comoe_{field}", None) for name, field in AUX_LOSS_COEF_FIELDS.items()}

    def _refuse_reentrant_checkpointing(self) -> None:
        kwargs = self.args.gradient_checkpointing_kwargs or {}
        uses_aux = any(value > 0 for value in self.comoe_loss_coefficients().values())
        if self.args.gradient_checkpointing and kwargs.get("use_reentrant") and uses_aux:
            raise ValueError(
                "Reentrant gradient checkpointing (gradient_checkpointing_kwargs={'use_reentrant': True}) runs the "
                "layers' first forward without autograd, so the CoMoE auxiliary losses would get no gradient and "
                "silently stop training the experts. Use {'use_reentrant': False} (the default), or turn "
                "gradient_checkpointing off."
            )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The base trainer's optimizer, with the routers moved into groups of their own at
        `comoe_router_lr_multiplier` times the learning rate (when it is not 1)."""
        optimizer = super().create_optimizer(model)
        multiplier = getattr(self.args, "comoe_router_lr_multiplier", 1.0)
        if multiplier != 1.0:
            routers = {id(weight) for module in self.comoe_model.model.modules()
                       for weight in getattr(module, "comoe_router", {}).values()}
            split_router_groups(optimizer, routers, multiplier)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss of the base trainer plus the weighted CoMoE auxiliary losses of the same forward pass."""
        with self.comoe_model.recording():  # eval-mode forwards record the losses too, for the eval metrics
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        aux_losses = self.comoe_model.get_aux_losses()
        weighted = self.comoe_model.get_aux_loss(self._comoe_overrides())  # the tuner weights them, one place
        if weighted is not None and model.training:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + weighted / steps
        self._record_comoe_metrics(aux_losses, "train" if model.training else "eval")
        return (loss, outputs) if return_outputs else loss

    def _record_comoe_metrics(self, aux_losses: dict[str, torch.Tensor], mode: str) -> None:
        values = {name: loss.detach() for name, loss in aux_losses.items()}
        stats = list(self.comoe_model.get_routing_stats().values())
        if stats:
            values["routing_entropy"] = torch.stack([s.routing_entropy for s in stats]).mean()
            # per module (N may differ by layer, num_experts_pattern), then the mean over modules
            cvs = [s.expert_load.std(unbiased=False) / s.expert_load.mean() for s in stats]
            values["expert_load_cv"] = torch.stack(cvs).mean()
        if "contrastive" in values:
            values["infonce_bound"] = self._mean_log_negatives() - values["contrastive"]
        if not values:
            return
        names = sorted(values)
        stacked = torch.stack([values[name].float().to(self.args.device) for name in names])  # (metrics,)
        gathered = self.accelerator.gather_for_metrics(stacked.unsqueeze(0)).view(-1, len(names)).mean(0)
        for name, value in zip(names, gathered.tolist()):
            self._comoe_metrics[mode][METRIC_PREFIX + name].append(value)

    def _mean_log_negatives(self) -> float:
        """Mean of log M over the modules that recorded the contrastive loss (M, the negatives per token, may differ
        by layer), so that the logged bound is the mean over modules of log M - L_con, like L_con itself."""
        logs = []
        for _, layer in self.comoe_model._comoe_layers():
            for adapter_name in layer.active_adapters:
                if "contrastive" in layer.recorded_aux_losses(adapter_name):
                    settings = layer.comoe_settings[adapter_name]
                    logs.append(math.log(settings.num_negatives or (settings.num_experts - settings.top_k)))
        if not logs:
            config = self.comoe_model.peft_config[self.comoe_model.active_adapters[0]]
            return math.log(config.num_negatives or (config.num_experts - config.top_k))
        return sum(logs) / len(logs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save as the base trainer does, then add a "import comoe_peft first" note to the adapter's model card."""
        super()._save(output_dir, state_dict=state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and os.path.isdir(folder):
            write_loading_note(folder)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {name: sum(v) / len(v) for name, v in self._comoe_metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        logs.update(metrics)
        self._comoe_metrics[mode].clear()
        super().log(logs, *args, **kwargs)


class CoMoETrainer(CoMoETrainerMixin, Trainer):
    """A plain `transformers.Trainer` with the CoMoE auxiliary losses and metrics (see `CoMoETrainerMixin`)."""
