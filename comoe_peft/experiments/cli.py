"""`comoe-peft`: train, evaluate and analyse CoMoE against MoE-LoRA and LoRA from the command line.

```text
comoe-peft train [--method M] [--tasks T] [--model P] [--dataset D] [--preset quick] [--config run.yaml] --output-dir RUN
comoe-peft train --save-steps 50 ... --output-dir RUN    # checkpoints; the same command again resumes a stopped run
comoe-peft train --method base ... --output-dir RUN      # the zero-shot base model: the split, no adapter
comoe-peft eval RUN [RUN ...]                            # lm-evaluation-harness on the run's held-out examples
comoe-peft eval RUN --tasks arc_easy,boolq               # lm-eval's own tasks (data in the local HF cache)
comoe-peft analyze RUN
```

`train` is parsed by TRL's `TrlParser` from three dataclasses (`comoe_peft.experiments.options`): every field of
the job's `ScriptArguments`, of the trainer's `CoMoESFTConfig` and of the adapter's `CoMoEConfig` is a flag and a
key of a `--config` YAML file. Precedence, lowest first: the job's defaults, the default preset, the chosen preset
(`--preset NAME`, a YAML file shipped in `comoe_peft/experiments/presets/`), the `--config` file, the flags.

Errors in the user's input (a bad value, a missing model, an unknown task, a dataset with the wrong columns, a
folder that cannot be written, a run of the wrong method) print one line and exit with status 2, before anything
is loaded or written; a failed command leaves no folder behind. So does a missing package of the `experiments`
extra (the library install alone does not bring them). Downloads and conversions into the cache are announced
on stderr before they start and when they are done.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as shells report a command stopped by Ctrl-C
INTERRUPTED_NOTHING_STORED = {
    "train": "nothing was written",
    "eval": "results are stored only when a run's evaluation finishes",
    "analyze": "the report is written only when the analysis finishes",
}
TRAIN_DESCRIPTION = "multi-task fine-tuning of one method into a run folder"
EXTRA = "experiments"
EXTRA_HINT = f'pip install "comoe-peft[{EXTRA}]" (in a clone: pip install -e ".[{EXTRA}]")'
EXTRA_MODULES = frozenset({"matplotlib", "scipy", "tqdm", "gguf", "lm_eval"})  # what the experiments extra brings


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of `comoe-peft train`: TRL's `TrlParser` over `ScriptArguments`, `CoMoESFTConfig` and the
    adapter fields of `CoMoEConfig`, plus `--config` and the old flags' aliases; its defaults (shown by `--help`)
    are the job's with the default preset."""
    from trl import TrlParser

    from comoe_peft.training.trainer import CoMoESFTConfig

    from .options import (
        JOB_DERIVED_SETTINGS,
        JOB_TRAINER_SETTINGS,
        TRAINER_ALIASES,
        ScriptArguments,
        adapter_arguments,
        preset_values,
    )

    class TrainParser(TrlParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            # one line, not argparse's usage of 200 options
            print(f"comoe-peft: error: {message}; see comoe-peft train --help", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    parser = TrainParser([ScriptArguments, CoMoESFTConfig, adapter_arguments()], prog="comoe-peft train",
                         description=TRAIN_DESCRIPTION, allow_abbrev=False,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="options as a YAML mapping (flag names without dashes); over the preset, under flags")
    actions = {action.dest: action for action in parser._actions}
    for alias, dest in TRAINER_ALIASES.items():
        parser.add_argument(alias, dest=dest, type=actions[dest].type, help=f"same as --{dest}")
    actions["bf16"].nargs, actions["bf16"].const = "?", True  # TRL's bool | None: --bf16 alone means true
    actions["bf16"].help = "bf16 mixed precision (autocast); on a CPU worth it only with AVX512-BF16 or AMX."
    parser.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, help="same as --bf16 false")
    parser.add_argument("--help-all", action="store_true", help="every option in one list, TRL's included")
    actions["output_dir"].help = "The run folder to create (required)."
    actions["seed"].help = "Seeds the data (synthetic tasks, subsets, split) and training."
    own = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    for name, text in TRAINER_HELP.items():
        own[name].help = text
    # only the help reads these defaults (the values parsed are what the user typed): the job's, not TRL's
    parser.set_defaults_with_config(**(preset_values("default") | JOB_TRAINER_SETTINGS | JOB_DERIVED_SETTINGS))
    return parser


TRAINER_HELP = {  # the trainer options --help lists, in the job's words (TRL's own help is in --help-all)
    "max_steps": "Optimizer steps to train.",
    "per_device_train_batch_size": "Examples per step.",
    "learning_rate": "Peak learning rate of the experts (and routers).",
    "max_length": "Tokens per training example; longer ones are cut.",
    "lr_scheduler_type": "Learning-rate schedule after the warm-up (TRL's names).",
    "warmup_steps": "Steps of linear warm-up (below 1: a fraction of max_steps).",
    "weight_decay": "AdamW weight decay.",
    "max_grad_norm": "Gradient clipping norm (0: no clipping).",
    "gradient_accumulation_steps": "Batches whose gradients add up to one optimizer step.",
    "logging_steps": "Steps between log lines (trainer/ in the run folder).",
    "save_steps": ("Checkpoint every N steps into .RUN.partial/ beside the run folder; after a stop the same "
                   "command resumes from the last complete checkpoint."),
    "save_total_limit": "Checkpoints kept while training (all removed when the run finishes).",
    "padding_free": "TRL's padding-free batches: no pad tokens, examples not cut at max_length.",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory.",
    "optim": "The optimizer (TRL's names, e.g. adamw_torch, adamw_8bit).",
}
# what `comoe-peft train --help` lists, group by group: the job's options first, then CoMoE's, then the trainer's
HELP_GROUPS: dict[str, list[str]] = {
    "the job": ["output_dir", "method", "tasks", "dataset", "model", "preset", "config", "seed", "overwrite",
                "cache_dir", "max_train_per_task", "test_size", "analysis_examples_per_task", "load_in_4bit",
                "load_in_8bit", "routing_eval_steps", "routing_probe_per_task"],
    "CoMoE: the adapter (fields of CoMoEConfig, peft's names; comoe and moe, and lora where LoRA has them)": [],
    "CoMoE: the trainer (fields of CoMoESFTConfig)": ["comoe_router_lr_multiplier", "comoe_contrastive_loss_coef",
                                                      "comoe_router_aux_loss_coef", "comoe_router_z_loss_coef",
                                                      "comoe_expert_load_history"],
    "the trainer (fields of TRL's SFTConfig; defaults are the job's)": [*list(TRAINER_HELP)[:13], "bf16",
                                                                         *list(TRAINER_HELP)[13:]],
}
HELP_EPILOG = (
    "Every other field of TRL's SFTConfig is accepted too, TRL's hub and tracking options included (--report-to "
    "wandb, --run-name, --push-to-hub, --hub-model-id, ...), with TRL's defaults: --help-all lists them all. "
    "Options are spelt with dashes or underscores (--max-steps, --max_steps) and are keys of a --config YAML "
    "file. Precedence, lowest first: the job's defaults, the default preset, the chosen preset, the --config file, "
    "the flags. "
    "docs/cli.md has the details."
)
HELP_WIDTH = 100  # the shipped help text is rendered at this width, whatever the terminal's
TRAIN_HELP_FILE = "train_help.txt"  # beside this module: what the launcher prints for `train --help`


def render_train_help(parser: argparse.ArgumentParser | None = None) -> str:
    """The grouped help of `comoe-peft train` (`HELP_GROUPS`), with the defaults the job uses.

    The launcher prints the copy shipped beside this module (`train_help.txt`, written by `write_train_help`)
    without importing torch or TRL; a test keeps it equal to this rendering.
    """
    from .options import ADAPTER_FIELD_TYPES

    parser = parser or build_train_parser()
    actions = {action.dest: action for action in parser._actions  # each field's own flag, not an alias
               if f"--{action.dest}" in action.option_strings}
    display = argparse.ArgumentParser(
        prog="comoe-peft train", usage="comoe-peft train --output-dir RUN [options]", add_help=False,
        description=f"comoe-peft train: {TRAIN_DESCRIPTION}.", epilog=HELP_EPILOG,
        formatter_class=lambda prog: HelpFormatter(prog, width=HELP_WIDTH, max_help_position=36))
    for title, names in HELP_GROUPS.items():
        group = display.add_argument_group(title)
        if title == "the job":
            group.add_argument("-h", "--help", action="help", help="this help")
            group.add_argument("--help-all", action="store_true", help=_action_help(parser, "help_all"))
        for name in names or list(ADAPTER_FIELD_TYPES):
            add_display_option(group, parser, actions[name])
    return display.format_help()


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter that never breaks a line inside a flag (--no-bf16 stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _action_help(parser: argparse.ArgumentParser, dest: str) -> str:
    """The help text of the parser's action for `dest`."""
    return next(action.help for action in parser._actions if action.dest == dest)


def add_display_option(group: Any, parser: argparse.ArgumentParser, action: argparse.Action) -> None:
    """`action` as `--help` shows it: its dashed flag and aliases, a metavar by type, the job's default."""
    aliases = [alias for alias in parser._actions if alias.dest == action.dest and alias is not action]
    flags = [dashed(action.option_strings)] + [dashed(alias.option_strings) for alias in aliases if alias.nargs != 0]
    switches_off = [dashed(alias.option_strings) for alias in aliases if alias.nargs == 0]  # --no-bf16 and the like
    kind = getattr(action.type, "__name__", "")
    metavar = {"int": "N", "float": "X", "string_to_bool": "[BOOL]"}.get(kind, "TEXT")
    if action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}" if len(action.choices) <= 4 else "NAME"
    metavar = STEP_OPTIONS.get(action.dest, metavar)
    if action.nargs in ("+", "*"):
        metavar = f"{metavar} [...]"
    text = " ".join((action.help or "").replace("%%", "%").split())
    if switches_off:
        text = f"{text} {' or '.join(switches_off)} turns it off."
    if action.dest != "output_dir" and "default" not in text:  # some helps name their default themselves
        text = f"{text} (default: {shown_default(action.default)})"
    group.add_argument(*flags, help=text.replace("%", "%%"), metavar=metavar, default=argparse.SUPPRESS)


STEP_OPTIONS = {"save_steps": "N", "logging_steps": "N", "warmup_steps": "N"}  # floats in TRL, steps in the job


def dashed(option_strings: Sequence[str]) -> str:
    """An option's flag as the help shows it: with dashes where the parser takes them (--max-steps)."""
    return next((f for f in option_strings if "_" not in f), option_strings[0])


def shown_default(value: Any) -> str:
    """A default as the help shows it: none, false / true, a list as its items."""
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def write_train_help() -> Path:
    """Write `render_train_help()` to the shipped `train_help.txt` (run after changing an option or its help)."""
    path = Path(__file__).with_name(TRAIN_HELP_FILE)
    path.write_text(render_train_help(), encoding="utf-8")
    return path


def given_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The options the user gave: the `--config` file's (its `env` mapping is exported, as TRL does), then the
    flags over them; a `RunError` for an unreadable file or a key that is no option."""
    from .options import read_yaml_options
    from .runs import RunError
    from .tasks import close_matches

    argv, config_file = split_config(argv)
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = {str(k).replace("-", "_"): v for k, v in read_yaml_options(config_file).items()}
        except ValueError as error:
            raise RunError(f"{error}; fix --config") from None
        env = values.pop("env", {})
        if not isinstance(env, dict):
            raise RunError(f"'env' in '{config_file}' must be a mapping of environment variables to values")
        os.environ.update({str(k): str(v) for k, v in env.items()})
        actions = {action.dest: action for action in parser._actions if action.type is not None}
        known = {action.dest for action in parser._actions} - {"help", "config"}
        for key, value in values.items():
            if key not in known:
                close = close_matches(key, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "see comoe-peft train --help for the options"
                raise RunError(f"'{config_file}' sets '{key}', which is no option of comoe-peft train; {hint}")
            if key in actions:
                check_config_type(key, value, actions[key], config_file)
    if "--help-all" in argv:
        parser.print_help()  # TRL's whole list, with the job's defaults where it has its own
        sys.exit(0)
    if "-h" in argv or "--help" in argv:
        print(render_train_help(parser), end="")  # grouped; the launcher prints the shipped copy without this
        sys.exit(0)
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS  # the namespace then holds only what was typed
    return values | vars(parser.parse_args(list(argv)))


TYPE_NAMES = {"int": "a whole number", "float": "a number", "string_to_bool": "true or false"}
JOB_TEXT_OPTIONS = ("method", "tasks", "dataset", "model", "preset", "cache_dir")  # read as text by the job


def check_config_type(key: str, value: Any, action: argparse.Action, config_file: str) -> None:
    """Refuse a `--config` value of the wrong type with a one-line type error (a YAML value skips the parser's
    conversion: `max_steps: ten` arrives as the text 'ten', `learning_rate: 5e-4` as the text '5e-4')."""
    from .runs import RunError

    if action.choices is not None and value not in action.choices:
        raise RunError(f"'{config_file}' sets {key}: {value}, which is not one of {', '.join(map(str, action.choices))}")
    kind = getattr(action.type, "__name__", "")
    expected = TYPE_NAMES.get(kind, "text" if key in JOB_TEXT_OPTIONS else None)
    if expected is None or value is None:
        return
    listed = action.nargs in ("+", "*")
    items = value if listed and isinstance(value, list) else [value]
    wrong = next((item for item in items if not _has_type(item, expected)), None)
    if wrong is None and not (listed and not isinstance(value, list) and expected != "text"):
        return
    shown = wrong if wrong is not None else value
    must = f"a list of {expected.removeprefix('a ')}s" if listed else expected
    hint = ""
    if isinstance(shown, str) and expected == "a number" and _float_or_none(shown) is not None:
        hint = f"; YAML reads {shown} as text: write it with a decimal point, e.g. {key}: {float(shown)!r}"
    raise RunError(f"type error in '{config_file}': {key} must be {must}, not {_describe(shown)}{hint}")


def _has_type(value: Any, expected: str) -> bool:
    if expected == "true or false":
        return isinstance(value, bool)
    if expected == "text":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return expected == "a number" or isinstance(value, int)


def _describe(value: Any) -> str:
    """A YAML value as a type error names it: the text 'ten', the number 2.5, a list, a mapping."""
    if isinstance(value, str):
        return f"the text '{value}'"
    if isinstance(value, bool):
        return f"the truth value {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def split_config(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """`argv` without `--config FILE` (or `--config=FILE`), and FILE (None without one)."""
    rest, config = [], None
    items = iter(argv)
    for item in items:
        if item == "--config":
            config = next(items, None)
            if config is None:
                from .runs import RunError

                raise RunError("--config needs a file: --config run.yaml")
        elif item.startswith("--config="):
            config = item.split("=", 1)[1]
        else:
            rest.append(item)
    return rest, config


def parse_train_args(argv: Sequence[str]):
    """The `TrainOptions` of a `comoe-peft train` command line (values unchecked until `TrainOptions.resolved`)."""
    from .jobs import TrainOptions
    from .options import train_options_kwargs

    values = given_values(build_train_parser(), argv)
    return TrainOptions(**({"output_dir": ""} | train_options_kwargs(values)))


def run_train(argv: Sequence[str]) -> None:
    """`comoe-peft train`: fine-tune one method into a new run folder (`comoe_peft.experiments.jobs.train`)."""
    from .jobs import train

    options = parse_train_args(argv)
    folder = train(options)
    print(f"run written to {folder}")


def run_eval(args: argparse.Namespace) -> None:
    """`comoe-peft eval`: score runs with lm-eval (held-out examples or `--tasks`), print one table, a column per
    run."""
    from .evaluation import format_table
    from .jobs import evaluate_run
    from .runs import RunError, open_run

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise RunError("--tasks needs at least one lm-eval task name, e.g. --tasks arc_easy,boolq")
    if args.limit is not None and args.limit < 1:
        raise RunError(f"--limit must be at least 1, got {args.limit}")
    results = {}
    for run in args.runs:
        folder, config = open_run(run)
        name = config["method"] if len(args.runs) == 1 else f"{config['method']} ({folder.name})"
        results[name] = evaluate_run(run, overwrite=args.overwrite, batch_size=args.batch_size, tasks=tasks,
                                     limit=args.limit)
    print(format_table(results))


def run_analyze(args: argparse.Namespace) -> None:
    """`comoe-peft analyze`: write a run's expert-specialisation report and print its summary."""
    from .jobs import analyze_run

    result = analyze_run(args.run, overwrite=args.overwrite, max_examples_per_task=args.max_examples_per_task)
    summary = result.get("summary", {})
    print("\n".join(f"{name}: {value:.4f}" for name, value in summary.items() if isinstance(value, float)))
    print(f"report written to {os.path.join(result['run']['run_dir'], 'analysis')}")


def missing_extra_packages(extra: str = EXTRA) -> list[str]:
    """The distributions that the installed comoe-peft's `extra` requires and that are not installed.

    Read from the installed package's metadata (so it follows pyproject.toml); empty when comoe-peft itself is
    not installed (running from a source tree on PYTHONPATH).
    """
    try:
        requirements = [Requirement(line) for line in importlib.metadata.requires("comoe-peft") or []]
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue
        if requirement.marker.evaluate({"extra": ""}):
            continue  # a core requirement with an environment marker, not this extra's
        try:
            importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement.name)
    return missing


def missing_package_message(packages: Sequence[str]) -> str:
    """The one-line error for missing packages of the experiments extra."""
    return (f"comoe-peft: error: the command needs the {EXTRA} extra, which is not installed (missing: "
            f"{', '.join(packages)}); install it with {EXTRA_HINT}")


@contextmanager
def progress_messages() -> Iterator[None]:
    """Show comoe_peft's INFO log lines (downloads and conversions into the cache) on stderr while the command runs."""
    package_logger = logging.getLogger("comoe_peft")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = package_logger.level
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises `SystemExit(143)` instead of killing the process, so a run's clean-up runs (its staging
    folder is removed; a checkpointed `.RUN.partial/` stays to be resumed)."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """Run a parsed command (`comoe_peft_launcher.main` parses it): `args` from the top-level parser, `rest` the
    arguments of `train`. Returns the exit status: 0, 2 after a one-line error, 130 after Ctrl-C (one line too)."""
    from comoe_peft.tuner.versions import TooOldError

    from .runs import RunError

    handlers = {"train": lambda: run_train(rest), "eval": lambda: run_eval(args), "analyze": lambda: run_analyze(args)}
    try:
        missing = missing_extra_packages()
        if missing:
            print(missing_package_message(missing), file=sys.stderr)
            return EXIT_USAGE
        with stop_on_sigterm(), progress_messages():
            handlers[args.command]()
    except RunError as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(f"comoe-peft: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as error:  # Ctrl-C: one line and the status shells expect, not a traceback
        if args.debug:
            raise
        where = " ".join(str(error).split()) or f"stopped; {INTERRUPTED_NOTHING_STORED[args.command]}"
        after_progress_bar = "\n" if str(error) else ""  # the trainer's bar leaves the cursor at the end of its line
        print(f"{after_progress_bar}comoe-peft {args.command}: {where} (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TooOldError as error:  # e.g. trl older than CoMoESFTTrainer's minimum: the message is one line already
        if args.debug:
            raise
        print(f"comoe-peft: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as error:
        if args.debug or (error.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        print(missing_package_message([error.name.split(".")[0]]), file=sys.stderr)
        return EXIT_USAGE
    return 0

