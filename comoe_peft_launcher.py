"""The `comoe-peft` command's entry point (`main`, also for Python callers) and top-level parser, outside the `comoe_peft` package on purpose.

Importing anything in `comoe_peft` imports peft and torch (the package registers its peft type on import: several
seconds of CPU), so `comoe-peft --help`, a mistyped subcommand or a bad `eval` / `analyze` flag are answered from
here without that import. The commands themselves live in `comoe_peft.experiments.cli`; this module also keeps the
libraries' import-time noise (deprecation warnings, bitsandbytes' note that an optional CPU kernel is not
installed) out of the command's output. The library itself silences nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

EXIT_USAGE = 2
TRAIN_HELP_FILE = "train_help.txt"  # comoe_peft.experiments.cli.TRAIN_HELP_FILE (kept equal by a test)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
DESCRIPTION = "`comoe-peft`: train, evaluate and analyse CoMoE against MoE-LoRA and LoRA from the command line."
TRAIN_HELP = "multi-task fine-tuning of one method into a run folder (comoe-peft train --help: every option)"
LIBRARIES = r"(transformers|trl|peft|accelerate|datasets|bitsandbytes)(\.|$)"
# bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional `kernels` package is missing; its
# fallback kernel works, so the line only alarms the command's users.
BNB_OPTIONAL_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`comoe-peft: error: ...`, exit 2) without the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"comoe-peft: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_USAGE)



def build_parser() -> argparse.ArgumentParser:
    """The top-level parser of `comoe-peft` and of `eval` / `analyze` (it imports nothing heavy: no torch, no
    TRL); `train`'s options are parsed by `build_train_parser`."""
    parser = OneLineParser(prog="comoe-peft", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help=TRAIN_HELP, add_help=False)

    evaluate = commands.add_parser("eval", help="per-task accuracy of runs, scored by lm-evaluation-harness")
    evaluate.add_argument("runs", nargs="+", help="run folders written by `comoe-peft train`")
    evaluate.add_argument("--tasks", help="comma-separated lm-eval task names (arc_easy, boolq, ...; their data must "
                                          "be in the local Hugging Face cache) instead of the run's held-out examples")
    evaluate.add_argument("--limit", type=int, help="at most this many examples per task (results not stored)")
    evaluate.add_argument("--overwrite", action="store_true", help="recompute stored results")
    evaluate.add_argument("--batch-size", type=positive_int, default=16)

    analyze = commands.add_parser("analyze", help="expert-specialisation report of a comoe or moe run")
    analyze.add_argument("run", help="run folder written by `comoe-peft train`")
    analyze.add_argument("--overwrite", action="store_true", help="redo an existing analysis")
    analyze.add_argument("--max-examples-per-task", type=positive_int)
    return parser



def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text})")
    return value



def split_command(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The top-level arguments of a command line, and for `train` the rest, which `parse_train_args` reads."""
    argv = list(argv)
    command_at = next((i for i, item in enumerate(argv) if not item.startswith("-")), len(argv))
    rest: list[str] = []
    if argv[command_at:command_at + 1] == ["train"]:
        argv, rest = argv[:command_at + 1], argv[command_at + 1:]
    return build_parser().parse_args(argv), rest



class _SkipOptionalKernelNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """While a command runs (its imports included), no deprecation warnings of the libraries (FutureWarning /
    DeprecationWarning raised in transformers, trl, peft, ...: they are for the library's own callers, not the
    command's users) and no bitsandbytes note on its optional CPU kernel. The library itself silences nothing."""
    note_filter = _SkipOptionalKernelNote()
    bnb_logger = logging.getLogger(BNB_OPTIONAL_KERNEL_LOGGER)
    bnb_logger.addFilter(note_filter)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
            yield
    finally:
        bnb_logger.removeFilter(note_filter)


def shipped_train_help() -> str | None:
    """The help of `comoe-peft train` as shipped with the package (`comoe_peft/experiments/train_help.txt`), read
    without importing the package; None if it is not there (then the command renders it, more slowly)."""
    spec = importlib.util.find_spec("comoe_peft")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "experiments", TRAIN_HELP_FILE)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """The `comoe-peft` console script: answer help and usage errors here, run the command in
    `comoe_peft.experiments.cli`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = split_command(argv)  # --help, an unknown subcommand, a bad eval/analyze flag: answered here
    if args.command == "train" and ("-h" in rest or "--help" in rest) and "--help-all" not in rest:
        help_text = shipped_train_help()
        if help_text is not None:
            print(help_text, end="")
            return 0
    try:
        with quiet_libraries():
            from comoe_peft.experiments.cli import run

            return run(args, rest)  # a Ctrl-C while the command runs is answered there, with what was kept
    except KeyboardInterrupt:  # while the libraries load, before the command started
        if args.debug:
            raise
        print(f"comoe-peft {args.command}: stopped while loading, before the command started (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


def parse_command(argv: Sequence[str]) -> object:
    """A whole command line parsed without running it (for the documentation's checks): the `TrainOptions` of a
    `train`, else the argparse namespace. Errors raise SystemExit (the parser's) or `RunError`."""
    args, rest = split_command(argv)
    if args.command != "train":
        return args
    from comoe_peft.experiments.cli import parse_train_args

    return parse_train_args(rest)


if __name__ == "__main__":
    sys.exit(main())
