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
key of a `--config` YAML file. Precedence, lowest first: the job's defaults, the preset (`--preset NAME`, a YAML
file shipped in `comoe_peft/experiments/presets/`), the `--config` file, the flags.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from packaging.requirements import Requirement

EXIT_USAGE = 2
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

    from .options import TRAINER_ALIASES, ScriptArguments, adapter_arguments, load_preset

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
    actions["bf16"].help = ("bf16 mixed precision (autocast); default: on for GPUs that support it, off on CPUs "
                            "(on a CPU worth it only with AVX512-BF16 or AMX)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, help="same as --bf16 false")
    actions["output_dir"].help = "The run folder to create (required)."
    parser.set_defaults_with_config(**load_preset("default"), seed=0)
    return parser


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
        known = {action.dest for action in parser._actions} - {"help", "config"}
        for key in values:
            if key not in known:
                close = close_matches(key, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "see comoe-peft train --help for the options"
                raise RunError(f"'{config_file}' sets '{key}', which is no option of comoe-peft train; {hint}")
    if "-h" in argv or "--help" in argv:
        parser.parse_args(list(argv))  # the help, with the defaults of the job and the default preset; exits
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS  # the namespace then holds only what was typed
    return values | vars(parser.parse_args(list(argv)))


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
    arguments of `train`. Returns the exit status: 0, or 2 after a one-line error."""
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
    except ModuleNotFoundError as error:
        if args.debug or (error.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        print(missing_package_message([error.name.split(".")[0]]), file=sys.stderr)
        return EXIT_USAGE
    return 0

