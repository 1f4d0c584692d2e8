"""The options of `comoe-peft train`, each declared once, in one of three dataclasses.

| dataclass | fields | names |
|---|---|---|
| `ScriptArguments` (here) | the job: method, tasks, data, model, preset, split sizes, quantization, ... | the job's own |
| `comoe_peft.training.trainer.CoMoESFTConfig` | the trainer: `output_dir`, `max_steps`, `learning_rate`, `seed`, ... | TRL's |
| `adapter_arguments()` (built from `CoMoEConfig`) | the adapter: `r`, `num_experts`, `top_k`, `target_modules`, ... | peft's |

Every field is a flag (`--max_steps` or `--max-steps`) and a key of a `--config` / preset YAML file. The names never
clash: `output_dir` and `seed` are the trainer's (the run folder, and the seed of the data and of training);
the adapter's fields come from `CoMoEConfig` without its peft bookkeeping (`task_type`, `peft_type`, ...), the
per-layer pattern dicts and the two router loss weights: `router_aux_loss_coef` is also a TRL field (for MoE base
models, which it refuses otherwise), so CoMoE's balance and z-loss weights are set with the trainer's
`comoe_router_aux_loss_coef` and `comoe_router_z_loss_coef`, which override the adapter's. Flags kept from the first versions of the command are aliases: `--batch-size`
(`per_device_train_batch_size`), `--rank` (`r`), `--router-lr-multiplier` (`comoe_router_lr_multiplier`) and
`--no-bf16` (`--bf16 false`).

A run's value of an option is, highest first: the flag, the `--config` file, the chosen preset, the default preset,
the job's default (`JOB_DEFAULTS`, else the library's). A preset sets any option but `NOT_IN_PRESETS`.

`TrainOptions` (`comoe_peft.experiments.jobs`), the job's programmatic form, keeps short names for the options it
has always had (`TRAINER_NAMES`, `ADAPTER_NAMES`); every other trainer or adapter field travels in its `extra` or
`adapter_extra` dict under the library's name. This module imports neither torch nor TRL at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

METHODS = ("comoe", "moe", "lora", "base")
EXPERT_METHODS = ("comoe", "moe")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESET_DIR = Path(__file__).with_name("presets")

# trainer / adapter field -> the `TrainOptions` field that holds it
TRAINER_NAMES = {
    "output_dir": "output_dir",
    "seed": "seed",
    "max_steps": "max_steps",
    "per_device_train_batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "max_length": "max_length",
    "save_steps": "save_steps",
    "bf16": "bf16",
    "padding_free": "padding_free",
    "comoe_router_lr_multiplier": "router_lr_multiplier",
}
ADAPTER_NAMES = {
    "r": "rank",
    "num_experts": "num_experts",
    "top_k": "top_k",
    "lora_dropout": "lora_dropout",
    "contrastive_loss_coef": "contrastive_loss_coef",
    "contrastive_temperature": "contrastive_temperature",
    "target_modules": "target_modules",
}
# the flags of the first versions of the command, kept as aliases of the trainer's fields
TRAINER_ALIASES = {"--batch-size": "per_device_train_batch_size",
                   "--router-lr-multiplier": "comoe_router_lr_multiplier"}

# trainer settings where the job differs from TRL's defaults (`jobs.build_trainer` passes them, `--help` shows them)
JOB_TRAINER_SETTINGS: dict[str, Any] = {
    "lr_scheduler_type": "cosine",
    "save_total_limit": 2,  # the newest checkpoint, and the one before in case the newest was cut short
    "report_to": "none",
    "gradient_checkpointing": False,
    "dataloader_num_workers": 0,
}
# trainer settings the job derives from other options (`jobs.build_trainer`), as `--help` words them
JOB_DERIVED_SETTINGS: dict[str, str] = {
    "warmup_steps": "max_steps / 20, at least 1",
    "logging_steps": "max_steps / 30, at least 1",
    "save_steps": "none: no checkpoints",
    "bf16": "on for GPUs that support it, else off",
}

# the CoMoEConfig fields that are options of the job, with the type the parser reads them as
ADAPTER_FIELD_TYPES: dict[str, Any] = {
    "r": int,
    "lora_alpha": float | None,
    "lora_dropout": float,
    "num_experts": int,
    "top_k": int,
    "target_modules": list[str],
    "exclude_modules": list[str] | None,
    "layers_to_transform": list[int] | None,
    "bias": Literal["none", "all", "comoe_only"],
    "use_dora": bool,
    "use_rslora": bool,
    "router_init_std": float,
    "router_jitter_noise": float,
    "contrastive_loss_coef": float,
    "contrastive_temperature": float,
    "num_negatives": int | None,
    "anchor": Literal["random", "all"],
    "contrastive_layers": list[int] | None,
}
# the job's defaults of the options `TrainOptions` holds, where the default preset leaves them out, under the
# command's names: the lowest layer of `preset_values` (where the job differs from CoMoEConfig: r, lora_alpha (None
# means 2 r), lora_dropout and target_modules; from TRL's SFTConfig: seed)
JOB_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "r": 16,
    "lora_alpha": None,
    "lora_dropout": 0.05,
    "num_experts": 4,
    "top_k": 2,
    "contrastive_loss_coef": 0.01,
    "contrastive_temperature": 0.1,
    "target_modules": TARGET_MODULES,
    "comoe_router_lr_multiplier": 1.0,
    "padding_free": False,
    "routing_eval_steps": [],
    "routing_probe_per_task": 8,
}
# the options a preset leaves to the user: where the run goes, what it trains on, which method, which base model
NOT_IN_PRESETS = ("output_dir", "overwrite", "preset", "method", "tasks", "dataset", "model", "cache_dir",
                  "load_in_4bit", "load_in_8bit")
ADAPTER_HELP = {
    "r": "Rank of every LoRA expert (LoRA's rank is matched to N experts of this rank).",
    "lora_alpha": "LoRA scaling numerator: expert outputs are scaled by lora_alpha / r (default: 2 r).",
    "contrastive_loss_coef": "Weight lambda of the contrastive loss (comoe only; moe is comoe with 0).",
    "target_modules": ("Module names (suffix match) or a regex (full match) to adapt, or 'all-linear'; a "
                       "transformer's MLP block (mlp) gets block experts, and LoRA on the projections inside it."),
}


@dataclass
class ScriptArguments:
    """The options of the job itself (what to train on and how to split it); see `TrainOptions`."""

    method: Literal["comoe", "moe", "lora", "base"] = field(default="comoe", metadata={"help": (
        "comoe (default); moe = the same experts without the contrastive term; lora = peft LoRA with as many "
        "trainable parameters; base = no adapter and no training (the zero-shot base model, scored by eval on the "
        "same held-out split)")})
    tasks: str = field(default="default", metadata={"help": (
        "Comma-separated tasks, e.g. bigbench:navigate,synthetic:arithmetic,benchmark:arc-e ('default' = the "
        "built-in mixture; benchmark:* reads the paper's benchmarks from the local Hugging Face cache).")})
    dataset: str | None = field(default=None, metadata={"help": (
        "Your own examples instead of --tasks: JSON/JSONL/Parquet files, a folder saved with datasets, or a cached "
        "hub dataset (columns task, prompt, choices, answer).")})
    model: str | None = field(default=None, metadata={
        "help": "Local model folder or cached hub id (default: SmolLM2-135M-Instruct)."})
    preset: str = field(default="default", metadata={"help": (
        "A preset shipped with comoe-peft (comoe_peft/experiments/presets/NAME.yaml): quick = a smoke run (52 s of "
        "training on a 2-core CPU), default = 100 steps (14 minutes of training, 16 with eval and analyze, same "
        "CPU), mixlora = MixLoRA's layout at default's size (8 experts, top-2, on q/k/v/o and on the MLP blocks; "
        "r 16, alpha 32, balance loss 0.001, learning rate 2e-4). --config and flags override it.")})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing run folder."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Where the model and task files are cached (default ~/.cache/comoe_peft)."})
    max_train_per_task: int | None = field(default=None, metadata={
        "help": "Training rows kept per task (from the preset)."})
    test_size: int | None = field(default=None, metadata={"help": "Held-out rows per task (from the preset)."})
    analysis_examples_per_task: int | None = field(default=None, metadata={
        "help": "Rows per task that `comoe-peft analyze` feeds (from the preset)."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base model in 4-bit nf4 with bitsandbytes (pip install bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the base model in 8-bit (LLM.int8()) with bitsandbytes."})
    routing_eval_steps: list[int] | None = field(default=None, metadata={"help": (
        "comoe / moe: after these steps, measure routing entropy and the JS divergence between tasks on a few "
        "held-out examples per task (RUN/routing_history.json).")})
    routing_probe_per_task: int | None = field(default=None, metadata={
        "help": "Held-out examples per task that --routing-eval-steps measures on."})


@functools.cache
def adapter_arguments() -> type:
    """The dataclass of the adapter options: the `ADAPTER_FIELD_TYPES` fields of `CoMoEConfig`, with its help and
    defaults, except the job's own defaults (`JOB_DEFAULTS`: r 16, lora_alpha 2 r, dropout 0.05, the attention
    projections)."""
    from comoe_peft.tuner.config import CoMoEConfig

    source = {f.name: f for f in dataclasses.fields(CoMoEConfig)}
    fields = []
    for name, kind in ADAPTER_FIELD_TYPES.items():
        help_text = ADAPTER_HELP.get(name, source[name].metadata.get("help", "")).replace("%", "%%")
        metadata: dict[str, Any] = {"help": help_text} | ({"aliases": ["--rank"]} if name == "r" else {})
        default = JOB_DEFAULTS.get(name, source[name].default)
        if isinstance(default, list):
            spec = field(default_factory=lambda value=tuple(default): list(value), metadata=metadata)
        else:
            spec = field(default=default, metadata=metadata)
        fields.append((name, kind, spec))
    adapter = dataclasses.make_dataclass("AdapterArguments", fields)
    adapter.__module__ = __name__
    adapter.__doc__ = "The adapter options: fields of `CoMoEConfig` (peft's names)."
    return adapter


def script_fields() -> set[str]:
    """The names of the job's own options."""
    return {f.name for f in dataclasses.fields(ScriptArguments)}


def preset_names() -> list[str]:
    """The presets shipped with the package (`presets/*.yaml`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml_options(path: str | Path) -> dict[str, Any]:
    """The options of a preset or `--config` file: a YAML mapping of option names (a flag without its leading
    dashes) to values; ValueError if the file cannot be read or is not a mapping."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read the config file '{path}': {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"the config file '{path}' is not valid YAML ({' '.join(str(error).split())})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"the config file '{path}' must hold a YAML mapping of option: value")
    return loaded


def load_preset(name: str) -> dict[str, Any]:
    """The options the shipped preset `name` sets, under the command's names (`per_device_train_batch_size`, ...);
    `preset_values` adds what it leaves to the default preset and the job."""
    if name not in preset_names():
        raise ValueError(f"--preset must be one of {', '.join(preset_names())} (got {name!r}); pass your own "
                         "settings with --config FILE.yaml instead")
    values = read_yaml_options(PRESET_DIR / f"{name}.yaml")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def preset_values(name: str) -> dict[str, Any]:
    """Every value the shipped preset `name` gives a run, under the command's names: the job's defaults
    (`JOB_DEFAULTS`), the default preset over them, the preset over both; None (not set) left out. ValueError for
    an unknown name."""
    values = copy.deepcopy(JOB_DEFAULTS) | load_preset("default") | load_preset(name)
    return {key: value for key, value in values.items() if value is not None}


def train_options_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """`TrainOptions` keyword arguments from option values under the command's names: the job's options and the
    mapped trainer / adapter fields by their `TrainOptions` names, every other field in `extra` (trainer) or
    `adapter_extra` (adapter)."""
    script, adapter = script_fields(), set(ADAPTER_FIELD_TYPES)
    kwargs: dict[str, Any] = {"extra": {}, "adapter_extra": {}}
    for name, value in values.items():
        if name in script:
            kwargs[name] = value
        elif name in TRAINER_NAMES:
            kwargs[TRAINER_NAMES[name]] = value
        elif name in ADAPTER_NAMES:
            kwargs[ADAPTER_NAMES[name]] = value
        elif name in adapter:
            kwargs["adapter_extra"][name] = value
        else:
            kwargs["extra"][name] = value
    return kwargs


def command_values(options: Any) -> dict[str, Any]:
    """The inverse of `train_options_kwargs`: a `TrainOptions`' values under the command's names."""
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(ScriptArguments)}
    for names in (TRAINER_NAMES, ADAPTER_NAMES):
        values |= {name: getattr(options, own) for name, own in names.items()}
    return values | dict(options.extra) | dict(options.adapter_extra)


def flag(name: str) -> str:
    """How a message names an option: its flag as users type it (`--batch-size` for the batch size)."""
    aliases = {dest: alias for alias, dest in TRAINER_ALIASES.items()} | {"r": "--rank"}
    return aliases.get(name, "--" + name.replace("_", "-"))
