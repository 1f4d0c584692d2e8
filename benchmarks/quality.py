"""Quality of CoMoE against MoE-LoRA (no contrastive term), LoRA (matched parameters) and the base model, over seeds.

Each (method, seed) is one `comoe-peft train` run on the same task mixture and seed-dependent split (`base`: no
adapter, no training, the zero-shot base model), scored on its held-out examples, and (for the expert methods)
analysed, with the routing entropy and JS divergence between tasks measured at a few points during training. The
report gives per-task accuracy (mean and spread over seeds), the paired difference CoMoE minus MoE-LoRA per seed
with its 95% t-interval, the specialisation metrics, the routing over training, optional sweeps of lambda, tau and
N for CoMoE, and two plots.

Runs survive a stop: each checkpoints every `--save-steps` steps, and the same command started again resumes the
unfinished run from its last checkpoint and reuses the finished ones. Each finished run's small results (no
adapter, no data) are written at once to `OUT/results/NAME.json`, which can be committed; the run folders
(`OUT/runs/`) stay out of git.

    python benchmarks/quality.py --seeds 0 1 2 --test-size 400 --max-steps 600 --lambdas 0.001 0.1 1.0 --num-experts-sweep 8
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

from scipy import stats

from comoe_peft.tuner.files import write_text_atomic
from comoe_peft.experiments.jobs import EXPERT_METHODS, PRESETS, TrainOptions, analyze_run, evaluate_run, train
from comoe_peft.experiments.runs import ROUTING_HISTORY, RUN_CONFIG, RunError, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", help="default: benchmarks/results/quality_v2 (quality_quick with --quick)")
    parser.add_argument("--methods", nargs="+", default=["base", "comoe", "moe", "lora"],
                        choices=["base", "comoe", "moe", "lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", default="default")
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--learning-rate", type=float, help="overrides the preset (the pilot chooses it)")
    parser.add_argument("--batch-size", type=int, help="overrides the preset")
    parser.add_argument("--test-size", type=int, default=400, help="held-out examples per task")
    parser.add_argument("--max-train-per-task", type=int)
    parser.add_argument("--lambdas", nargs="*", type=float, default=[], help="CoMoE lambda sweep (seed 0)")
    parser.add_argument("--temperatures", nargs="*", type=float, default=[], help="CoMoE tau sweep (seed 0)")
    parser.add_argument("--num-experts-sweep", nargs="*", type=int, default=[], metavar="N",
                        help="CoMoE runs with N experts (seed 0)")
    parser.add_argument("--target-modules", nargs="+", metavar="MODULE",
                        help="where comoe and moe put their experts (default: the job's, the attention projections); "
                             "`mlp` makes routed FFN-block experts")
    parser.add_argument("--lora-target-modules", nargs="+", metavar="MODULE",
                        help="where lora goes, at matched parameters (default: --target-modules)")
    parser.add_argument("--placement-pair", nargs="+", metavar="MODULE",
                        help="extra seed-0 runs of comoe and moe with per-linear experts on these modules (the "
                             "paper's Table 6: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")
    parser.add_argument("--router-lr-multipliers", nargs="*", type=float, default=[], metavar="M",
                        help="extra arms: comoe and moe on every seed with the routers at M times the learning rate")
    parser.add_argument("--save-steps", type=int, default=25,
                        help="checkpoint interval of every run; a stopped study resumes from the last checkpoints")
    parser.add_argument("--routing-points", type=int, default=4,
                        help="comoe / moe: measure routing entropy and JS between tasks at this many evenly spaced "
                             "steps of training (0: none)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with AVX512-BF16 / AMX units)")
    parser.add_argument("--padding-free", action="store_true", help="padding-free batches (TRL's padding_free)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 2 synthetic tasks, 2 seeds, 4 steps")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already trained and evaluated; skip (and list) the rest")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.preset, args.test_size = "synthetic:arithmetic,synthetic:parity", "quick", 8
        args.max_steps = args.max_steps or 4
        args.seeds, args.max_train_per_task = args.seeds[:2] if len(args.seeds) >= 2 else [0, 1], 32
    if args.out_dir is None:
        args.out_dir = "benchmarks/results/quality_quick" if args.quick else "benchmarks/results/quality_v2"
    for name in ("save_steps", "routing_points"):
        if getattr(args, name) < (1 if name == "save_steps" else 0):
            parser.error(f"--{name.replace('_', '-')} must be at least {1 if name == 'save_steps' else 0}")
    return args


def routing_steps(args: argparse.Namespace) -> list[int]:
    """`--routing-points` evenly spaced steps of training, the last one included."""
    max_steps = args.max_steps or PRESETS[args.preset]["max_steps"]
    points = min(args.routing_points, max_steps)
    return sorted({round(max_steps * i / points) for i in range(1, points + 1)}) if points else []


def method_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The step settings of one method's runs: none for base (it trains nothing); the targets where given."""
    if method == "base":
        return {"max_steps": 0, "save_steps": None, "routing_eval_steps": [], "bf16": None, "padding_free": False}
    settings = {"max_steps": args.max_steps, "save_steps": args.save_steps, "bf16": True if args.bf16 else None,
                "padding_free": args.padding_free,
                "routing_eval_steps": routing_steps(args) if method in EXPERT_METHODS else []}
    targets = (args.lora_target_modules or args.target_modules) if method == "lora" else args.target_modules
    return settings | ({"target_modules": list(targets)} if targets else {})


def check_reused_run(args: argparse.Namespace, stored: dict[str, Any], where: Path, method: str, seed: int,
                     overrides: dict) -> None:
    """Refuse to reuse a finished run (its folder or its committed result, at `where`) that was trained with other
    settings than the ones asked for now; `stored` are its options."""
    steps = method_settings(args, method)
    wanted = {"method": method, "seed": seed, "tasks": args.tasks, "preset": args.preset, "model": args.model,
              "max_steps": steps["max_steps"], "test_size": args.test_size,
              "max_train_per_task": args.max_train_per_task, "bf16": steps["bf16"],
              "learning_rate": args.learning_rate, "batch_size": args.batch_size,
              "padding_free": steps["padding_free"] or None,
              "target_modules": steps.get("target_modules")} | overrides
    differ = {k: (stored.get(k), v) for k, v in wanted.items() if v is not None and stored.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise SystemExit(f"{where} holds a run made with other settings ({details}); give another --out-dir, "
                         "or delete that run to train it again")


def committed_result(args: argparse.Namespace, name: str, method: str, seed: int,
                     overrides: dict) -> dict[str, Any] | None:
    """The result `OUT/results/NAME.json` of a run whose folder is not here (a fresh checkout: run folders stay
    local, results are committed), checked against the settings asked for now; None if there is none."""
    run_dir = Path(args.out_dir) / "runs" / name
    stored = Path(args.out_dir) / "results" / f"{name}.json"
    if run_dir.is_dir() or not stored.is_file():
        return None
    result = json.loads(stored.read_text(encoding="utf-8"))
    check_reused_run(args, result["options"], stored, method, seed, overrides)
    return result


def run_one(args: argparse.Namespace, name: str, method: str, seed: int, **overrides: Any) -> dict[str, Any] | None:
    """Train (unless already done; an unfinished run resumes from its last checkpoint), evaluate and analyse one
    run; write and return its results (None if `--report-only` and the run is not finished). A run whose folder is
    not here but whose committed result is, is taken from that result."""
    run_dir = Path(args.out_dir) / "runs" / name
    if (reused := committed_result(args, name, method, seed, overrides)) is not None:
        return reused
    if args.report_only and not (run_dir / "eval_results.json").is_file():
        print(f"not finished, left out of the report: {name}")
        return None
    if (run_dir / RUN_CONFIG).is_file():
        stored = json.loads((run_dir / RUN_CONFIG).read_text())["options"]
        check_reused_run(args, stored, run_dir, method, seed, overrides)
    else:
        options = TrainOptions(output_dir=str(run_dir), method=method, tasks=args.tasks, model=args.model,
                               preset=args.preset, seed=seed, test_size=args.test_size,
                               max_train_per_task=args.max_train_per_task, overwrite=True,
                               learning_rate=args.learning_rate, batch_size=args.batch_size,
                               **method_settings(args, method) | overrides)
        try:
            train(options)  # resumes an unfinished run (OUT/runs/.NAME.partial/) from its last checkpoint
        except RunError as error:
            raise SystemExit(f"{name}: {error}") from None
    result = {"name": name, "method": method, "seed": seed, "overrides": overrides,
              "accuracy": evaluate_run(str(run_dir))}
    config = json.loads((run_dir / RUN_CONFIG).read_text())
    result["options"] = config["options"]
    for key in ("trainable_parameters", "train_runtime_s", "train_cpu_time_s", "resumed_from_step"):
        result[key] = config.get(key)
    if method in EXPERT_METHODS:
        analysis_file = run_dir / "analysis" / "analysis.json"
        if analysis_file.is_file():
            result["specialisation"] = json.loads(analysis_file.read_text())["summary"]
        elif not args.report_only:
            result["specialisation"] = analyze_run(str(run_dir))["summary"]
        if (run_dir / ROUTING_HISTORY).is_file():
            result["routing_history"] = json.loads((run_dir / ROUTING_HISTORY).read_text())["history"]
    write_json(Path(args.out_dir) / "results" / f"{name}.json", result)
    return result


def mean_and_interval(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the half-width of the 95% t-interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "std": float("nan"), "ci95": float("nan"), "n": n}
    std = statistics.stdev(values)
    return {"mean": mean, "std": std, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), "n": n}


def mean_cell(cell: dict[str, float], digits: int = 3) -> str:
    """`mean ± std` of one table cell; a cell of one seed has no spread and says so."""
    if cell["n"] < 2:
        return f"{cell['mean']:.{digits}f} (1 seed)"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


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
    return {"tasks": tasks, "accuracy": table, "paired_comoe_minus_moe": paired, "specialisation": specialisation,
            **training_times(main, list(table)), "routing_over_training": routing_over_training(main),
            "pilot": pilot_check(table, tasks)}


def training_times(results: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, float]]:
    """Mean training time per method: the trainer's wall-clock `train_runtime` of the runs trained in one go (a
    resumed run's covers only its last segment) and the CPU time of every run (all threads, across resumes)."""
    def mean_of(key: str, method: str, whole_runs_only: bool) -> float | None:
        values = [r[key] for r in results if r["method"] == method and r.get(key)
                  and not (whole_runs_only and r.get("resumed_from_step"))]
        return statistics.fmean(values) if values else None

    times: dict[str, dict[str, float]] = {"train_runtime_s": {}, "train_cpu_time_s": {}}
    for method in methods:
        for key in times:
            if (value := mean_of(key, method, whole_runs_only=key == "train_runtime_s")) is not None:
                times[key][method] = value
    return times


PILOT_MARGIN = 0.10  # the regime is one where LoRA beats the base model by this much on most tasks (issue #10)


def pilot_check(table: dict[str, Any], tasks: list[str]) -> dict[str, Any] | None:
    """Does LoRA learn here? LoRA - base mean accuracy per task, and whether it is >= `PILOT_MARGIN` on at least
    3 tasks (all of them if fewer than 3); None without both methods."""
    if "lora" not in table or "base" not in table:
        return None
    per_task = [t for t in tasks if t != "overall"]
    gains = {t: table["lora"][t]["mean"] - table["base"][t]["mean"] for t in per_task}
    passed = sum(g >= PILOT_MARGIN for g in gains.values())
    return {"lora_minus_base": gains, "tasks_passed": passed, "margin": PILOT_MARGIN,
            "learns": passed >= min(3, len(per_task))}


def routing_over_training(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per expert method and measured step: routing entropy and mean JS between tasks, mean and spread over seeds."""
    table: dict[str, dict[str, Any]] = {}
    for method in EXPERT_METHODS:
        histories = [r["routing_history"] for r in results if r["method"] == method and r.get("routing_history")]
        steps = sorted({e["step"] for h in histories for e in h})
        if not steps:
            continue
        table[method] = {"steps": steps}
        for key in ("routing_entropy", "mean_js_between_tasks"):
            table[method][key] = [mean_and_interval(values) if (values := [
                e[key] for h in histories for e in h if e["step"] == step and e[key] is not None]) else None
                for step in steps]
    return table


def total_cpu_time(results: list[dict[str, Any]]) -> float:
    """CPU seconds spent training all runs (kept steps only; evaluation and analysis not included)."""
    return sum(r.get("train_cpu_time_s") or 0.0 for r in results)


def training_time_line(summary: dict[str, Any]) -> str:
    """The report's line on training time per run: wall clock and CPU, mean over seeds, by method."""
    def by_method(times: dict[str, float]) -> str:
        return ", ".join(f"{m} {v:.0f}" for m, v in times.items()) or "none"

    return ("Training time per run, mean over seeds (seconds): wall clock (the trainer's train_runtime; runs trained "
            f"without a resume) {by_method(summary['train_runtime_s'])}; CPU (all threads, across resumes) "
            f"{by_method(summary['train_cpu_time_s'])}")


def markdown(summary: dict[str, Any], sweeps: list[dict[str, Any]], args: argparse.Namespace, seconds: float,
             references: list[dict[str, Any]] | None = None, cpu_seconds: float = 0.0,
             images: dict[str, str] | None = None, arms: dict[str, dict[str, Any]] | None = None) -> str:
    """The report: accuracy table, paired difference, specialisation, routing over training, sweeps, plots, and
    how it was produced."""
    methods = list(summary["accuracy"])
    lines = ["# Quality: CoMoE vs MoE-LoRA vs LoRA vs the base model", "",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()} CPU, Python {platform.python_version()}; this invocation {seconds / 60:.1f} "
             f"min (finished runs are reused); seeds {args.seeds}; tasks `{args.tasks}`; preset `{args.preset}`; "
             f"max steps {args.max_steps or 'preset'}; held-out {args.test_size} per task.",
             "", training_time_line(summary) + "  ",
             f"Total CPU time of training, all runs of this report (kept steps, all threads): "
             f"{cpu_seconds / 3600:.2f} h. `base` is the zero-shot base model: no adapter, the same prompts, "
             "split and scorer.",
             "", "## Accuracy (mean ± std over seeds)", "", "| task | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for task in summary["tasks"]:
        cells = [mean_cell(summary["accuracy"][m][task]) for m in methods]
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
    if summary.get("pilot"):
        pilot = summary["pilot"]
        gains = ", ".join(f"{t} {g:+.3f}" for t, g in pilot["lora_minus_base"].items())
        lines += ["", f"Pilot criterion (LoRA ≥ base + {pilot['margin']:.2f} on ≥ 3 tasks): "
                  f"{'met' if pilot['learns'] else 'not met'}, {pilot['tasks_passed']} tasks; LoRA − base: {gains}."]
    lines += routing_markdown(summary.get("routing_over_training", {}))
    for multiplier, arm in (arms or {}).items():
        lines += arm_markdown(multiplier, arm)
    if sweeps:
        lines += ["", "## CoMoE sweeps and placements (seed 0)", "",
                  "lambda = 0 is MoE-LoRA; the main CoMoE and MoE-LoRA runs of seed 0 are given as reference rows.",
                  "", "Routing entropy and JS between tasks are the finished run's analysis (`comoe-peft analyze`); "
                  "the maximum entropy is log N.", "",
                  "| run | targets | lambda | tau | N | overall accuracy | held-out contrastive loss "
                  "| mean pairwise cosine | routing entropy | JS between tasks |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sweep_rows(references or [], sweeps):
            spec = r.get("specialisation", {})
            cells = [f"{spec.get(key, float('nan')):.3f}" for key in
                     ("contrastive_loss", "mean_pairwise_cosine", "routing_entropy", "mean_js_between_tasks")]
            lines.append(f"| {r['name']} | {targets_cell(r['options'])} | {r['lambda']:g} | {r['tau']:g} | "
                         f"{r['options'].get('num_experts')} | {r['accuracy']['overall']['accuracy']:.3f} | "
                         + " | ".join(cells) + " |")
    if images:
        lines += ["", "## Plots", ""] + [f"![{title}]({path})" for title, path in images.items()]
    return "\n".join(lines) + "\n"


def targets_cell(options: dict[str, Any]) -> str:
    """A run's adapted modules for the sweep table: `mlp`, `q k v o` (the `_proj` suffix dropped); `default` for a
    run stored before its options recorded the job's default targets."""
    targets = options.get("target_modules")
    if not targets:
        return "default"
    return " ".join(name.removesuffix("_proj") for name in ([targets] if isinstance(targets, str) else targets))


def arm_markdown(multiplier: str, arm: dict[str, Any]) -> list[str]:
    """One router learning-rate arm: overall accuracy per method, the paired difference, the final routing."""
    lines = ["", f"## Arm: routers at {multiplier} x the learning rate (comoe and moe, all seeds)", "",
             "| method | overall accuracy | final routing entropy | final JS between tasks |", "|---|---|---|---|"]
    for method, table in arm["accuracy"].items():
        routing = arm["routing_over_training"].get(method)
        final = [routing[key][-1] if routing and routing[key][-1] else None
                 for key in ("routing_entropy", "mean_js_between_tasks")]
        cells = [mean_cell(c, 4) if c else "–" for c in final]
        lines.append(f"| {method} | {mean_cell(table['overall'])} | "
                     + " | ".join(cells) + " |")
    paired = arm["paired_comoe_minus_moe"].get("overall")
    if paired:
        spread = f"± {paired['ci95']:.3f} (95% CI)" if paired["n"] > 1 else "(1 seed, no interval)"
        lines += ["", f"Paired CoMoE − MoE-LoRA, overall: {paired['mean']:+.3f} {spread}."]
    return lines


def router_lr_arms(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Train / evaluate the `--router-lr-multipliers` arms; {multiplier: summary of its comoe and moe runs}."""
    arms = {}
    for multiplier in args.router_lr_multipliers:
        runs = [run_one(args, f"{m}-rlr{multiplier:g}-s{s}", m, s, router_lr_multiplier=multiplier)
                for s in args.seeds for m in EXPERT_METHODS]
        runs = [r | {"overrides": {}} for r in runs if r]  # summarised as main runs of their own arm
        if runs:
            arms[f"{multiplier:g}"] = summarise(runs, list(EXPERT_METHODS)) | {"results": runs}
    return arms


def routing_markdown(routing: dict[str, dict[str, Any]]) -> list[str]:
    """The routing-over-training table: entropy and JS between tasks per measured step, mean ± std over seeds."""
    if not routing:
        return []
    lines = ["", "## Routing during training (held-out probe, mean ± std over seeds)", "",
             "Routing entropy in nats (log N = uniform); JS: mean Jensen-Shannon divergence of the expert loads "
             "between task pairs.", "", "| method | step | routing entropy | JS between tasks |", "|---|---|---|---|"]
    for method, table in routing.items():
        for i, step in enumerate(table["steps"]):
            cells = [mean_cell(c, 4) if c else "–"
                     for c in (table["routing_entropy"][i], table["mean_js_between_tasks"][i])]
            lines.append(f"| {method} | {step} | " + " | ".join(cells) + " |")
    return lines


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars: accuracy per task (and overall) per method, error bars the 95% interval over seeds."""
    plt = pyplot()
    methods, tasks = list(summary["accuracy"]), summary["tasks"]
    width = 0.8 / max(1, len(methods))
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(tasks)), 4))
    for i, method in enumerate(methods):
        cells = [summary["accuracy"][method][t] for t in tasks]
        errors = [c["ci95"] if math.isfinite(c["ci95"]) else 0.0 for c in cells]
        axis.bar([j + i * width for j in range(len(tasks))], [c["mean"] for c in cells], width, yerr=errors,
                 capsize=3, label=method)
    axis.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
    axis.set_ylabel("accuracy (mean over seeds, 95% CI)")
    axis.set_ylim(0, 1)
    axis.legend()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def plot_routing(routing: dict[str, dict[str, Any]], path: Path) -> None:
    """Routing entropy and JS between tasks against the training step, one line per expert method (± std)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, label in zip(axes, ("routing_entropy", "mean_js_between_tasks"),
                                ("routing entropy (nats)", "mean JS between tasks")):
        for method, table in routing.items():
            points = [(s, c) for s, c in zip(table["steps"], table[key]) if c]
            means = [c["mean"] for _, c in points]
            spread = [c["std"] if math.isfinite(c["std"]) else 0.0 for _, c in points]
            axis.errorbar([s for s, _ in points], means, yerr=spread, marker="o", capsize=3, label=method)
        axis.set_xlabel("training step")
        axis.set_ylabel(label)
        axis.legend()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_plots(summary: dict[str, Any], out: Path) -> dict[str, str]:
    """The report's plots, written into `out`; {title: file name}."""
    images = {"accuracy per task": "accuracy.png"}
    plot_accuracy(summary, out / images["accuracy per task"])
    if summary.get("routing_over_training"):
        images["routing over training"] = "routing_over_training.png"
        plot_routing(summary["routing_over_training"], out / images["routing over training"])
    return images


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
    sweeps += [run_one(args, f"comoe-n{v}", "comoe", 0, num_experts=v) for v in args.num_experts_sweep]
    if args.placement_pair:
        sweeps += [run_one(args, f"{m}-{len(args.placement_pair)}proj-s0", m, 0,
                           target_modules=list(args.placement_pair)) for m in ("comoe", "moe")]
    results, sweeps = [r for r in results if r], [r for r in sweeps if r]
    arms = router_lr_arms(args)
    summary = summarise(results, args.methods)
    references = [r for r in results if r["seed"] == 0 and r["method"] in EXPERT_METHODS] if sweeps else []
    out = Path(args.out_dir)
    cpu_seconds = total_cpu_time(results + sweeps + [r for arm in arms.values() for r in arm["results"]])
    report = {"args": vars(args), "results": results, "sweeps": sweeps, "summary": summary,
              "router_lr_arms": arms, "wall_time_s": time.time() - started, "train_cpu_time_s": cpu_seconds}
    write_json(out / "quality.json", report)
    images = write_plots(summary, out) if results else {}
    write_text_atomic(out / "quality.md", markdown(summary, sweeps, args, report["wall_time_s"], references,
                                                   cpu_seconds, images, arms))
    print((out / "quality.md").read_text(encoding="utf-8"))
    return report


if __name__ == "__main__":
    main()
