"""The cost of a mixed-adapter batch: each row with its own adapter (`adapter_names`) against one adapter for all rows.

A forward over a batch of prompts (the prefill of generation), no cache, eval mode, for CoMoE and, as the
reference of the same feature, peft's LoRA at r = k*r (CoMoE's active rank). Two adapters on q, k, v, o of every
layer of a config-built model (random weights, B matrices random so the adapters change the output). Arms, each
timed in the same process, interleaved round by round:

    {method}_single   every row with the adapter "a" (set_adapter: the ordinary forward)
    {method}_mixed    rows alternating "a" and "b" (`adapter_names`): each adapter on half the rows
    {method}_mixed3   rows cycling "a", "b" and "__base__"

Reported: the median seconds of each arm and the median per-round ratio of each mixed arm to its single arm.
CPU: torch.set_num_threads(1) and time.thread_time; CUDA: the wall clock after synchronising.

    python benchmarks/mixed_batch_speed.py --out benchmarks/results/mixed_batch_speed_cpu.json \
        --markdown benchmarks/results/mixed_batch_speed_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_speed
import layer_speed

from comoe_peft import CoMoEConfig
from comoe_peft_launcher import positive_int

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIXES = {"single": ["a"], "mixed": ["a", "b"], "mixed3": ["a", "b", "__base__"]}
QUICK = {"model": "tiny", "batch": 6, "prompt_len": 16, "rounds": 2, "shape_layers": 2}
FULL = {"model": "smollm2-shape", "batch": 8, "prompt_len": 128, "rounds": 7, "shape_layers": 30}


def two_adapter_model(base: nn.Module, method: str, r: int, num_experts: int, top_k: int) -> nn.Module:
    """`base` with adapters "a" and "b" of `method` (comoe, or lora at r = k*r), up-projections random."""
    from peft import LoraConfig, get_peft_model

    def config():
        if method == "lora":
            return LoraConfig(r=top_k * r, lora_alpha=2 * top_k * r, target_modules=TARGETS)
        return CoMoEConfig(r=r, lora_alpha=2 * r, num_experts=num_experts, top_k=top_k, target_modules=TARGETS)

    model = get_peft_model(base, config(), adapter_name="a")
    model.add_adapter("b", config())
    for seed, name in enumerate(("a", "b"), start=1):
        up = "lora_B" if method == "lora" else "comoe_B"
        decode_speed._randomise_up_projections(model, (f"{up}.{name}",), seed=seed)
    model.set_adapter("a")
    return model.eval()


def row_names(mix: list[str], batch: int) -> list[str]:
    """The adapter of each row: `mix` repeated over the batch."""
    return [mix[i % len(mix)] for i in range(batch)]


def time_arms(models: dict[str, nn.Module], prompt: torch.Tensor, rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds of one forward of each arm, `rounds` times, the arms interleaved (after one untimed warm-up each)."""
    clock = decode_speed.make_clock(device)
    calls = {}
    for method, model in models.items():
        for mix_name, mix in MIXES.items():
            names = None if mix_name == "single" else row_names(mix, prompt.shape[0])
            calls[f"{method}_{mix_name}"] = (model, names)
    seconds: dict[str, list[float]] = {arm: [] for arm in calls}
    with torch.no_grad():
        for round_index in range(rounds + 1):
            for arm, (model, names) in calls.items():
                kwargs = {} if names is None else {"adapter_names": names}
                start = clock()
                model(prompt, **kwargs)
                if round_index:  # the first round warms up
                    seconds[arm].append(clock() - start)
    return seconds


def summarise(seconds: dict[str, list[float]]) -> dict:
    """Median seconds per arm and the median per-round ratio of every mixed arm to its method's single arm."""
    report = {"median_s": {arm: statistics.median(values) for arm, values in seconds.items()}, "ratio_to_single": {}}
    for arm, values in seconds.items():
        method, mix = arm.rsplit("_", 1)
        if mix != "single":
            ratios = [value / single for value, single in zip(values, seconds[f"{method}_single"])]
            report["ratio_to_single"][arm] = statistics.median(ratios)
    return report


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    settings = report["settings"]
    lines = [f"# Mixed-adapter batches: {settings['model']}, batch {settings['batch']} x {settings['prompt_len']} "
             f"tokens, {settings['device']}",
             "",
             f"Command: `python benchmarks/mixed_batch_speed.py {' '.join(report['meta']['argv'])}`; "
             f"{report['meta']['device_name']}, {report['meta']['threads']} thread(s), torch {report['meta']['torch']}, "
             f"peft {report['meta']['peft']}, {report['meta']['date']}.",
             "",
             "| arm | median s | ratio to the same method, one adapter for all rows |",
             "|---|---|---|"]
    for arm, value in report["median_s"].items():
        ratio = report["ratio_to_single"].get(arm)
        lines.append(f"| {arm} | {value:.4f} | {'1 (reference)' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a tiny model")
    parser.add_argument("--model", choices=sorted(decode_speed.SHAPES))
    parser.add_argument("--batch", type=positive_int, help="rows (at least 3 for every mix)")
    parser.add_argument("--prompt-len", type=positive_int)
    parser.add_argument("--rounds", type=positive_int)
    parser.add_argument("--shape-layers", type=positive_int)
    parser.add_argument("--r", type=positive_int, default=16)
    parser.add_argument("--num-experts", type=positive_int, default=4)
    parser.add_argument("--top-k", type=positive_int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch < 3:
        parser.error(f"--batch must be at least 3 so that every mix has its rows (got {args.batch})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    models = {method: two_adapter_model(decode_speed.shape_model(args.model, args.shape_layers, torch.float32),
                                        method, args.r, args.num_experts, args.top_k).to(args.device)
              for method in ("comoe", "lora")}
    vocab = models["comoe"].config.vocab_size
    prompt = decode_speed.make_prompt(vocab, args.batch, args.prompt_len, args.device)
    report = summarise(time_arms(models, prompt, args.rounds, args.device))
    report["settings"] = {name: getattr(args, name) for name in
                          ("model", "batch", "prompt_len", "rounds", "shape_layers", "r", "num_experts", "top_k",
                           "device")}
    report["meta"] = layer_speed.machine(args.device, argv)
    layer_speed.write_report(report, markdown(report), args.out, args.markdown)
    return report


if __name__ == "__main__":
    main()
