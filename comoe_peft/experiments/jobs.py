"""The main job behind the `comoe-peft` command: multi-task fine-tuning, evaluation and specialisation analysis.

`train` fine-tunes one method (`comoe`, `moe` = the same experts without the contrastive term, or `lora` = peft
LoRA at a matched number of trainable parameters) on a task mixture, or, for `base`, writes a run folder with the
same held-out split and no adapter, so that the zero-shot base model is scored like the others; `evaluate_run`
scores a run with lm-evaluation-harness on its held-out examples or on lm-eval's own tasks; `analyze_run` writes
the expert-specialisation report. `PRESETS` holds every value each `--preset` gives a run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk

from comoe_peft import __version__
from comoe_peft.tuner.block import block_layout, projection_features
from comoe_peft.tuner.config import CoMoEConfig
from .data import format_prompt, load_examples, to_sft_dataset, train_test_split_per_task
from .options import (
    EXPERT_METHODS,
    JOB_TRAINER_SETTINGS,
    METHODS,
    TARGET_MODULES,
    ScriptArguments,
    command_values,
    preset_names,
    preset_values,
    train_options_kwargs,
)
from comoe_peft.tuner.registration import write_loading_note
from .runs import (
    ADAPTER_DIR,
    ANALYSIS_DIR,
    EVAL_RESULTS,
    LM_EVAL_RESULTS,
    LM_EVAL_TASKS_DIR,
    LOG_HISTORY,
    ROUTING_HISTORY,
    RUN_CONFIG,
    TEST_DATA_DIR,
    TRAINER_DIR,
    RunError,
    RunInterrupted,
    damaged_file_error,
    finish_run,
    last_checkpoint,
    lock_run,
    missing_parents,
    open_run,
    remove_empty_folders,
    start_resumable_run,
    start_run,
    write_json,
)
from .validation import TRAINING_ONLY

logger = logging.getLogger(__name__)


def _preset(name: str) -> dict[str, Any]:
    """What the shipped preset `name` gives a run (`options.preset_values`), under `TrainOptions`' names."""
    return train_options_kwargs(preset_values(name))


# every value each shipped preset gives a run (comoe_peft/experiments/presets/*.yaml over the default preset and the
# job's defaults), under `TrainOptions`' names: PRESETS["quick"]["max_steps"] is 12
PRESETS: dict[str, dict[str, Any]] = {name: _preset(name) for name in preset_names()}


@dataclass(kw_only=True)
class TrainOptions(ScriptArguments):
    """Everything `comoe-peft train` needs: the job's `ScriptArguments` plus the trainer and adapter settings the
    job has always had, under short names. A None field is not given: `resolved()` takes it from the preset, else
    the default preset, else the job's defaults (`comoe_peft.experiments.options.JOB_DEFAULTS`).

    `extra`: any other `CoMoESFTConfig` / `SFTConfig` field (TRL's names), passed to the trainer over the job's
    settings; `adapter_extra`: any other adapter field of `comoe_peft.experiments.options.ADAPTER_FIELD_TYPES`
    (peft's names), passed to the adapter config. Their keys override the presets' one by one.
    """

    output_dir: str
    seed: int | None = None
    num_experts: int | None = None
    top_k: int | None = None
    rank: int | None = None
    lora_dropout: float | None = None
    contrastive_loss_coef: float | None = None
    contrastive_temperature: float | None = None
    target_modules: list[str] | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    learning_rate: float | None = None
    save_steps: int | None = None
    bf16: bool | None = None
    router_lr_multiplier: float | None = None
    padding_free: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    adapter_extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainOptions:
        """A copy with every option that is not given (None) taken from the preset, then the default preset, then
        the job's defaults, after checking every value (`comoe_peft.experiments.validation.check_train_values`; a
        `RunError` names the first bad one)."""
        from .validation import check_train_values

        if self.preset not in preset_names():
            check_train_values({"output_dir": self.output_dir, "method": self.method, "preset": self.preset})
        given = {name: value for name, value in command_values(self).items() if value is not None}
        options = TrainOptions(**train_options_kwargs(preset_values(self.preset) | given))
        for name in ("save_steps", "max_steps"):  # TRL reads steps as floats; the job counts whole steps
            value = getattr(options, name)
            if isinstance(value, float) and value.is_integer():
                setattr(options, name, int(value))
        check_train_values(command_values(options), self.training_only_given())  # given: before the preset
        check_quantization(self.load_in_4bit, self.load_in_8bit)
        if self.method == "base":
            options.max_steps = 0  # trains nothing
        options.routing_eval_steps = sorted(set(options.routing_eval_steps))
        return options

    def training_only_given(self) -> list[str]:
        """The options set here that only a training run has, under the command's names."""
        values = command_values(self)
        given = [name for name in TRAINING_ONLY if values[name] is not None and values[name] is not False
                 and values[name] != [] and values[name] != 0]
        if self.router_lr_multiplier == 1:
            given = [name for name in given if name != "comoe_router_lr_multiplier"]
        return given + list(self.extra) + list(self.adapter_extra)


# ---------------------------------------------------------------------------------------------- data


def load_mixture(options: TrainOptions) -> Dataset:
    """The examples to train and evaluate on: a user dataset (`--dataset`) or tasks (`--tasks`).

    Tasks are built-in (`bigbench:<task>`, `synthetic:<name>`) or the paper's benchmarks from the local Hugging Face
    cache (`benchmark:arc-e`, ... see `comoe_peft.experiments.hub_datasets.BENCHMARKS`; their train split).
    """
    from datasets import concatenate_datasets

    from .hub_datasets import load_benchmark
    from .tasks import load_tasks, parse_task_spec

    try:
        if options.dataset:
            return load_examples(options.dataset)
        names = [n.strip() for n in options.tasks.split(",") if n.strip()]
        benchmarks = [n.removeprefix("benchmark:") for n in names if n.startswith("benchmark:")]
        builtin = [n for n in names if not n.startswith("benchmark:")]
        if builtin:
            parse_task_spec(builtin)  # cheap check before any download
        cap = None if options.max_train_per_task is None else options.max_train_per_task + options.test_size
        parts = [load_benchmark(name, "train") for name in benchmarks]
        if builtin:
            parts.append(load_tasks(builtin, seed=options.seed, max_examples_per_task=cap,
                                    cache_dir=options.cache_dir))
        return concatenate_datasets(parts)
    except (ValueError, FileNotFoundError) as error:
        raise RunError(str(error)) from None


# ---------------------------------------------------------------------------------------------- model


def check_quantization(load_in_4bit: bool, load_in_8bit: bool) -> None:
    """Refuse both quantizations at once, or either without bitsandbytes (checked before anything is loaded)."""
    if load_in_4bit and load_in_8bit:
        raise RunError("--load-in-4bit and --load-in-8bit exclude each other; choose one")
    if (load_in_4bit or load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
        raise RunError(f"{flag} needs bitsandbytes, which is not installed; install it with: pip install bitsandbytes")


def quantization_kwargs(load_in_4bit: bool = False, load_in_8bit: bool = False) -> dict[str, Any]:
    """`from_pretrained` arguments for a bitsandbytes base: 4-bit nf4 (QLoRA's choice) or 8-bit; {} for neither.

    The 4-bit compute dtype is bf16 on a GPU that supports it, float32 otherwise; the model sits on one device.
    """
    if not (load_in_4bit or load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    if load_in_4bit:
        compute = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()} if on_gpu else "cpu"}


def load_base_model(
    name_or_path: str | None, cache_dir: str | None = None, quantization: dict[str, Any] | None = None
):
    """The base model and tokenizer, resolved offline; a `RunError` with the reason if it cannot be loaded.

    `quantization`: extra `from_pretrained` arguments from `quantization_kwargs` (None: an unquantized float32 model).
    """
    from .pretrained import load_model_and_tokenizer, resolve_model_path

    try:
        path = resolve_model_path(name_or_path, cache_dir)
        model, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32, **(quantization or {}))
    except (ValueError, OSError, ModuleNotFoundError) as error:
        raise RunError(str(error)) from None
    return path, model, tokenizer


def adapter_config(options: TrainOptions, model: torch.nn.Module):
    """The peft config of a method: CoMoE, MoE-LoRA (CoMoE without the contrastive term) or matched LoRA, with the
    `adapter_extra` fields (`lora_alpha` defaults to 2 r)."""
    from peft import LoraConfig

    extra = dict(options.adapter_extra)
    if options.method in EXPERT_METHODS:
        return CoMoEConfig(**{
            "r": options.rank,
            "lora_alpha": 2 * options.rank,
            "lora_dropout": options.lora_dropout,
            "num_experts": options.num_experts,
            "top_k": options.top_k,
            "target_modules": list(options.target_modules),
            "contrastive_loss_coef": options.contrastive_loss_coef if options.method == "comoe" else 0.0,
            "contrastive_temperature": options.contrastive_temperature,
            "task_type": "CAUSAL_LM",
        } | {k: v for k, v in extra.items() if v is not None})
    rank = matched_lora_rank(model, options.num_experts, options.rank, options.target_modules,
                             use_dora=bool(extra.get("use_dora")))
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{"r": rank, "lora_alpha": 2 * rank, "lora_dropout": options.lora_dropout,
                         "target_modules": lora_target_modules(model, options.target_modules),
                         "task_type": "CAUSAL_LM"}
                      | {k: v for k, v in extra.items() if k in lora_fields and v is not None})


def check_target_modules(model: torch.nn.Module, peft_config) -> None:
    """A `RunError` naming the model's linear layers when `peft_config.target_modules` matches none of its modules
    (peft's own matching rules: suffixes, regular expressions, `all-linear`)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if peft_config.target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if any(check_target_module_exists(peft_config, name) for name in names):
        return
    targets = peft_config.target_modules
    shown = targets if isinstance(targets, str) else " ".join(sorted(targets))
    raise RunError(f"--target-modules {shown} matches no module of the model; {linear_layers_hint(model)}")


def linear_layers_hint(model: torch.nn.Module) -> str:
    """'its linear layers are named ...: choose among them', without the output head (no adapter may target it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and module is not head})
    return f"its linear layers are named {', '.join(names)}: choose among them"


def _targeted_blocks(model: torch.nn.Module, targets: list[str]) -> list[tuple[torch.nn.Module, Any]]:
    """The MLP blocks (with their layouts) whose names are among the targets: they get block experts."""
    blocks = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and (layout := block_layout(module)) is not None:
            blocks.append((module, layout))
    return blocks


def lora_target_modules(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """LoRA's targets for the job's: an MLP block (block experts for comoe / moe) stands for the projections inside
    it, which is where LoRA goes."""
    names = {name for name in target_modules}
    for _, layout in _targeted_blocks(model, list(target_modules)):
        names |= {*layout.inputs, layout.output}
    block_names = {t for t in target_modules if _targeted_blocks(model, [t])}
    return sorted(names - block_names)


def matched_lora_rank(model: torch.nn.Module, num_experts: int, rank: int,
                      target_modules: list[str] | None = None, use_dora: bool = False) -> int:
    """LoRA rank whose trainable parameters match CoMoE's N experts of rank r plus the routers on the targets
    (`target_modules`: module-name suffixes, default the attention projections; an MLP block counts its
    projections, each with N experts, and one router at the block's input). With `use_dora` both sides are DoRA:
    CoMoE has N magnitude vectors per adapted projection (d_out each), LoRA one."""
    targets = list(target_modules or TARGET_MODULES)
    in_out, ins, outs = 0, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            in_out += module.in_features + module.out_features
            ins += module.in_features
            outs += module.out_features
    for block, layout in _targeted_blocks(model, targets):
        features = [projection_features(getattr(block, part)) for part in (*layout.inputs, layout.output)]
        in_out += sum(d_in + d_out for d_in, d_out in features)
        ins += features[0][0]  # the block's router reads its input
        outs += sum(d_out for _, d_out in features)
    if in_out == 0:
        raise RunError(f"--target-modules {' '.join(targets)} matches no linear layer of the model; "
                       f"{linear_layers_hint(model)}")
    comoe_params = num_experts * rank * in_out + num_experts * ins
    if use_dora:
        comoe_params += (num_experts - 1) * outs  # N magnitudes per projection against LoRA's one
    return max(1, round(comoe_params / in_out))


# ---------------------------------------------------------------------------------------------- train


def train(options: TrainOptions) -> Path:
    """Fine-tune one method on the mixture and write a run folder; returns its path.

    With `save_steps` the run checkpoints every `save_steps` steps in `.RUN.partial/` and, started again with the
    same options after a stop, resumes from its last checkpoint (`comoe_peft.experiments.runs.start_resumable_run`).
    """
    options = options.resolved()
    new_folders = missing_parents(options.output_dir)  # removed again if the run fails and leaves them empty
    try:
        with lock_run(options.output_dir):  # a second process writing the same run is refused
            return _train_locked(options)
    except BaseException:
        remove_empty_folders(new_folders)  # now that the lock file beside the run is gone
        raise


def _train_locked(options: TrainOptions) -> Path:
    """`train` once it holds the run's lock: stage, train (or write the base run) and move the run into place; a
    failed run leaves nothing but a checkpointed run's partial folder."""
    resumable = options.save_steps is not None
    if resumable:
        staging = start_resumable_run(options.output_dir, options.overwrite, dataclasses.asdict(options))
    else:
        staging = start_run(options.output_dir, options.overwrite)
    try:
        mixture = load_mixture(options)  # data errors first: they are cheaper to find than a model load
        try:
            splits = train_test_split_per_task(mixture, options.test_size, options.seed, options.max_train_per_task)
        except ValueError as error:
            raise RunError(str(error)) from None
        if options.method == "base":
            write_base_run(options, staging, splits)
        else:
            train_into(options, staging, splits)
        return finish_run(staging, options.output_dir)
    except BaseException as error:
        import shutil

        kept = last_checkpoint(staging) if resumable else None
        if not kept:  # a checkpointed run keeps its partial folder
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(interrupted_message(options, str(error), kept, staging)) from None
        raise


def interrupted_message(options: TrainOptions, where: str, kept: str | None, staging: Path) -> str:
    """What a Ctrl-C during `train` left: where it stopped, and whether the same command resumes the run."""
    where = where or "stopped before training started"
    if kept:
        step = kept.rsplit("-", 1)[1]
        return (f"{where}; the checkpoint of step {step} is kept in '{staging}': the same command resumes the run "
                "from there")
    if options.save_steps:
        return (f"{where}, before the first checkpoint (step {options.save_steps}); nothing was kept: the same "
                "command starts the run again")
    return (f"{where}; nothing was kept (a run is written only when it finishes; with --save-steps N it keeps "
            "checkpoints and the same command resumes it)")


def train_into(options: TrainOptions, staging: Path, splits) -> None:
    """Train `options.method` (resuming from the last checkpoint in `staging`, if any) and write the run files."""
    import shutil

    from comoe_peft.training.callbacks import CPUTimeCallback

    quantization = quantization_kwargs(options.load_in_4bit, options.load_in_8bit)
    model_path, model, tokenizer = load_base_model(options.model, options.cache_dir, quantization)
    if options.padding_free:
        # without a KV cache transformers reads the examples' boundaries in a padding-free row from position_ids;
        # with one (the config's default, also in training) they would attend to each other. TRL's trainer turns
        # the cache off today as well; this does not depend on it.
        model.config.use_cache = False
    check_target_modules(model, adapter_config(options, model))  # before the trainer: peft would raise there
    trainer = build_trainer(options, model, tokenizer, splits["train"], staging / TRAINER_DIR)
    cpu_time = CPUTimeCallback()
    trainer.add_callback(cpu_time)
    probe = add_routing_history(trainer, options, tokenizer, splits["test"])
    resume_from = last_checkpoint(staging)
    if resume_from:
        logger.warning("resuming %s from %s", options.output_dir, resume_from)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        raise RunInterrupted(f"stopped at step {trainer.state.global_step} of {options.max_steps}") from None
    trainer.model.save_pretrained(staging / ADAPTER_DIR)
    if options.method != "lora":
        write_loading_note(str(staging / ADAPTER_DIR))
    splits["test"].save_to_disk(str(staging / TEST_DATA_DIR))
    if probe is not None:
        probe.write(staging / ROUTING_HISTORY)
    write_json(staging / LOG_HISTORY, trainer.state.log_history)
    record = run_record(options, model_path, splits, trainer)
    record["resumed_from_step"] = int(resume_from.rsplit("-", 1)[1]) if resume_from else None
    record["train_cpu_time_s"] = cpu_time.total()
    write_json(staging / RUN_CONFIG, record)
    for checkpoint in (staging / TRAINER_DIR).glob("checkpoint-*"):  # finished: the adapter is all that is needed
        shutil.rmtree(checkpoint, ignore_errors=True)


def add_routing_history(trainer, options: TrainOptions, tokenizer, test_rows: Dataset):
    """Add a `RoutingHistoryCallback` on the first `routing_probe_per_task` held-out examples of each task (the
    probe is fixed by the split); None when no `routing_eval_steps` are asked for."""
    if not options.routing_eval_steps:
        return None
    from .routing_history import RoutingHistoryCallback

    tasks = test_rows["task"]
    keep, seen = [], {}
    for index, task in enumerate(tasks):
        if seen.get(task, 0) < options.routing_probe_per_task:
            keep.append(index)
            seen[task] = seen.get(task, 0) + 1
    callback = RoutingHistoryCallback(test_rows.select(keep), tokenizer, options.routing_eval_steps,
                                      options.max_length, options.seed)
    trainer.add_callback(callback)
    return callback


def write_base_run(options: TrainOptions, staging: Path, splits) -> None:
    """The run folder of `--method base`: the held-out split and the resolved model, no adapter, no training."""
    from .pretrained import resolve_model_path

    try:
        model_path = resolve_model_path(options.model, options.cache_dir)
    except (ValueError, OSError) as error:
        raise RunError(str(error)) from None
    splits["test"].save_to_disk(str(staging / TEST_DATA_DIR))
    record = run_record(options, model_path, splits, trainer=None)
    write_json(staging / RUN_CONFIG, record)


def build_trainer(options: TrainOptions, model, tokenizer, train_rows: Dataset, output_dir: Path):
    """`CoMoESFTTrainer` for comoe / moe, TRL's `SFTTrainer` for lora, with the preset's settings."""
    from trl import SFTConfig, SFTTrainer

    from comoe_peft.training.trainer import CoMoESFTConfig, CoMoESFTTrainer

    on_gpu = torch.cuda.is_available()
    bf16 = options.bf16 if options.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    settings = dict(
        output_dir=str(output_dir),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        warmup_steps=max(1, options.max_steps // 20),  # the words of JOB_DERIVED_SETTINGS, which --help shows
        logging_steps=max(1, options.max_steps // 30),
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        bf16=bf16,  # on a CPU: bf16 autocast (worth it on CPUs with bf16 units: AVX512-BF16, AMX)
        use_cpu=not on_gpu,
        # padding-free batches are not cut at max_length (TRL enforces it only by packing, which would change how
        # many examples a step sees): the same examples per step as padded batches, none of them truncated
        max_length=None if options.padding_free else options.max_length,
        seed=options.seed,
        padding_free=options.padding_free,  # TRL flattens each batch into one row; no pad tokens are computed
    ) | JOB_TRAINER_SETTINGS | options.extra
    dataset = to_sft_dataset(train_rows).remove_columns(["task"]).shuffle(seed=options.seed)
    peft_config = adapter_config(options, model)
    if options.method == "lora":  # CoMoE's trainer settings (a preset's; given ones are refused) have no experts
        settings = {name: value for name, value in settings.items() if not name.startswith("comoe_")}
        return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    settings["comoe_router_lr_multiplier"] = options.router_lr_multiplier
    return CoMoESFTTrainer(model=model, args=CoMoESFTConfig(**settings), train_dataset=dataset,
                           processing_class=tokenizer, peft_config=peft_config)


def run_record(options: TrainOptions, model_path: str, splits, trainer) -> dict[str, Any]:
    """What `run_config.json` stores: options, resolved model, data sizes, trainable parameters, versions
    (`trainer` None: a base run, nothing trained)."""
    import peft
    import transformers
    import trl

    trainable, total = trainer.model.get_nb_trainable_parameters() if trainer is not None else (0, None)
    tasks = sorted(set(splits["test"]["task"]))
    return {
        "options": dataclasses.asdict(options),
        "method": options.method,
        "model_path": model_path,
        "tasks": tasks,
        "train_examples": len(splits["train"]),
        "test_examples": len(splits["test"]),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_type": type(trainer.model.peft_config["default"]).__name__ if trainer is not None else None,
        "train_runtime_s": trainer.state.log_history[-1].get("train_runtime") if trainer is not None else 0.0,
        "versions": {"comoe_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------- eval / analyze


def load_run_model(run_dir: Path, config: dict[str, Any]):
    """The base model with the run's adapter loaded (eval mode; a base run: the base model alone), and the
    tokenizer."""
    from peft import PeftModel

    import comoe_peft  # noqa: F401  (the COMOE type must be registered before loading)

    options = config.get("options", {})
    quantization = quantization_kwargs(options.get("load_in_4bit", False), options.get("load_in_8bit", False))
    _, model, tokenizer = load_base_model(config["model_path"], quantization=quantization)  # the base it trained on
    if config["method"] == "base":
        return model.eval(), tokenizer
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors import SafetensorError

    adapter = run_dir / ADAPTER_DIR
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (SafetensorError, EOFError) as error:
        raise damaged_file_error(adapter / SAFETENSORS_WEIGHTS_NAME, error) from None
    except json.JSONDecodeError as error:
        raise damaged_file_error(adapter / "adapter_config.json", error) from None
    return model.eval(), tokenizer


def evaluate_run(run_dir: str, overwrite: bool = False, batch_size: int = 16, tasks: Sequence[str] = (),
                 limit: int | None = None) -> dict[str, Any]:
    """Per-task accuracy of a run, scored by lm-evaluation-harness (`comoe_peft.experiments.lm_eval_tasks`).

    Without `tasks`: on the run's held-out examples, written as lm-eval tasks into `RUN/lm_eval_tasks/`; stored in
    `eval_results.json` and reused unless `overwrite` (a `limit` run is neither reused nor stored). With `tasks`: on
    lm-eval's own tasks of those names (`arc_easy`, `boolq`, ...; their data must be in the local Hugging Face
    cache), always evaluated and added to `lm_eval_results.json`. `limit`: at most this many examples per task.
    """
    from .lm_eval_tasks import OVERALL, evaluate_examples, evaluate_tasks

    folder, config = open_run(run_dir)
    stored = folder / (LM_EVAL_RESULTS if tasks else EVAL_RESULTS)
    if not tasks and stored.is_file() and not overwrite and limit is None:
        return json.loads(stored.read_text(encoding="utf-8"))
    if importlib.util.find_spec("lm_eval") is None:
        raise RunError("comoe-peft eval scores with lm-evaluation-harness, which is not installed; install it with: "
                       "pip install 'lm-eval>=0.4.13,<0.5' (or this package's [experiments] extra)")
    model, tokenizer = load_run_model(folder, config)
    try:
        if tasks:
            results = evaluate_tasks(model, tokenizer, tasks, batch_size=batch_size, limit=limit)
        else:
            test = load_from_disk(str(folder / TEST_DATA_DIR))
            results = evaluate_examples(model, tokenizer, test, folder / LM_EVAL_TASKS_DIR, batch_size, limit)
    except ValueError as error:  # includes lm_eval_tasks.TaskLoadError: unknown task, data not local
        raise RunError(str(error)) from None
    if tasks:
        earlier = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
        write_json(stored, {k: v for k, v in (earlier | results).items() if k != OVERALL})
    elif limit is None:
        write_json(stored, results)
    return results


def analyze_run(run_dir: str, overwrite: bool = False, max_examples_per_task: int | None = None) -> dict:
    """The expert-specialisation report of a CoMoE or MoE run, written to `RUN/analysis/`."""
    from .analysis import analyze_model, write_report

    folder, config = open_run(run_dir)
    if config["method"] not in EXPERT_METHODS:
        raise RunError(
            f"'{folder}' was trained with --method {config['method']}, which has no experts to analyse; "
            "analyze a run trained with --method comoe or --method moe"
        )
    out_dir = folder / ANALYSIS_DIR
    if (out_dir / "analysis.json").is_file() and not overwrite:
        raise RunError(f"'{out_dir}' already holds an analysis; pass --overwrite to redo it")
    model, tokenizer = load_run_model(folder, config)
    test = load_from_disk(str(folder / TEST_DATA_DIR))
    per_task = (max_examples_per_task or config["options"].get("analysis_examples_per_task")
                or PRESETS["default"]["analysis_examples_per_task"])
    result = analyze_model(model, tokenizer, test, max_examples_per_task=per_task,
                           max_length=config["options"].get("max_length") or 128, seed=config["options"]["seed"])
    result["run"] = {"method": config["method"], "run_dir": str(folder)}
    write_report(result, out_dir)
    return result


__all__ = [
    "EXPERT_METHODS",
    "METHODS",
    "PRESETS",
    "RUN_CONFIG",
    "TrainOptions",
    "adapter_config",
    "analyze_run",
    "evaluate_run",
    "matched_lora_rank",
    "train",
]
