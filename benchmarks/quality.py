"""Quality of CoMoE against MoE-LoRA (no contrastive term) and LoRA (matched parameters), over several seeds.

Each (method, seed) is one `comoe-peft train` run on the same task mixture and seed-dependent split, scored on its
held-out examples, and (for the expert methods) analysed. The report gives per-task accuracy (mean and spread
over seeds), the paired difference CoMoE minus MoE-LoRA per seed with its 95% t-interval, the specialisation
metrics, and optional sweeps of lambda and tau for CoMoE. Finished runs are reused, so the script can be resumed.

    python benchmarks/quality.py --seeds 0 1 2 --test-size 400 --out-dir benchmarks/results/quality
    python benchmarks/quality.py --quick        # a smoke run on two synthetic tasks (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from comoe_peft.files import write_text_atomic
from comoe_peft.jobs import TrainOptions, analyze_run, evaluate_run, train
from comoe_peft.runs import RUN_CONFIG, write_json

T_CRITICAL_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", help="default: benchmarks/results/quality (quality_quick with --quick)")
    parser.add_argument("--methods", nargs="+", default=["comoe", "moe", "lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", default="default")
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--test-size", type=int, default=400, help="held-out examples per task")
    parser.add_argument("--max-train-per-task", type=int)
    parser.add_argument("--lambdas", nargs="*", type=float, default=[], help="CoMoE lambda sweep (seed 0)")
    parser.add_argument("--temperatures", nargs="*", type=float, default=[], help="CoMoE tau sweep (seed 0)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 2 synthetic tasks, 2 seeds, 4 steps")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already trained and evaluated; skip (and list) the rest")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.preset, args.test_size = "synthetic:arithmetic,synthetic:parity", "quick", 8
        args.max_steps = args.max_steps or 4
        args.seeds, args.max_train_per_task = args.seeds[:2] if len(args.seeds) >= 2 else [0, 1], 32
    if args.out_dir is None:
        args.out_dir = "benchmarks/results/quality_quick" if args.quick else "benchmarks/results/quality"
    return args


def check_reused_run(args: argparse.Namespace, run_dir: Path, method: str, seed: int, overrides: dict) -> None:
    """Refuse to reuse a finished run that was trained with other settings than the ones asked for now."""
    stored = json.loads((run_dir / RUN_CONFIG).read_text())["options"]
    wanted = {"method": method, "seed": seed, "tasks": args.tasks, "preset": args.preset, "model": args.model,
              "max_steps": args.max_steps, "test_size": args.test_size,
              "max_train_per_task": args.max_train_per_task} | overrides
    differ = {k: (stored.get(k), v) for k, v in wanted.items() if v is not None and stored.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise SystemExit(f"{run_dir} holds a run made with other settings ({details}); give another --out-dir, "
                         "or delete that run to train it again")


def run_one(args: argparse.Namespace, name: str, method: str, seed: int, **overrides: Any) -> dict[str, Any] | None:
    """Train (unless already done), evaluate and analyse one run; return its results (None if `--report-only` and
    the run is not finished)."""
    run_dir = Path(args.out_dir) / "runs" / name
    if args.report_only and not (run_dir / "eval_results.json").is_file():
        print(f"not finished, left out of the report: {name}")
        return None
    if (run_dir / RUN_CONFIG).is_file():
        check_reused_run(args, run_dir, method, seed, overrides)
    else:
        options = TrainOptions(output_dir=str(run_dir), method=method, tasks=args.tasks, model=args.model,
                               preset=args.preset, seed=seed, max_steps=args.max_steps, test_size=args.test_size,
                               max_train_per_task=args.max_train_per_task, overwrite=True, **overrides)
        train(options)
    result = {"name": name, "method": method, "seed": seed, "overrides": overrides,
              "accuracy": evaluate_run(str(run_dir))}
    config = json.loads((run_dir / RUN_CONFIG).read_text())
    result["options"] = config["options"]
    result["trainable_parameters"] = config["trainable_parameters"]
    result["train_runtime_s"] = config["train_runtime_s"]
    if method in ("comoe", "moe"):
        analysis_file = run_dir / "analysis" / "analysis.json"
        if analysis_file.is_file():
            result["specialisation"] = json.loads(analysis_file.read_text())["summary"]
        elif not args.report_only:
            result["specialisation"] = analyze_run(str(run_dir))["summary"]
    return result


def mean_and_interval(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the half-width of the 95% t-interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "std": float("nan"), "ci95": float("nan"), "n": n}
    std = statistics.stdev(values)
    return {"mean": mean, "std": std, "ci95": T_CRITICAL_95.get(n - 1, 1.96) * std / math.sqrt(n), "n": n}


def summarise(results: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per-method, per-task accuracy over seeds and the paired CoMoE - MoE difference."""
    main = [r for r in results if not r["overrides"]]
    tasks = sorted({t for r in main for t in r["accuracy"] if t != "overall"}) + ["overall"]
    table = {m: {t: mean_and_interval([r["accuracy"][t]["accuracy"] for r in main if r["method"] == m])
                 for t in tasks} for m in methods if any(r["method"] == m for r in main)}
    paired = {}
    if "comoe" in table and "moe" in table:
        by_seed = {(r["method"], r["seed"]): r for r in main}
        seeds = sorted({s for (m, s) in by_seed if m == "comoe"} & {s for (m, s) in by_seed if m == "moe"})
        for task in tasks:
            diffs = [by_seed[("comoe", s)]["accuracy"][task]["accuracy"] - by_seed[("moe", s)]["accuracy"][task]
                     ["accuracy"] for s in seeds]
            paired[task] = mean_and_interval(diffs) | {"per_seed": diffs}
    specialisation = {}
    for m in ("comoe", "moe"):
        rows = [r["specialisation"] for r in main if r["method"] == m and r.get("specialisation")]
        if rows:
            keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
            specialisation[m] = {k: mean_and_interval([row[k] for row in rows]) for k in keys}
    runtimes = {m: statistics.fmean([r["train_runtime_s"] for r in main if r["method"] == m and r["train_runtime_s"]])
                for m in table}
    return {"tasks": tasks, "accuracy": table, "paired_comoe_minus_moe": paired, "specialisation": specialisation,
            "train_runtime_s": runtimes}


def markdown(summary: dict[str, Any], sweeps: list[dict[str, Any]], args: argparse.Namespace, seconds: float,
             references: list[dict[str, Any]] | None = None) -> str:
    """The report: accuracy table, paired difference, specialisation, sweeps, and how it was produced."""
    methods = list(summary["accuracy"])
    lines = ["# Quality: CoMoE vs MoE-LoRA vs LoRA", "",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()} CPU, Python {platform.python_version()}; this invocation {seconds / 60:.1f} "
             f"min (finished runs are reused); seeds {args.seeds}; tasks `{args.tasks}`; preset `{args.preset}`; "
             f"max steps {args.max_steps or 'preset'}; held-out {args.test_size} per task.",
             "", "Training time per run (trainer's train_runtime, seconds): " + ", ".join(
                 f"{m} {summary['train_runtime_s'][m]:.0f}" for m in summary["train_runtime_s"]),
             "", "## Accuracy (mean ± std over seeds)", "", "| task | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for task in summary["tasks"]:
        cells = [f"{summary['accuracy'][m][task]['mean']:.3f} ± {summary['accuracy'][m][task]['std']:.3f}"
                 for m in methods]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if summary["paired_comoe_minus_moe"]:
        lines += ["", "## Paired difference CoMoE − MoE-LoRA (same seed and split)", "",
                  "| task | mean | 95% CI | per seed |", "|---|---|---|---|"]
        for task, d in summary["paired_comoe_minus_moe"].items():
            per_seed = ", ".join(f"{v:+.3f}" for v in d["per_seed"])
            lines.append(f"| {task} | {d['mean']:+.3f} | ± {d['ci95']:.3f} | {per_seed} |")
    for method, metrics in summary["specialisation"].items():
        lines += ["", f"## Specialisation: {method} (mean over seeds)", "", "| metric | mean | std |", "|---|---|---|"]
        lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in metrics.items()]
    if sweeps:
        lines += ["", "## CoMoE sweeps (seed 0)", "",
                  "lambda = 0 is MoE-LoRA; the main CoMoE run of seed 0 is given as a reference row.", "",
                  "| run | lambda | tau | overall accuracy | held-out contrastive loss | mean pairwise cosine |",
                  "|---|---|---|---|---|---|"]
        for r in sweep_rows(references or [], sweeps):
            spec = r.get("specialisation", {})
            lines.append(f"| {r['name']} | {r['lambda']:g} | {r['tau']:g} | {r['accuracy']['overall']['accuracy']:.3f} | "
                         f"{spec.get('contrastive_loss', float('nan')):.3f} | "
                         f"{spec.get('mean_pairwise_cosine', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def sweep_rows(references: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep runs plus the seed-0 MoE (lambda = 0) and CoMoE (default lambda and tau) runs, by lambda then tau."""
    rows = []
    for r in references + sweeps:
        options = r.get("options", {})
        lam = 0.0 if r["method"] == "moe" else options.get("contrastive_loss_coef", float("nan"))
        rows.append(r | {"lambda": lam, "tau": options.get("contrastive_temperature", float("nan"))})
    return sorted(rows, key=lambda r: (r["lambda"], r["tau"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    results = [run_one(args, f"{m}-s{s}", m, s) for s in args.seeds for m in args.methods]
    sweeps = [run_one(args, f"comoe-lambda{v:g}", "comoe", 0, contrastive_loss_coef=v) for v in args.lambdas]
    sweeps += [run_one(args, f"comoe-tau{v:g}", "comoe", 0, contrastive_temperature=v) for v in args.temperatures]
    results, sweeps = [r for r in results if r], [r for r in sweeps if r]
    summary = summarise(results, args.methods)
    references = [r for r in results if r["seed"] == 0 and r["method"] in ("comoe", "moe")] if sweeps else []
    out = Path(args.out_dir)
    report = {"args": vars(args), "results": results, "sweeps": sweeps, "summary": summary,
              "wall_time_s": time.time() - started}
    write_json(out / "quality.json", report)
    write_text_atomic(out / "quality.md", markdown(summary, sweeps, args, report["wall_time_s"], references))
    print((out / "quality.md").read_text(encoding="utf-8"))
    return report


if __name__ == "__main__":
    main()
