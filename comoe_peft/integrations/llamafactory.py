"""CoMoE in LLaMA-Factory's SFT runs: its data, templates, trainer, checkpoints and saving, with a CoMoE adapter
trained with the auxiliary losses.

LLaMA-Factory (tested: 0.9.5) builds only its own adapter types and its own trainer classes; it has no plug-in point
for either. The recipe goes through one door it does have and patches one name:

1. The adapter. `build_adapter` puts a fresh CoMoE adapter on the base model and saves it. LLaMA-Factory's
   `adapter_name_or_path` (with `finetuning_type: lora`) loads that folder with stock
   `PeftModel.from_pretrained(..., is_trainable=True)`, as when it resumes training a LoRA adapter, and trains it.
2. The losses (the patch). While `run_exp` runs, the name `CustomSeq2SeqTrainer` in
   `llamafactory.train.sft.workflow` is `CoMoESeq2SeqTrainer`: `CoMoETrainerMixin` before LLaMA-Factory's own SFT
   trainer, so the contrastive, load-balance and z losses join the task loss and `comoe/*` is logged. The name is
   restored when `run_exp` returns.

The result is a peft adapter folder (`peft_type: COMOE`) in `output_dir`; `PeftModel.from_pretrained` loads it after
`import comoe_peft`. Command: `python -m comoe_peft.integrations.llamafactory config.yaml [key=value ...]`, as
`llamafactory-cli train config.yaml`, where the YAML has LLaMA-Factory's keys plus a `comoe:` mapping of
`CoMoEConfig` fields. docs/llama-factory.md has a whole example.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

from comoe_peft.training.trainer import CoMoETrainerMixin
from comoe_peft.tuner.config import CoMoEConfig
from comoe_peft.tuner.registration import write_loading_note

TESTED_VERSION = "0.9.5"
CONFIG_KEY = "comoe"  # the mapping of CoMoEConfig fields in LLaMA-Factory's YAML
INIT_FOLDER = "comoe_init"  # inside output_dir: the fresh adapter that LLaMA-Factory loads


class RecipeError(ValueError):
    """A setting this recipe cannot run with; the message says which and what to write instead."""


def _llamafactory_version() -> str:
    try:
        return importlib.metadata.version("llamafactory")
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(f"LLaMA-Factory is not installed: pip install llamafactory=={TESTED_VERSION}") from None


@cache
def comoe_seq2seq_trainer() -> type:
    """LLaMA-Factory's `CustomSeq2SeqTrainer` with `CoMoETrainerMixin` first in its bases (built on first call)."""
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    class CoMoESeq2SeqTrainer(CoMoETrainerMixin, CustomSeq2SeqTrainer):
        """LLaMA-Factory's SFT trainer plus the CoMoE auxiliary losses and `comoe/*` metrics."""

    return CoMoESeq2SeqTrainer


def build_adapter(
    model_name_or_path: str,
    config: CoMoEConfig,
    folder: str,
    seed: int = 42,
    trust_remote_code: bool = False,
) -> str:
    """Put a fresh CoMoE adapter (`config`) on the base model and save it in `folder`; return `folder`.

    The base model is loaded once on the CPU in its own dtype, only to know the targets' shapes (its weights are
    not saved). The adapter's random initialisation is seeded with `seed`, so the same arguments give the same
    adapter.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype="auto", trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    del model, base
    gc.collect()
    return folder


def _comoe_config(section: Any) -> CoMoEConfig:
    if isinstance(section, CoMoEConfig):
        return section
    if not isinstance(section, dict):
        raise RecipeError(f"`{CONFIG_KEY}` must be a mapping of CoMoEConfig fields, got {type(section).__name__}.")
    fields = set(CoMoEConfig.__dataclass_fields__)
    unknown = sorted(set(section) - fields)
    if unknown:
        raise RecipeError(f"`{CONFIG_KEY}` has keys that are not CoMoEConfig fields: {', '.join(unknown)}.")
    try:
        return CoMoEConfig(**{"task_type": "CAUSAL_LM", **section})
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{CONFIG_KEY}: {error}") from None


def _check_is_comoe_adapter(path: str) -> None:
    from peft import PeftConfig

    try:
        peft_type = PeftConfig.from_pretrained(path).peft_type
    except (OSError, ValueError, KeyError) as error:  # no such folder or hub id, no adapter_config.json, unknown type
        raise RecipeError(f"adapter_name_or_path {path!r} is not a peft adapter this recipe can read ({error}).") from None
    peft_type = getattr(peft_type, "value", peft_type)
    if peft_type != "COMOE":
        raise RecipeError(f"adapter_name_or_path {path!r} is a {peft_type} adapter; this recipe trains a CoMoE one: "
                          f"give a `{CONFIG_KEY}:` mapping instead, or a CoMoE adapter folder.")


def check_args(args: dict[str, Any]) -> tuple[dict[str, Any], CoMoEConfig | None]:
    """Check LLaMA-Factory arguments for a CoMoE SFT run, without building or loading anything.

    Returns LLaMA-Factory's arguments (the `comoe` mapping taken out, `finetuning_type: lora` set: the
    LLaMA-Factory type whose loading path the recipe uses) and the `CoMoEConfig` of the `comoe` mapping (None
    without one: then `adapter_name_or_path` must name a CoMoE adapter, e.g. to go on training one). Raises
    `RecipeError` (one line) for what the recipe cannot run with: another stage than `sft`, another finetuning
    type, reentrant gradient checkpointing (LLaMA-Factory's default, which would give the auxiliary losses no
    gradient), Ray, keys that are not `CoMoEConfig` fields.
    """
    if not isinstance(args, dict):
        raise RecipeError("give LLaMA-Factory's arguments as a YAML file (or a dict), as for "
                          "`llamafactory-cli train config.yaml`.")
    args = dict(args)
    section = args.pop(CONFIG_KEY, None)
    if args.get("stage", "sft") != "sft":
        raise RecipeError(f"stage: {args['stage']} is not supported; the CoMoE recipe runs LLaMA-Factory's sft stage.")
    if args.get("finetuning_type", "lora") != "lora":
        raise RecipeError(f"finetuning_type: {args['finetuning_type']} does not fit: the CoMoE adapter is loaded "
                          "through LLaMA-Factory's lora path; leave finetuning_type out or set it to lora.")
    if args.get("use_ray"):
        raise RecipeError("use_ray is not supported: the CoMoE trainer is set in this process only.")
    if not args.get("disable_gradient_checkpointing", False) and args.get("use_reentrant_gc", True):
        raise RecipeError("LLaMA-Factory's default reentrant gradient checkpointing gives the CoMoE auxiliary losses "
                          "no gradient: set use_reentrant_gc: false (or disable_gradient_checkpointing: true).")
    args["finetuning_type"] = "lora"
    if section is None:
        path = args.get("adapter_name_or_path")
        if path is None:
            raise RecipeError(f"add a `{CONFIG_KEY}:` mapping of CoMoEConfig fields (e.g. num_experts, top_k, "
                              "target_modules), or adapter_name_or_path of a CoMoE adapter.")
        if "," in str(path):
            raise RecipeError("adapter_name_or_path must name one CoMoE adapter (CoMoE adapters cannot be merged).")
        _check_is_comoe_adapter(str(path))
        return args, None
    config = _comoe_config(section)
    if args.get("adapter_name_or_path") is not None:
        raise RecipeError(f"give either a `{CONFIG_KEY}:` mapping (a fresh adapter) or adapter_name_or_path, not both.")
    for name in ("model_name_or_path", "output_dir"):
        if not args.get(name):
            raise RecipeError(f"{name} is required.")
    return args, config


def prepare_args(args: dict[str, Any]) -> dict[str, Any]:
    """`check_args`, then, for a `comoe` mapping, build the fresh adapter in `<output_dir>/comoe_init` and point
    `adapter_name_or_path` at it; return the arguments for LLaMA-Factory.

    A fresh adapter is refused in a multi-process launch (every process would write it): build it first with
    `build_adapter` and give its folder as `adapter_name_or_path`.
    """
    args, config = check_args(args)
    if config is None:
        return args
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("in a multi-process launch, build the adapter first (comoe_peft.integrations.llamafactory."
                          "build_adapter) and give its folder as adapter_name_or_path instead of a `comoe:` mapping.")
    folder = os.path.join(str(args["output_dir"]), INIT_FOLDER)
    build_adapter(str(args["model_name_or_path"]), config, folder, seed=int(args.get("seed", 42)),
                  trust_remote_code=bool(args.get("trust_remote_code", False)))
    args["adapter_name_or_path"] = folder
    return args


@contextmanager
def comoe_sft_trainer() -> Iterator[type]:
    """Inside this block, LLaMA-Factory's SFT workflow builds `CoMoESeq2SeqTrainer` instead of its own trainer."""
    from llamafactory.train.sft import workflow

    if not isinstance(getattr(workflow, "CustomSeq2SeqTrainer", None), type):
        raise RecipeError(f"llamafactory {_llamafactory_version()} has no llamafactory.train.sft.workflow."
                          f"CustomSeq2SeqTrainer to replace; this recipe is tested with llamafactory=={TESTED_VERSION}.")
    original = workflow.CustomSeq2SeqTrainer
    workflow.CustomSeq2SeqTrainer = comoe_seq2seq_trainer()
    try:
        yield workflow.CustomSeq2SeqTrainer
    finally:
        workflow.CustomSeq2SeqTrainer = original


def run_exp(args: dict[str, Any] | None = None, callbacks: list | None = None) -> None:
    """LLaMA-Factory's `run_exp` for an SFT run that trains a CoMoE adapter with the auxiliary losses.

    `args`: LLaMA-Factory's arguments plus a `comoe` mapping of `CoMoEConfig` fields (see `prepare_args`); None
    reads them from the command line as `llamafactory-cli train` does (a YAML file, then key=value
    overrides). `callbacks` go to the trainer, as with LLaMA-Factory's own `run_exp`.
    """
    _llamafactory_version()
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp as llamafactory_run_exp

    args = prepare_args(read_args(args))
    with comoe_sft_trainer():
        llamafactory_run_exp(args, callbacks=callbacks)
    # LLaMA-Factory writes the model card last, over the one the trainer's `_save` gave the note
    folder = str(args.get("output_dir", ""))
    if os.environ.get("RANK", "0") == "0" and os.path.isfile(os.path.join(folder, "adapter_config.json")):
        write_loading_note(folder)


def main() -> None:
    """`python -m comoe_peft.integrations.llamafactory config.yaml [key=value ...]`; a setting the recipe cannot
    run with ends it with one line and exit code 2."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0].replace("\n", " ") + "\n\nusage: python -m comoe_peft.integrations.llamafactory "
              "config.yaml [key=value ...]  (docs/llama-factory.md)")
        return
    try:
        run_exp()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
