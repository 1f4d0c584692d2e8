"""`comoe-peft`: train, evaluate and analyse CoMoE against MoE-LoRA and LoRA from the command line.

```text
comoe-peft train [--method M] [--tasks T] [--model P] [--dataset D] [--preset quick] [--seed S] --output-dir RUN
comoe-peft train --save-steps 50 ... --output-dir RUN    # checkpoints; the same command again resumes a stopped run
comoe-peft train --method base ... --output-dir RUN      # the zero-shot base model: the split, no adapter
comoe-peft eval RUN [RUN ...]                            # lm-evaluation-harness on the run's held-out examples
comoe-peft eval RUN --tasks arc_easy,boolq               # lm-eval's own tasks (data in the local HF cache)
comoe-peft analyze RUN
```

Errors in the user's input (a missing model, an unknown task, a dataset with the wrong columns, a folder that
cannot be written, a run of the wrong method) print one line and exit with status 2; so does a missing package of
the `experiments` extra (the library install alone does not bring them). Downloads and conversions into the cache
are announced on stderr before they start and when they are done.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from packaging.requirements import Requirement

EXIT_USAGE = 2
EXTRA = "experiments"
EXTRA_HINT = f'pip install "comoe-peft[{EXTRA}]" (in a clone: pip install -e ".[{EXTRA}]")'
EXTRA_MODULES = frozenset({"matplotlib", "scipy", "tqdm", "gguf", "lm_eval"})  # what the experiments extra brings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `comoe-peft` (also used to document the command)."""
    from .jobs import METHODS, PRESETS

    parser = argparse.ArgumentParser(prog="comoe-peft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="multi-task fine-tuning of one method into a run folder")
    train.add_argument("--output-dir", required=True, help="run folder to create")
    train.add_argument("--method", choices=METHODS, default="comoe",
                       help="comoe (default), moe = the same experts without the contrastive term, lora = "
                            "peft LoRA with as many trainable parameters, or base = no adapter and no training (the "
                            "zero-shot base model, scored by eval on the same held-out split)")
    train.add_argument("--tasks", default="default",
                       help="comma-separated tasks, e.g. bigbench:navigate,synthetic:arithmetic,benchmark:arc-e "
                            "('default' = the built-in mixture; benchmark:* reads the paper's benchmarks from the "
                            "local Hugging Face cache)")
    train.add_argument("--dataset", help="your own examples instead of --tasks: JSON/JSONL/Parquet files, a folder "
                                         "saved with datasets, or a cached hub dataset (columns task, prompt, "
                                         "choices, answer)")
    train.add_argument("--model", help="local model folder or cached hub id (default: SmolLM2-135M-Instruct)")
    train.add_argument("--preset", choices=sorted(PRESETS), default="default",
                       help="quick: a smoke run (about 35 s of training on 2 CPU cores); default: about 9 minutes of training")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.add_argument("--cache-dir", help="where the model and task files are cached (default ~/.cache/comoe_peft)")
    train.add_argument("--num-experts", type=int, default=4)
    train.add_argument("--top-k", type=int, default=2)
    train.add_argument("--rank", type=int, default=16, help="rank r of each expert")
    train.add_argument("--contrastive-loss-coef", type=float, default=0.01, help="lambda (comoe only)")
    train.add_argument("--contrastive-temperature", type=float, default=0.1, help="tau (comoe only)")
    # not an argparse exclusive group: both flags at once get the command's one-line error (TrainOptions checks it)
    train.add_argument("--load-in-4bit", action="store_true",
                       help="QLoRA: load the base model in 4-bit nf4 with bitsandbytes (pip install bitsandbytes)")
    train.add_argument("--load-in-8bit", action="store_true",
                       help="load the base model in 8-bit (LLM.int8()) with bitsandbytes")
    train.add_argument("--save-steps", type=int,
                       help="checkpoint every N steps (in .RUN.partial/ beside the run folder); started again with "
                            "the same options after a stop, the run resumes from its last checkpoint")
    train.add_argument("--routing-eval-steps", type=int, nargs="+", default=[], metavar="STEP",
                       help="comoe / moe: after these steps, measure routing entropy and the JS divergence between "
                            "tasks on a few held-out examples per task (RUN/routing_history.json)")
    train.add_argument("--router-lr-multiplier", type=float, default=1.0,
                       help="comoe / moe: the routers learn at this times the learning rate (default 1)")
    train.add_argument("--padding-free", action="store_true",
                       help="padding-free batches: each batch flattened into one row of its examples, no pad tokens "
                            "(training examples are then not cut at --max-length)")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 mixed precision (autocast; on a CPU worth it only with bf16 units: AVX512-BF16 or "
                            "AMX); default: on for GPUs that support it, off on CPUs")
    for name, kind in [("max-steps", int), ("batch-size", int), ("max-length", int), ("learning-rate", float),
                       ("max-train-per-task", int), ("test-size", int)]:
        train.add_argument(f"--{name}", type=kind, help="overrides the preset")

    evaluate = commands.add_parser("eval", help="per-task accuracy of runs, scored by lm-evaluation-harness")
    evaluate.add_argument("runs", nargs="+", help="run folders written by `comoe-peft train`")
    evaluate.add_argument("--tasks", help="comma-separated lm-eval task names (arc_easy, boolq, ...; their data must "
                                          "be in the local Hugging Face cache) instead of the run's held-out examples")
    evaluate.add_argument("--limit", type=int, help="at most this many examples per task (results not stored)")
    evaluate.add_argument("--overwrite", action="store_true", help="recompute stored results")
    evaluate.add_argument("--batch-size", type=int, default=16)

    analyze = commands.add_parser("analyze", help="expert-specialisation report of a comoe or moe run")
    analyze.add_argument("run", help="run folder written by `comoe-peft train`")
    analyze.add_argument("--overwrite", action="store_true", help="redo an existing analysis")
    analyze.add_argument("--max-examples-per-task", type=int)
    return parser


def run_train(args: argparse.Namespace) -> None:
    """`comoe-peft train`: fine-tune one method into a new run folder (`comoe_peft.experiments.jobs.train`)."""
    from .jobs import TrainOptions, train

    options = TrainOptions(
        output_dir=args.output_dir, method=args.method, tasks=args.tasks, dataset=args.dataset, model=args.model,
        preset=args.preset, seed=args.seed, overwrite=args.overwrite, cache_dir=args.cache_dir,
        num_experts=args.num_experts, top_k=args.top_k, rank=args.rank,
        contrastive_loss_coef=args.contrastive_loss_coef, contrastive_temperature=args.contrastive_temperature,
        max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length,
        learning_rate=args.learning_rate, max_train_per_task=args.max_train_per_task, test_size=args.test_size,
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, save_steps=args.save_steps,
        bf16=args.bf16, routing_eval_steps=args.routing_eval_steps, router_lr_multiplier=args.router_lr_multiplier,
        padding_free=args.padding_free,
    )
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


@contextlib.contextmanager
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `comoe-peft` console script and of `python -m comoe_peft`."""
    from .runs import RunError

    args = build_parser().parse_args(argv)
    handlers = {"train": run_train, "eval": run_eval, "analyze": run_analyze}
    try:
        missing = missing_extra_packages()
        if missing:
            print(missing_package_message(missing), file=sys.stderr)
            return EXIT_USAGE
        with progress_messages():
            handlers[args.command](args)
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


if __name__ == "__main__":
    sys.exit(main())
