"""The table `comoe-peft eval` prints: per-task accuracy of one or more runs.

The accuracy itself comes from lm-evaluation-harness (`comoe_peft.experiments.lm_eval_tasks`); the hand-written
scorer that lived here (multiple choice by log-likelihood, exact match for generation) was removed after lm-eval
gave the same accuracy on every task at 1.94x its CPU time (docs/benchmarks.md, "Evaluation: lm-eval vs the old
scorer").

A result is `{task: {"accuracy": float, "n": int, "kind": str, ...}, "overall": {...}}` (`lm_eval_tasks.Results`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OVERALL = "overall"


# printing


def _is_single(results: Mapping[str, Any]) -> bool:
    return all(isinstance(v, Mapping) and "accuracy" in v for v in results.values())


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of per-task accuracy, `overall` last.

    `results` is either one `evaluate` result, or several keyed by method name (e.g.
    `{"comoe": ..., "moe": ..., "lora": ...}`), which gives one accuracy column per method.
    A task missing from a method shows `-`.
    """
    if not results:
        raise ValueError("No results to format.")
    methods = {"accuracy": results} if _is_single(results) else dict(results)
    tasks = sorted({t for res in methods.values() for t in res if t != OVERALL})
    if any(OVERALL in res for res in methods.values()):
        tasks.append(OVERALL)

    def cell(task: str, key: str) -> str:
        for res in methods.values():
            if task in res:
                return str(res[task][key])
        return "-"

    header = ["task", "kind", "n", *methods]
    body = [
        [task, cell(task, "kind"), cell(task, "n")]
        + [f"{res[task]['accuracy']:.3f}" if task in res else "-" for res in methods.values()]
        for task in tasks
    ]
    widths = [max(len(str(r[c])) for r in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        first = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        rest = [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(first + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
