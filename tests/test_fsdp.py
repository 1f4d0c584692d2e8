"""FSDP2 (`fully_shard`) with CoMoE adapters: two CPU processes (gloo) train like one, and the gathered adapter
loads unsharded with `PeftModel.from_pretrained`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from fsdp_train import STEPS, build_model, global_batch, reference_losses
from peft import PeftModel
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_train.py")


def launch(output_dir) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(30500 + os.getpid() % 1000), SCRIPT, str(output_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_the_adapter_loads_unsharded(tmp_path):
    result = launch(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and report["model_class"].startswith("FSDP")
    assert report["sharded_adapter_tensors"] == 3 * 3 * 2  # comoe_A, comoe_B, router x 3 targets x 2 layers

    expected, reference = reference_losses()
    assert len(report["losses"]) == STEPS and report["losses"][-1] < report["losses"][0]
    assert report["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-6)

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(".comoe_" in k for k in saved)
    trained = {k.replace(".default", ""): v for k, v in reference.state_dict().items() if ".comoe_" in k}
    assert set(saved) == set(trained)
    for key, value in saved.items():
        torch.testing.assert_close(value, trained[key], rtol=1e-4, atol=1e-5)

    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter").eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**global_batch()).logits, reference(**global_batch()).logits,
                                   rtol=1e-4, atol=1e-5)


def test_fsdp_script_model_is_deterministic():
    """The comparison above needs every process to build the same model."""
    first, second = build_model(), build_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
