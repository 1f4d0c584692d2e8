"""The GPU check: CUDA tests and the speed benchmarks on config-built models, in one run of under 8 minutes.

Run it on a machine with a CUDA GPU, in an environment where the CUDA build of torch and this package with its
`test` extra are installed. It needs nothing else: no network, no model weights (every model is built from a
config with random weights; the tests build tiny ones). A box that has only torch, transformers and accelerate
gets the rest as a wheelhouse of a few wheels (`benchmarks/gpu_wheelhouse.py`, docs/benchmarks.md): the check
itself imports no datasets, trl, lm-eval, matplotlib or scipy.

    python benchmarks/gpu_check.py --out-dir benchmarks/results/gpu
    python benchmarks/gpu_check.py --dry-run        # on any machine: the plan, every command checked, nothing run

The dry run imports every step's code without running it: each benchmark parses its arguments with its own parser,
and pytest collects the CUDA tests (`--collect-only`), so a module missing on the box shows up before the GPU time.

Steps, each a subprocess with its own time limit (a step that runs out is stopped and reported, the others go on):

    cuda_tests     pytest -m cuda on the test files that hold CUDA tests (the layer, the lean path, DoRA experts and
                   4-bit / 8-bit bases against their references on the GPU)
    layer_speed    one layer's forward + backward at d=576 and d=2048, fp32 and bf16, against peft LoRA and a loop
    train_step     whole training steps of a config-built Llama (hidden 1024, 8 layers) against peft LoRA
    decode_speed   prefill and decoding at batch 1 and 8 in bf16 for SmolLM2-135M's, Llama-3.2-1B's and
                   Llama-2-7B's shapes (the last two with 8 layers) against peft LoRA
    decode_compiled  the same with torch.compile'd arms (StaticCache) for Llama-3.2-1B's shape with 4 layers

`summary.json` in the output folder names the card, each step's command, exit code and duration, and the
results files the benchmarks wrote (JSON and markdown, like the CPU ones in benchmarks/results/).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS.parent
TESTS = REPOSITORY / "tests"
BUDGET_SECONDS = 8 * 60
# pytest without the repository's addopts (nbval) and without the plugins a box may have installed: the CUDA tests
# need neither, and a box's old plugins could break a newer pytest.
PYTEST = ("-o", "addopts=", "-p", "no:cacheprovider")
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def cuda_test_files() -> tuple[str, ...]:
    """The test files holding CUDA tests (relative to the repository): only these are collected, so the check needs
    none of what the other tests import (trl, datasets, lm-eval, matplotlib)."""
    return tuple(f"tests/{path.name}" for path in sorted(TESTS.glob("test_*.py"))
                 if "@pytest.mark.cuda" in path.read_text())


@dataclass(frozen=True)
class Step:
    """One command of the check: a benchmark script (`module`) with its arguments, or pytest."""

    name: str
    module: str  # "pytest" or a script in benchmarks/
    args: tuple[str, ...]
    limit_seconds: int

    def command(self) -> list[str]:
        if self.module == "pytest":
            return [sys.executable, "-m", "pytest", *self.args]
        return [sys.executable, str(BENCHMARKS / f"{self.module}.py"), *self.args]


def plan(out_dir: Path) -> list[Step]:
    """The check's steps, writing their results into `out_dir`; their limits add up to BUDGET_SECONDS."""

    def outputs(name: str) -> tuple[str, ...]:
        return ("--out", str(out_dir / f"{name}.json"), "--markdown", str(out_dir / f"{name}.md"))

    return [
        Step("cuda_tests", "pytest", ("-m", "cuda", "-q", *PYTEST, *cuda_test_files()), 60),
        Step("layer_speed", "layer_speed", (
            "--device", "cuda", "--shapes", "d576", "d2048", "--tokens", "2048", "8192", "--experts", "8",
            "--dtypes", "fp32", "bf16", "--rounds", "7", *outputs("layer_speed_cuda")), 100),
        Step("train_step", "train_step", (
            "--device", "cuda", "--models", "tiny", "--tiny-hidden", "1024", "--tiny-layers", "8",
            "--tiny-vocab", "32000", "--batch", "8", "--seq", "512", "--rounds", "7", *outputs("train_step_cuda")),
            80),
        Step("decode_speed", "decode_speed", (
            "--device", "cuda", "--dtype", "bfloat16", "--models", "smollm2-shape", "llama-1b-shape",
            "llama-7b-shape", "--shape-layers", "8", "--batches", "1", "8", "--prompt-len", "128",
            "--new-tokens", "64", "--rounds", "5", *outputs("decode_speed_cuda")), 90),
        Step("decode_compiled", "decode_speed", (
            "--device", "cuda", "--dtype", "bfloat16", "--models", "llama-1b-shape", "--shape-layers", "4",
            "--batches", "1", "8", "--prompt-len", "128", "--new-tokens", "64", "--rounds", "5", "--compile",
            *outputs("decode_compiled_cuda")), 150),
    ]


def check_commands(steps: list[Step]) -> None:
    """Parse every benchmark step's arguments with the benchmark's own parser (nothing runs, nothing is built)."""
    sys.path.insert(0, str(BENCHMARKS))
    for step in steps:
        if step.module != "pytest":
            importlib.import_module(step.module).parse_args(list(step.args))


def collect_tests(step: Step) -> int:
    """Collect a pytest step's tests without running them (its modules are imported); the number selected."""
    command = [*step.command(), "--collect-only"]
    completed = subprocess.run(command, cwd=REPOSITORY, env={**os.environ, **PYTEST_ENV}, capture_output=True,
                               text=True)
    if completed.returncode != 0:
        raise SystemExit(f"gpu_check: pytest could not collect the {step.name} step's tests "
                         f"(exit {completed.returncode}):\n{completed.stdout[-3000:]}{completed.stderr[-2000:]}")
    return sum(1 for line in completed.stdout.splitlines() if "::" in line)


def run_step(step: Step) -> dict:
    began = time.perf_counter()
    try:
        completed = subprocess.run(step.command(), cwd=REPOSITORY, env={**os.environ, **PYTEST_ENV},
                                   timeout=step.limit_seconds)
        code = completed.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.perf_counter() - began
    print(f"[gpu_check] {step.name}: exit {code} after {seconds:.0f} s", flush=True)
    return {"name": step.name, "command": step.command(), "exit": code, "seconds": round(seconds, 1)}


def device_summary() -> dict:
    import torch

    properties = torch.cuda.get_device_properties(0)
    return {
        "card": torch.cuda.get_device_name(0),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "capability": f"{properties.major}.{properties.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="benchmarks/results/gpu", help="where the results files go")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the steps, check their arguments and collect the CUDA tests; run nothing (works "
                             "without a GPU)")
    parser.add_argument("--only", nargs="+", choices=[step.name for step in plan(Path("."))],
                        help="run only these steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = (REPOSITORY / args.out_dir).resolve() if not Path(args.out_dir).is_absolute() else Path(args.out_dir)
    steps = [step for step in plan(out_dir) if args.only is None or step.name in args.only]
    check_commands(steps)
    total = sum(step.limit_seconds for step in steps)
    for step in steps:
        print(f"[gpu_check] {step.name} (limit {step.limit_seconds} s): {' '.join(step.command())}")
    print(f"[gpu_check] {len(steps)} steps, at most {total} s; results in {out_dir}")
    if args.dry_run:
        collected = {step.name: collect_tests(step) for step in steps if step.module == "pytest"}
        for name, count in collected.items():
            print(f"[gpu_check] {name}: pytest collects {count} tests (they skip without a GPU)")
        print("[gpu_check] dry run: every step's modules import and its arguments parse; nothing was run")
        return {"dry_run": True, "steps": [step.command() for step in steps], "limit_seconds": total,
                "collected": collected}
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU is visible to torch; use --dry-run to check the plan on a CPU.")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"device": device_summary(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": []}
    for step in steps:
        summary["steps"].append(run_step(step))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # after each step: nothing is lost
    summary["results_files"] = sorted(path.name for path in out_dir.glob("*_cuda.*"))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [step["name"] for step in summary["steps"] if step["exit"] != 0]
    print(f"[gpu_check] done on {summary['device']['card']}; failed: {failed or 'none'}")
    if failed:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
