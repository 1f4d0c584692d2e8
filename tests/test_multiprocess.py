"""Two CPU processes with accelerate (gloo): CoMoE trains and logs gathered metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "multiprocess_train.py")


def launch(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # accelerate's `--cpu` flag starts one process (several need MPI); `--multi_gpu` starts them with torchrun,
    # which falls back to the gloo backend on a machine without GPUs (the script sets use_cpu=True).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), SCRIPT, str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.multiprocess
def test_two_process_ddp_run_trains_and_logs_gathered_metrics(tmp_path):
    result = launch(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_processes"] == 2
    steps = [e for e in report["log_history"] if "loss" in e]
    assert len(steps) == 3
    assert all("comoe/contrastive" in e and "comoe/expert_load_cv" in e for e in steps)
    assert not report["fsdp"] and report["distributed_type"] == "DistributedType.MULTI_CPU"

