"""Every value of `comoe-peft train`, checked before anything is loaded or written.

`check_train_values` raises a `RunError` whose message is one line in the form
`--flag must be ... (got X); what to do`, which the command prints with exit status 2. It sees the options under
the command's names (`comoe_peft.experiments.options`): the job's, the trainer's (TRL's names) and the adapter's
(peft's names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .options import ADAPTER_FIELD_TYPES, EXPERT_METHODS, METHODS, flag, preset_names
from .runs import RunError

SEED_MAX = 2**32 - 1  # numpy's seeds, which the trainer sets too


@dataclass(frozen=True)
class Rule:
    """What one numeric option must be: `check` on its value, described by `must`, with `hint` as the fix."""

    check: Callable[[Any], bool]
    must: str
    hint: str = "change it or leave it out"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return _number(value) and float(value).is_integer()


def at_least(minimum: int, hint: str = "change it or leave it out") -> Rule:
    """A whole number >= `minimum`."""
    return Rule(lambda v: _whole(v) and v >= minimum, f"a whole number >= {minimum}" if minimum != 1
                else "at least 1", hint)


def above(bound: float, hint: str = "change it or leave it out") -> Rule:
    """A number > `bound`."""
    return Rule(lambda v: _number(v) and v > bound, "positive" if bound == 0 else f"greater than {bound}", hint)


def not_below(bound: float, hint: str = "change it or leave it out") -> Rule:
    """A number >= `bound`."""
    return Rule(lambda v: _number(v) and v >= bound, f"at least {bound}", hint)


def in_range(low: float, high: float, hint: str = "change it or leave it out") -> Rule:
    """A number in [low, high)."""
    return Rule(lambda v: _number(v) and low <= v < high, f"in [{low}, {high})", hint)


def each(rule: Rule) -> Rule:
    """A list whose every element satisfies `rule`."""
    return Rule(lambda v: isinstance(v, list) and all(rule.check(x) for x in v), f"a list of values, each {rule.must}",
                rule.hint)


STEPS = "give a number of optimizer steps"
RULES: dict[str, Rule] = {
    # the job
    "max_train_per_task": at_least(1, "give the number of training rows to keep per task"),
    "test_size": at_least(1, "every task needs held-out rows to be evaluated on"),
    "analysis_examples_per_task": at_least(1),
    "routing_probe_per_task": at_least(1),
    "routing_eval_steps": each(at_least(1, "give steps of the run, e.g. --routing-eval-steps 10 50")),
    # the trainer (TRL's names)
    "max_steps": at_least(1, f"{STEPS} (use --method base for the untrained base model)"),
    "per_device_train_batch_size": at_least(1, "give the number of examples per step"),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "max_length": at_least(1, "give the longest tokenized example to train on"),
    "seed": Rule(lambda v: _whole(v) and 0 <= v <= SEED_MAX, f"a whole number in [0, {SEED_MAX}]", "use e.g. 0"),
    "data_seed": Rule(lambda v: _whole(v) and 0 <= v <= SEED_MAX, f"a whole number in [0, {SEED_MAX}]"),
    "learning_rate": above(0, "e.g. 5e-4 (write 5.0e-4 in YAML)"),
    "save_steps": at_least(1, f"{STEPS} between checkpoints"),
    "logging_steps": above(0, "give the steps between logs (below 1: a fraction of the run)"),
    "eval_steps": above(0),
    "warmup_steps": not_below(0, "give the warm-up steps (below 1: a fraction of the run)"),
    "weight_decay": not_below(0),
    "max_grad_norm": not_below(0, "0 turns clipping off"),
    "num_train_epochs": above(0),
    "save_total_limit": at_least(1),
    "dataloader_num_workers": at_least(0),
    "adam_beta1": in_range(0, 1),
    "adam_beta2": in_range(0, 1),
    "adam_epsilon": above(0),
    "comoe_router_lr_multiplier": above(0, "1 trains the routers like the experts"),
    "comoe_contrastive_loss_coef": not_below(0, "0 turns the loss off"),
    "comoe_router_aux_loss_coef": not_below(0, "0 turns the loss off"),
    "comoe_router_z_loss_coef": not_below(0, "0 turns the loss off"),
    # the adapter (peft's names)
    "r": at_least(1, "give the rank of each expert, e.g. --rank 16"),
    "lora_alpha": above(0, "leave it out for 2 r"),
    "lora_dropout": in_range(0, 1),
    "num_experts": at_least(2, "a single expert is plain LoRA (--method lora)"),
    "top_k": at_least(1, "give the number of experts each token activates"),
    "num_negatives": at_least(1, "leave it out to use every inactive expert"),
    "router_init_std": above(0),
    "router_jitter_noise": in_range(0, 1, "0 turns the noise off"),
    "contrastive_loss_coef": not_below(0, "0 turns the loss off (that is --method moe)"),
    "contrastive_temperature": above(0, "e.g. 0.1"),
    "contrastive_layers": each(at_least(0, "give layer indices")),
    "layers_to_transform": each(at_least(0, "give layer indices")),
}
# options that only a training run has (`--method base` refuses them)
TRAINING_ONLY = ("max_steps", "save_steps", "routing_eval_steps", "bf16", "padding_free", "comoe_router_lr_multiplier")


def show(value: Any) -> str:
    """A value as a message shows it: as the user would type it, never Python's None."""
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return " ".join(show(v) for v in value) or "nothing"
    return str(value)


def fail(name: str, must: str, value: Any, hint: str) -> None:
    """Raise the one-line `RunError` of a bad option."""
    raise RunError(f"{flag(name)} must be {must} (got {show(value)}); {hint}")


def check_train_values(values: Mapping[str, Any], given: Collection[str] = ()) -> None:
    """Check every option of a training run (defaults, preset, config file and flags merged). `given`: the options
    set beyond the job's defaults that only a training run has (`--method base` refuses them). Raises the first
    problem as a `RunError`."""
    if not values.get("output_dir"):
        raise RunError("--output-dir is required: the run folder to create (e.g. --output-dir runs/comoe)")
    method = values.get("method")
    if method not in METHODS:
        fail("method", f"one of {', '.join(METHODS)}", method, "see comoe-peft train --help")
    if values.get("preset") not in preset_names():
        fail("preset", f"one of {', '.join(preset_names())}", values.get("preset"),
             "pass your own settings with --config FILE.yaml")
    if not values.get("dataset") and not [name for name in str(values.get("tasks", "")).split(",") if name.strip()]:
        raise RunError("--tasks names no task; give e.g. --tasks bigbench:navigate,synthetic:arithmetic, leave it "
                       "out for the default mixture, or pass --dataset FILE")
    for name, value in values.items():
        rule = RULES.get(name)
        if method == "base" and name in TRAINING_ONLY:
            continue  # base trains nothing: refused below if given (0 steps, as benchmarks/quality.py passes, is not)
        if rule is not None and value is not None and not rule.check(value):
            if isinstance(value, (str, bool, dict)):  # from Python callers: flags and --config are typed earlier
                raise RunError(f"type error: {flag(name)} must be a number, not {type(value).__name__} "
                               f"{show(value)!r}; {rule.hint}")
            fail(name, rule.must, value, rule.hint)
    check_method(values, method, given)
    if method in EXPERT_METHODS:
        check_routing(values, contrastive=method == "comoe")
        check_adapter_config(values, method)


def check_method(values: Mapping[str, Any], method: str, given: Collection[str]) -> None:
    """The options that only some methods have: training for all but base, routers for comoe / moe."""
    if values.get("load_in_4bit") and values.get("load_in_8bit"):
        raise RunError("--load-in-4bit and --load-in-8bit exclude each other; choose one")
    if values.get("router_aux_loss_coef") is not None:
        raise RunError("--router-aux-loss-coef is TRL's weight for MoE base models; CoMoE's balance loss weight is "
                       "--comoe-router-aux-loss-coef")
    if method == "base":
        if given:
            raise RunError("--method base trains nothing (it scores the base model zero-shot); drop "
                           + ", ".join(sorted(flag(name) for name in given)))
        return
    if method not in EXPERT_METHODS:
        if values.get("routing_eval_steps"):
            raise RunError(f"--routing-eval-steps needs experts to route to; --method {method} has none")
        if values.get("comoe_router_lr_multiplier", 1) != 1:
            raise RunError(f"--router-lr-multiplier is for comoe / moe (routers); --method {method} has none")
        lora_lacks = sorted(flag(n) for n in given if n in CO_MOE_ONLY or n.startswith("comoe_"))
        if lora_lacks:
            raise RunError(f"{', '.join(lora_lacks)}: options of the experts; --method {method} has none (drop "
                           "them)")


CO_MOE_ONLY = ("router_init_std", "router_jitter_noise", "num_negatives", "anchor", "contrastive_layers")


def check_routing(values: Mapping[str, Any], contrastive: bool) -> None:
    """top_k against num_experts, and, with the contrastive loss, the positives and negatives it needs."""
    top_k, experts = values.get("top_k", 2), values.get("num_experts", 4)
    if top_k > experts:
        raise RunError(f"--top-k must be at most --num-experts (got top_k {top_k}, num_experts {experts}); "
                       "lower --top-k or raise --num-experts")
    if not contrastive or values.get("contrastive_loss_coef", 0.01) == 0:
        return
    if top_k < 2:
        raise RunError(f"--top-k must be at least 2 for the contrastive loss (got {top_k}): the anchor needs another "
                       "activated expert as its positive; use --method moe for top-1 routing")
    if top_k >= experts:
        raise RunError(f"--top-k must be below --num-experts for the contrastive loss (got top_k {top_k}, "
                       f"num_experts {experts}): an inactive expert is its negative; raise --num-experts")
    negatives = values.get("num_negatives")
    if negatives is not None and negatives > experts - top_k:
        raise RunError(f"--num-negatives must be at most num_experts - top_k = {experts - top_k} (got {negatives}); "
                       "leave it out to use every inactive expert")


def check_adapter_config(values: Mapping[str, Any], method: str) -> None:
    """The last word on the adapter fields: `CoMoEConfig`'s own checks (its message, named by flag)."""
    from comoe_peft.tuner.config import CoMoEConfig

    fields = {name: values[name] for name in ADAPTER_FIELD_TYPES if values.get(name) is not None}
    if method == "moe":
        fields["contrastive_loss_coef"] = 0.0
    try:
        CoMoEConfig(**fields)
    except (ValueError, TypeError) as error:
        message = str(error).removeprefix("CoMoEConfig.")
        name, _, rest = message.partition(" ")
        raise RunError(f"{flag(name)} {rest.rstrip('.')}; change it or leave it out") from None
