"""Evaluation of one run folder by the old hand-written scorer and by lm-evaluation-harness: accuracy per task, time.

Both scorers see the same model (loaded once: the run's base model with its adapter, eval mode), the same held-out
examples (the first `--max-per-task` of each task) and the same prompts; they run in one process on one thread,
interleaved round by round (the order alternates), timed in wall-clock and process CPU seconds.

```text
python benchmarks/eval_compare.py RUN [--max-per-task 50] [--rounds 2] [--batch-size 16] \
    [--out benchmarks/results/eval_compare_cpu.json] [--markdown benchmarks/results/eval_compare_cpu.md]
```

The old scorer (`comoe_peft.experiments.evaluation.evaluate`, 459 lines) was removed after this comparison; run
the script at the commit recorded in the report (`meta.commit`) to repeat it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import load_from_disk

from comoe_peft.experiments.data import format_prompt
from comoe_peft.experiments.jobs import load_run_model
from comoe_peft.experiments.lm_eval_tasks import evaluate_examples
from comoe_peft.experiments.runs import TEST_DATA_DIR, open_run
from comoe_peft.tuner.files import write_json_atomic


def capped_rows(run: Path, max_per_task: int | None) -> list[dict[str, Any]]:
    """The run's held-out rows, the first `max_per_task` of each task (all with None)."""
    rows, seen = [], defaultdict(int)
    for row in load_from_disk(str(run / TEST_DATA_DIR)):
        if max_per_task is None or seen[row["task"]] < max_per_task:
            rows.append(dict(row))
            seen[row["task"]] += 1
    return rows


def old_scorer(model, tokenizer, rows, batch_size: int, folder: Path) -> dict:
    from comoe_peft.experiments.evaluation import evaluate  # the hand-written scorer (removed after this study)

    return evaluate(model, tokenizer, rows, format_prompt, batch_size=batch_size, progress=False)


def lm_eval_scorer(model, tokenizer, rows, batch_size: int, folder: Path) -> dict:
    return evaluate_examples(model, tokenizer, rows, folder, batch_size=batch_size)


SCORERS = {"old": old_scorer, "lm_eval": lm_eval_scorer}


def timed(fn, *args) -> tuple[dict, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run both scorers `args.rounds` times, interleaved; per-task accuracy and the time of each round."""
    torch.set_num_threads(1)
    started = meta(args)  # the commit of the code that runs, read before anything else can change it
    folder, config = open_run(args.run)
    model, tokenizer = load_run_model(folder, config)
    rows = capped_rows(folder, args.max_per_task)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in SCORERS}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = list(SCORERS) if round_ % 2 == 0 else list(reversed(SCORERS))
            for name in order:
                result, wall, cpu = timed(SCORERS[name], model, tokenizer, rows, args.batch_size, Path(scratch))
                if name in results and results[name] != result:
                    raise RuntimeError(f"{name} gave different results in round {round_}")
                results[name] = result
                times[name].append({"wall_s": wall, "cpu_s": cpu})
                print(f"round {round_}: {name} {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return {"run": str(folder), "method": config["method"], "model_path": config["model_path"],
            "examples": len(rows), "max_per_task": args.max_per_task, "batch_size": args.batch_size,
            "results": results, "times": times, "ratio": ratios(times),
            "meta": started | {"load_average": os.getloadavg(), "date_end": time.strftime("%Y-%m-%dT%H:%M:%S")}}


def ratios(times: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Median over rounds of lm-eval's time over the old scorer's, wall-clock and CPU."""
    return {key: statistics.median(new[key] / old[key] for new, old in zip(times["lm_eval"], times["old"]))
            for key in ("wall_s", "cpu_s")}


def meta(args: argparse.Namespace) -> dict[str, Any]:
    import lm_eval
    import peft
    import transformers

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"command": "python benchmarks/eval_compare.py " + " ".join(args.argv), "commit": commit,
            "commit_dirty": bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                capture_output=True, text=True, cwd=Path(__file__).parent).stdout),
            "device_name": f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()})", "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"), "python": platform.python_version(),
            "timer": "time.perf_counter (wall) and time.process_time (CPU)", "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def markdown(report: dict[str, Any]) -> str:
    """The per-task accuracy of both scorers and the time table."""
    old, new = report["results"]["old"], report["results"]["lm_eval"]
    lines = [f"Run `{report['run']}` (method {report['method']}), {report['examples']} held-out examples "
             f"(at most {report['max_per_task']} per task), batch size {report['batch_size']}.", "",
             "| task | kind | n | old scorer | lm-eval | equal |", "|---|---|---|---|---|---|"]
    for task in old:
        equal = "yes" if abs(old[task]["accuracy"] - new[task]["accuracy"]) < 1e-9 else "**no**"
        lines.append(f"| {task} | {old[task]['kind']} | {old[task]['n']} | {old[task]['accuracy']:.3f} "
                     f"| {new[task]['accuracy']:.3f} | {equal} |")
    lines += ["", "| round | old wall s | old CPU s | lm-eval wall s | lm-eval CPU s |", "|---|---|---|---|---|"]
    for i, (o, n) in enumerate(zip(report["times"]["old"], report["times"]["lm_eval"])):
        lines.append(f"| {i} | {o['wall_s']:.1f} | {o['cpu_s']:.1f} | {n['wall_s']:.1f} | {n['cpu_s']:.1f} |")
    m = report["meta"]
    lines += ["", f"lm-eval / old (median over rounds): wall {report['ratio']['wall_s']:.2f}x, "
              f"CPU {report['ratio']['cpu_s']:.2f}x.", "",
              f"Command: `{m['command']}` at commit {m['commit'][:10]}; {m['device_name']}, {m['cores']} cores "
              f"(shared), {m['threads']} thread, load average {m['load_average'][0]:.1f} at the end; torch "
              f"{m['torch']}, transformers {m['transformers']}, peft {m['peft']}, lm-eval {m['lm_eval']}; {m['date']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder written by `comoe-peft train`")
    parser.add_argument("--max-per-task", type=int, default=50, help="held-out examples per task (0: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="JSON report to write")
    parser.add_argument("--markdown", help="markdown table to write")
    args = parser.parse_args(argv)
    args.max_per_task = args.max_per_task or None
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = compare(args)
    table = markdown(report)
    print(table)
    if args.out:
        write_json_atomic(args.out, report)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
