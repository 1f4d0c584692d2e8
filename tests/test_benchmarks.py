"""Smoke tests of the benchmark scripts: they run end to end on tiny shapes and report every arm.

No timing is asserted (a timed unit test is not a benchmark); the scripts' own correctness checks are.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import layer_speed
import prototypes
import train_step


def finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_layer_speed_reports_every_arm_and_checks_correctness(tmp_path):
    out, table = tmp_path / "layer.json", tmp_path / "layer.md"
    argv = ["--quick", "--shapes", "64x48", "--tokens", "256", "--experts", "4", "--dtypes", "fp32", "bf16"]
    argv += ["--rounds", "2", "--reps", "1", "--min-time", "0", "--out", str(out), "--markdown", str(table)]
    layer_speed.main(argv)

    report = json.loads(out.read_text())
    assert [r["case"]["dtype"] for r in report["results"]] == ["fp32", "bf16"]
    for result in report["results"]:
        assert result["correctness"]["passed"] is True, "CoMoE must equal the loop arm before anything is timed"
        assert set(result["arms"]) == set(layer_speed.ARMS)
        for arm, values in result["arms"].items():
            assert finite_positive(values["ratio_to_base"]), arm
            assert finite_positive(values["ratio_to_lora_kr"]), arm
            assert len(values["seconds_per_round"]) == 2
            assert values["saved_bytes"] >= 0
        assert result["arms"]["base"]["ratio_to_base"] == 1.0
        assert result["arms"]["lora_kr"]["ratio_to_lora_kr"] == 1.0
        assert result["arms"]["base"]["saved_bytes"] == 0  # the frozen layer saves only its weight and input
        assert result["arms"]["loop"]["saved_bytes"] > result["arms"]["comoe"]["saved_bytes"] > 0
        assert all(finite_positive(v) for v in result["speedup_vs_loop"].values())
        assert set(result["targets"]) == {
            "comoe_le_1.0x_lora_kr",
            "comoe_con_le_1.25x_lora_kr",
            "comoe_ge_2x_faster_than_loop",
            "comoe_saved_le_0.1x_loop",
        }
    text = table.read_text()
    for label in layer_speed.ARM_LABELS.values():
        assert label in text


def test_layer_speed_pow2_loss_and_fp32_adapters_on_bf16(tmp_path):
    argv = ["--shapes", "32x40", "--tokens", "128", "--experts", "8", "--dtypes", "bf16_fp32adapters"]
    report = layer_speed.main(argv + ["--rounds", "1", "--reps", "1", "--min-time", "0", "--loss", "pow2"])
    (result,) = report["results"]
    assert result["correctness"]["passed"] is True
    assert result["num_negatives_sampled"] == 2
    assert all(finite_positive(v["ratio_to_lora_kr"]) for v in result["arms"].values())


def test_loop_arm_takes_the_comoe_experts():
    case = layer_speed.Case("t", 16, 12, 128, 4, 2, 4, "fp32", "cpu")
    arms = layer_speed.build_arms(case)
    result = layer_speed.check_correctness(arms["comoe"], arms["loop"], case.d_in, "cpu")
    assert result["passed"] and max(result["max_abs_error"].values()) < 1e-9


def test_train_step_reports_every_arm(tmp_path):
    out, table = tmp_path / "train.json", tmp_path / "train.md"
    argv = ["--quick", "--rounds", "1", "--batch", "2", "--seq", "16", "--tiny-hidden", "64", "--tiny-vocab", "256"]
    argv += ["--tiny-layers", "2", "--prototype", "--out", str(out), "--markdown", str(table)]
    train_step.main(argv)

    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["model"] == "tiny"
    assert set(result["arms"]) == set(train_step.ARMS) | set(train_step.PROTOTYPE_ARMS)
    for arm, values in result["arms"].items():
        assert finite_positive(values["ratio_to_lora_matched"]), arm
        assert finite_positive(values["ratio_to_lora_kr"]), arm
        assert math.isfinite(values["loss"]), arm
        assert values["saved_bytes"] > 0
    comoe_params = result["arms"]["comoe"]["trainable_params"]
    assert result["arms"]["loop"]["trainable_params"] == comoe_params
    assert abs(result["arms"]["lora_matched"]["trainable_params"] / comoe_params - 1) < 0.05
    assert "comoe_con_le_1.15x_lora_matched" in result["targets"]
    assert "lora_matched (r=" in table.read_text()


def test_prototype_layer_equals_current_layer_and_passes_gradcheck():
    assert prototypes.check_prototype()["passed"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prototype_benchmark_runs(dtype):
    argv = ["--shapes", "32x24", "--tokens", "128", "--experts", "4", "--dtypes", dtype, "--rounds", "1"]
    report = prototypes.main(argv)
    (result,) = report["results"]
    assert set(result["arms"]) == set(prototypes.PROTO_ARMS)
    assert all(finite_positive(v) for v in result["proto_over_current"].values())


def test_quality_quick_reports_methods_seeds_and_the_paired_difference(tmp_path):
    import importlib.util

    from conftest import tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "tiny-model"
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    report = quality.main(["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--max-steps", "2",
                           "--lambdas", "0.1"])
    summary = report["summary"]
    assert set(summary["accuracy"]) == {"comoe", "moe", "lora"}
    overall = summary["paired_comoe_minus_moe"]["overall"]
    assert len(overall["per_seed"]) == 2 and overall["n"] == 2
    assert "comoe" in summary["specialisation"] and "moe" in summary["specialisation"]
    assert [r["name"] for r in report["sweeps"]] == ["comoe-lambda0.1"]
    text = (tmp_path / "q" / "quality.md").read_text()
    assert "Paired difference" in text and "synthetic:parity" in text
    assert "| moe-s0 | 0 | " in text and "| comoe-lambda0.1 | 0.1 | " in text, "the sweep table has its reference rows"

    # --report-only reuses the finished runs and leaves out (without training) the ones that are not there
    again = quality.main(["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--seeds", "0", "1",
                          "5", "--lambdas", "0.1", "0.5", "--max-steps", "2", "--report-only"])
    assert not (tmp_path / "q" / "runs" / "comoe-s5").exists()
    assert [r["name"] for r in again["sweeps"]] == ["comoe-lambda0.1"]
    assert again["summary"]["paired_comoe_minus_moe"]["overall"]["per_seed"] == overall["per_seed"]

    # a finished run is not reused for other settings: a clear error instead of a silently wrong report
    with pytest.raises(SystemExit, match="other settings.*max_steps: stored 2, asked 3"):
        quality.main(["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--max-steps", "3"])
