"""Smoke tests of the benchmark scripts: they run end to end on tiny shapes and report every arm.

No timing is asserted (a timed unit test is not a benchmark); the scripts' own correctness checks are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import block_speed
import decode_speed
import gpu_check
import layer_speed
import mixed_batch_speed
import prototypes
import router_diagnosis
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


def tiny_model_folder(folder: Path) -> Path:
    from conftest import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def test_quality_interval_is_the_t_interval_and_one_seed_cells_say_so():
    quality = load_quality()
    three = quality.mean_and_interval([0.5, 0.6, 0.7])
    assert three["mean"] == pytest.approx(0.6) and three["std"] == pytest.approx(0.1)
    assert three["ci95"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3), "t(0.975, 2 dof) = 4.303"
    assert quality.mean_and_interval([0.1] * 12)["ci95"] == pytest.approx(0.0)
    assert quality.mean_cell(three) == "0.600 ± 0.100"
    one = quality.mean_and_interval([0.782])
    assert quality.mean_cell(one) == "0.782 (1 seed)" and quality.mean_cell(one, 4) == "0.7820 (1 seed)"


def test_quality_training_time_leaves_resumed_runs_out_of_the_wall_clock_but_not_out_of_the_cpu_time():
    quality = load_quality()
    results = [{"method": "moe", "train_runtime_s": 5000.0, "train_cpu_time_s": 4800.0, "resumed_from_step": None},
               {"method": "moe", "train_runtime_s": 300.0, "train_cpu_time_s": 3900.0, "resumed_from_step": 550},
               {"method": "base", "train_runtime_s": 0.0, "train_cpu_time_s": None, "resumed_from_step": None}]
    times = quality.training_times(results, ["base", "moe"])
    assert times == {"train_runtime_s": {"moe": 5000.0}, "train_cpu_time_s": {"moe": 4350.0}}
    line = quality.training_time_line(times)
    assert "train_runtime; runs trained without a resume) moe 5000;" in line and line.endswith("resumes) moe 4350")
    assert quality.training_time_line({"train_runtime_s": {}, "train_cpu_time_s": {}}).count("none") == 2


def test_quality_quick_reports_methods_seeds_and_the_paired_difference(tmp_path):
    model_dir = tiny_model_folder(tmp_path / "tiny-model")
    quality = load_quality()
    report = quality.main(["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--max-steps", "2",
                           "--lambdas", "0.1", "--routing-points", "2", "--router-lr-multipliers", "10",
                           "--placement-pair", "q_proj", "v_proj"])
    summary = report["summary"]
    assert set(summary["accuracy"]) == {"base", "comoe", "moe", "lora"}
    assert {r["method"] for r in report["results"]} == {"base", "comoe", "moe", "lora"}
    assert sorted(r["name"] for r in report["results"] if r["method"] == "base") == ["base-s0", "base-s1"]
    base = next(r for r in report["results"] if r["name"] == "base-s0")
    assert base["trainable_parameters"] == 0 and "specialisation" not in base and "routing_history" not in base
    overall = summary["paired_comoe_minus_moe"]["overall"]
    assert len(overall["per_seed"]) == 2 and overall["n"] == 2
    assert "comoe" in summary["specialisation"] and "moe" in summary["specialisation"]
    assert [r["name"] for r in report["sweeps"]] == ["comoe-lambda0.1", "comoe-2proj-s0", "moe-2proj-s0"]
    assert {tuple(r["options"]["target_modules"]) for r in report["sweeps"][1:]} == {("q_proj", "v_proj")}
    assert report["sweeps"][2]["overrides"] == {"target_modules": ["q_proj", "v_proj"]}
    routing = summary["routing_over_training"]
    assert set(routing) == {"comoe", "moe"} and routing["comoe"]["steps"] == [1, 2]
    assert routing["moe"]["routing_entropy"][-1]["n"] == 2, "one routing history per seed"
    text = (tmp_path / "q" / "quality.md").read_text()
    assert "Paired difference" in text and "synthetic:parity" in text and "Specialisation: base" not in text
    assert "| task | base | comoe | moe | lora |" in text
    assert "| moe-s0 | q k v o | 0 | " in text and "| comoe-lambda0.1 | q k v o | 0.1 | " in text, "reference rows"
    assert "| moe-2proj-s0 | q v | 0 | " in text, "the placement pair's rows name their modules"
    sweep_line = next(line for line in text.splitlines() if line.startswith("| comoe-lambda0.1 | q k v o | 0.1 | "))
    spec = report["sweeps"][0]["specialisation"]
    assert sweep_line.endswith(f"| {spec['routing_entropy']:.3f} | {spec['mean_js_between_tasks']:.3f} |")
    pilot = summary["pilot"]
    assert set(pilot["lora_minus_base"]) == {"synthetic:arithmetic", "synthetic:parity"}
    accuracy = summary["accuracy"]
    gain = accuracy["lora"]["synthetic:parity"]["mean"] - accuracy["base"]["synthetic:parity"]["mean"]
    assert pilot["lora_minus_base"]["synthetic:parity"] == pytest.approx(gain)
    assert pilot["learns"] == (pilot["tasks_passed"] == 2) and "Pilot criterion" in text
    assert "Routing during training" in text and "| comoe | 2 | " in text and "Total CPU time" in text
    for image in ("accuracy.png", "routing_over_training.png"):
        assert (tmp_path / "q" / image).read_bytes()[:4] == b"\x89PNG" and f"]({image})" in text

    # a fresh checkout has the committed results but no run folders: the study takes the results, trains nothing
    argv = ["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--max-steps", "2",
            "--lambdas", "0.1", "--routing-points", "2", "--router-lr-multipliers", "10",
            "--placement-pair", "q_proj", "v_proj"]
    shutil.rmtree(tmp_path / "q" / "runs")
    again = quality.main(argv)
    assert not (tmp_path / "q" / "runs").exists(), "nothing was trained again"
    assert again["summary"]["accuracy"] == summary["accuracy"] and len(again["results"]) == len(report["results"])
    with pytest.raises(SystemExit, match="other settings.*max_steps"):
        quality.main([*argv[:-9], "--max-steps", "3"])
    # every finished run's small results are written beside the report, apart from the (git-ignored) run folders
    stored = json.loads((tmp_path / "q" / "results" / "comoe-s1.json").read_text())
    assert stored["accuracy"] == next(r for r in report["results"] if r["name"] == "comoe-s1")["accuracy"]
    assert len(list((tmp_path / "q" / "results").glob("*.json"))) == 15
    arm = report["router_lr_arms"]["10"]
    assert sorted(r["name"] for r in arm["results"]) == ["comoe-rlr10-s0", "comoe-rlr10-s1", "moe-rlr10-s0",
                                                          "moe-rlr10-s1"]
    assert {r["options"]["router_lr_multiplier"] for r in arm["results"]} == {10.0}
    assert arm["paired_comoe_minus_moe"]["overall"]["n"] == 2 and "routers at 10 x the learning rate" in text
    assert f"overall: {arm['paired_comoe_minus_moe']['overall']['mean']:+.3f} ± " in text
    one_seed = {**arm, "paired_comoe_minus_moe": {"overall": quality.mean_and_interval([0.004])}}
    assert quality.arm_markdown("10", one_seed)[-1] == "Paired CoMoE − MoE-LoRA, overall: +0.004 (1 seed, no interval)."
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert set(saved) >= {"args", "results", "sweeps", "summary", "train_cpu_time_s"}
    assert saved["train_cpu_time_s"] > 0

    # --report-only reuses the finished runs and leaves out (without training) the ones that are not there
    again = quality.main(["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--seeds", "0", "1",
                          "5", "--lambdas", "0.1", "0.5", "--max-steps", "2", "--routing-points", "2",
                          "--report-only"])
    assert not (tmp_path / "q" / "runs" / "comoe-s5").exists()
    assert [r["name"] for r in again["sweeps"]] == ["comoe-lambda0.1"]
    assert again["summary"]["paired_comoe_minus_moe"]["overall"]["per_seed"] == overall["per_seed"]

    # a finished run is not reused for other settings: a clear error instead of a silently wrong report
    with pytest.raises(SystemExit, match="other settings.*max_steps: stored 2, asked 3"):
        quality.main(["--quick", "--model", str(model_dir), "--out-dir", str(tmp_path / "q"), "--max-steps", "3"])


@pytest.mark.slow
def test_quality_killed_mid_run_continues_where_it_stopped(tmp_path):
    """SIGKILL the study while a run trains (after its first checkpoint), start it again: the run resumes."""
    import signal
    import subprocess
    import time

    model_dir = tiny_model_folder(tmp_path / "tiny-model")
    out = tmp_path / "q"
    argv = ["--quick", "--model", str(model_dir), "--out-dir", str(out), "--methods", "comoe", "--seeds", "0",
            "--max-steps", "200", "--save-steps", "5", "--routing-points", "0"]
    script = Path(__file__).parents[1] / "benchmarks" / "quality.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    partial = out / "runs" / ".comoe-s0.partial" / "trainer"
    try:
        deadline = time.time() + 120
        while not list(partial.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
            assert process.poll() is None, "the study ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "runs" / "comoe-s0" / "run_config.json").exists(), "killed before the run finished"
    kept = max(int(p.parent.name.split("-")[1]) for p in partial.glob("checkpoint-*/trainer_state.json"))

    report = load_quality().main(argv)
    result = next(r for r in report["results"] if r["name"] == "comoe-s0")
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= kept
    history = json.loads((out / "runs" / "comoe-s0" / "log_history.json").read_text())
    steps = [e["step"] for e in history if "loss" in e]
    assert history[-1]["step"] == 200, "trained to the end"
    assert steps == list(range(6, 201, 6)), "every logging step once: none lost at the kill, none repeated"
    assert not (out / "runs" / ".comoe-s0.partial").exists()
    assert (out / "results" / "comoe-s0.json").is_file()


def test_block_speed_reports_every_arm_and_the_block_equals_the_loop(tmp_path):
    out, table = tmp_path / "block.json", tmp_path / "block.md"
    report = block_speed.main(["--shapes", "tiny", "--tokens", "128", "--rounds", "1", "--reps", "1",
                               "--out", str(out), "--markdown", str(table)])
    (result,) = report["results"]
    assert set(result["arms"]) == set(block_speed.ARMS)
    assert result["max_abs_difference_block_vs_loop"] < 1e-5
    for arm, values in result["arms"].items():
        assert finite_positive(values["ratio_to_lora_kr"]), arm
    assert result["arms"]["block"]["trainable_params"] == result["arms"]["block_con"]["trainable_params"]
    assert finite_positive(result["decode_ratio_block_to_lora_kr"])
    assert set(result["targets"]) == {"block_le_1.3x_lora_kr", "decode_le_1.15x_lora_kr"}
    assert json.loads(out.read_text())["results"][0]["shape"] == "tiny" and "| tiny (32->64)" in table.read_text()


def test_train_step_block_arms_compare_with_lora_on_the_mlp(tmp_path):
    argv = ["--quick", "--rounds", "1", "--batch", "2", "--seq", "16", "--tiny-hidden", "64", "--tiny-vocab", "256",
            "--tiny-layers", "2", "--blocks", "--markdown", str(tmp_path / "t.md")]
    (result,) = train_step.main(argv)["results"]
    for arm in ("lora_mlp_kr", "block", "block_con"):
        assert finite_positive(result["arms"][arm]["ratio_to_lora_mlp_kr"]), arm
        assert math.isfinite(result["arms"][arm]["loss"])
    assert "FFN-block experts on the MLP" in (tmp_path / "t.md").read_text()


def test_quality_v2_run_folders_stay_out_of_git_and_their_results_do_not():
    import shutil
    import subprocess

    root = Path(__file__).parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    out = "benchmarks/results/quality_v2"

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0

    assert ignored(f"{out}/runs/.comoe-s0.partial/trainer/checkpoint-25/adapter_model.safetensors")
    assert ignored(f"{out}/runs/comoe-s0/data/test/data-00000-of-00001.arrow")
    assert not ignored(f"{out}/results/comoe-s0.json") and not ignored(f"{out}/quality.json")
    assert not ignored(f"{out}/accuracy.png")


def test_decode_speed_reports_every_arm_eager_and_compiled(tmp_path):
    out, table = tmp_path / "decode.json", tmp_path / "decode.md"
    argv = ["--quick", "--models", "tiny", "--batches", "1", "2", "--compile", "--out", str(out), "--markdown",
            str(table)]
    decode_speed.main(argv)
    report = json.loads(out.read_text())
    (model,) = report["results"]
    assert [result["batch"] for result in model["results"]] == [1, 2]
    for result in model["results"]:
        arms = result["arms"]
        assert set(arms) == {"base", "lora_kr", "comoe", "base_compiled", "lora_kr_compiled", "comoe_compiled"}
        for arm, values in arms.items():
            assert finite_positive(values["prefill_ratio_to_lora_kr"]), arm
            assert finite_positive(values["decode_ratio_to_lora_kr"]), arm
            assert (values["peak_memory_bytes"] is None) == arm.endswith("_compiled"), arm
        assert arms["comoe"]["peak_memory_bytes"] > 0
        assert finite_positive(arms["comoe_compiled"]["decode_ratio_to_eager"])
        assert result["compiled_generates_the_eager_tokens"]["comoe_compiled"] is True
        assert set(result["targets"]) == {"decode_le_1.1x_lora_kr", "prefill_le_1.15x_lora_kr"}
    assert "comoe_compiled" in table.read_text()


def test_mixed_batch_speed_reports_every_mix_for_comoe_and_lora(tmp_path):
    out, table = tmp_path / "mixed.json", tmp_path / "mixed.md"
    report = mixed_batch_speed.main(["--quick", "--out", str(out), "--markdown", str(table)])
    assert json.loads(out.read_text())["ratio_to_single"] == report["ratio_to_single"]
    arms = {f"{method}_{mix}" for method in ("comoe", "lora") for mix in mixed_batch_speed.MIXES}
    assert set(report["median_s"]) == arms and all(finite_positive(v) for v in report["median_s"].values())
    assert set(report["ratio_to_single"]) == {arm for arm in arms if not arm.endswith("_single")}
    assert "comoe_mixed3" in table.read_text() and report["meta"]["threads"] == 1
    assert mixed_batch_speed.row_names(["a", "b", "__base__"], 4) == ["a", "b", "__base__", "a"]


def test_decode_speed_refuses_bad_numbers_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        decode_speed.parse_args(["--new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--new-tokens must be >= 1" in capsys.readouterr().err


def test_live_tensor_bytes_counts_what_a_call_holds_at_once():
    def run():
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # 2000 bytes, both alive: 6000
        del a, b
        c = torch.empty(250)  # 1000 bytes after both were freed
        return c.view(10, 25)  # a view adds nothing

    weight = torch.empty(10_000)
    assert decode_speed.peak_memory(lambda: (weight.t(), weight.add_(0)), "cpu") == 0  # earlier tensors excluded
    assert decode_speed.peak_memory(run, "cpu") == 6000


def test_gpu_check_dry_run_checks_every_command_within_the_budget(tmp_path, capsys):
    summary = gpu_check.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert summary["dry_run"] and summary["limit_seconds"] <= 8 * 60
    names = [step.name for step in gpu_check.plan(tmp_path)]
    assert names == ["cuda_tests", "layer_speed", "train_step", "decode_speed", "decode_compiled"]
    for command in summary["steps"][1:]:
        assert Path(command[1]).is_file() and "--device" in command and "cuda" in command
        assert any(str(tmp_path) in part for part in command), "results go to --out-dir"
    # the CUDA tests: only the files holding them, so the check needs nothing the other tests import (trl, datasets)
    cuda_files = {"tests/test_layer.py", "tests/test_inference.py", "tests/test_dora.py", "tests/test_qlora.py"}
    assert cuda_files <= set(summary["steps"][0]) and "tests" not in summary["steps"][0]
    assert summary["collected"]["cuda_tests"] >= len(cuda_files), "pytest collected them in the dry run"
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"
    printed = capsys.readouterr().out
    assert "decode_compiled" in printed and "at most" in printed and "nothing was run" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA GPU.*--dry-run"):
        gpu_check.main(["--out-dir", str(tmp_path / "gpu")])
    assert not (tmp_path / "gpu").exists()


def test_router_diagnosis_rebuilds_the_initial_weights_and_measures_the_drift(tmp_path, tiny_model_dir, examples_file):
    from safetensors.torch import save_file

    from comoe_peft.experiments import jobs

    run = tmp_path / "run"
    jobs.train(jobs.TrainOptions(output_dir=str(run), method="moe", dataset=str(examples_file),
                                 model=str(tiny_model_dir), preset="quick", test_size=4, rank=2, max_steps=3,
                                 learning_rate=0.05))
    (row,) = router_diagnosis.main([str(run), "--batches", "2", "--out", str(tmp_path / "diag.json")])
    assert set(row["drift"]) == set(router_diagnosis.KINDS) and all(v > 0 for v in row["drift"].values())
    # B starts at zero: no expert output, so neither the router nor A gets a gradient at initialisation
    assert row["gradient_at_init"]["comoe_router"]["rms"] == 0 and row["gradient_at_init"]["comoe_A"]["rms"] == 0
    assert row["gradient_at_init"]["comoe_B"]["rms"] > 0 and row["gradient_at_end"]["comoe_router"]["rms"] > 0
    assert 0 < row["router_logits_at_end"]["routing_entropy"] <= row["uniform_entropy"] + 1e-6
    assert json.loads((tmp_path / "diag.json").read_text())["runs"][0]["drift"] == row["drift"]

    # the rebuilt initialisation is the run's own: an adapter holding it shows no drift at all
    scratch = tmp_path / "scratch"
    trainer = router_diagnosis.initial_trainer(router_diagnosis.run_options(run, scratch), scratch)
    initial = router_diagnosis.get_peft_model_state_dict(trainer.model)
    save_file({k: v.contiguous() for k, v in initial.items()}, str(run / router_diagnosis.ADAPTER_FILE))
    (untrained,) = router_diagnosis.main([str(run), "--batches", "2"])
    assert untrained["drift"] == {kind: 0.0 for kind in router_diagnosis.KINDS}


def test_router_diagnosis_refuses_a_folder_without_a_trained_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        router_diagnosis.main([str(tmp_path)])
    assert stop.value.code == 2 and "is not a finished comoe / moe run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        router_diagnosis.main([str(tmp_path), "--batches", "1"])
    assert stop.value.code == 2 and "--batches must be at least 2" in capsys.readouterr().err



def test_quality_routing_steps_read_every_presets_max_steps():
    from comoe_peft.experiments.jobs import PRESETS

    quality = load_quality()
    for name, preset in PRESETS.items():
        assert quality.routing_steps(quality.parse_args(["--preset", name]))[-1] == preset["max_steps"], name
    assert quality.routing_steps(quality.parse_args(["--preset", "mixlora"])) == [25, 50, 75, 100]
