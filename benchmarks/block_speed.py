"""Speed of routed FFN-block experts (`target_modules=["mlp"]`) against peft LoRA and a loop MixLoRA, on one MLP.

The block arms of the layer benchmark (`layer_speed.py`, whose protocol and timers this script uses: every arm in
one process, interleaved round by round with the order rotating, the median over rounds of per-round ratios, one
thread, `time.thread_time`). One step is forward + backward of a Llama-style gated MLP block on a 3-D input
(tokens // 128, 128, d) that requires grad, backward with a fixed random output gradient (plus 0.01 * the
contrastive loss for the arm that has it).

Arms (the same frozen block, input and output gradient):

    base          the frozen MLP alone
    lora_kr       real peft LoRA on gate_proj, up_proj and down_proj at r = k*r (the active rank of the experts)
    loop          MixLoRA the MoE-PEFT way: route, then a loop over experts; every active expert runs the whole
                  MLP with its LoRA (written here; checked against `Block`)
    block         `comoe_peft.tuner.block.Block` in train mode, contrastive loss off (MoE-LoRA on blocks)
    block_con     ... contrastive loss on, one sampled negative per token (num_negatives=1)

Decoding (`--decode-tokens`, forward only, eval mode, no grad): `lora_kr` against `block` on the lean path.

    python benchmarks/block_speed.py --quick
    python benchmarks/block_speed.py --shapes smollm2 d2048 --out benchmarks/results/block_speed_cpu.json \
        --markdown benchmarks/results/block_speed_cpu.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from layer_speed import machine, median_ratio, saved_bytes, time_steps, write_report
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from comoe_peft.tuner.block import Block
from comoe_peft.tuner.layer import ExpertSettings

# (d, d_ff): SmolLM2-135M's MLP; a 1B-class Llama MLP; a tiny one for the tests
SHAPES = {"smollm2": (576, 1536), "d2048": (2048, 5632), "tiny": (32, 64)}
ARMS = ("base", "lora_kr", "loop", "block", "block_con")
SEQ_LEN = 128
TARGETS = {"block_le_1.3x_lora_kr": 1.3, "decode_le_1.15x_lora_kr": 1.15}


class _Holder(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


def frozen_mlp(d: int, d_ff: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=d_ff)).requires_grad_(False)


def peft_lora_mlp(mlp: nn.Module, r: int) -> nn.Module:
    """Real peft LoRA on the MLP's three projections (random B, so the adapter does real work)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False)
    return get_peft_model(_Holder(mlp), config).base_model.model.mlp


def block_experts(mlp: nn.Module, num_experts: int, top_k: int, r: int, contrastive: bool) -> Block:
    settings = ExpertSettings(num_experts, top_k, 0.0, contrastive, 0.1, 1 if contrastive else None, "random")
    return Block(mlp, "default", r=r, lora_alpha=2 * r, lora_dropout=0.0, settings=settings, init_weights=False)


class LoopMixLoRA(nn.Module):
    """MixLoRA computed as MoE-PEFT does: per expert, its tokens are gathered and sent through the whole MLP with
    that expert's LoRA on gate, up and down; the weighted outputs are `index_add`-ed. Shares `block`'s weights."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, mlp = self.block, self.block.get_base_layer()
        settings, r, s = block.comoe_settings["default"], block.r["default"], block.scaling["default"]
        num_experts = settings.num_experts
        tokens = x.reshape(-1, x.shape[-1])  # (T, d)
        logits = tokens.float() @ block.comoe_router["default"].float().t()  # (T, N)
        weights, selected = logits.softmax(-1).topk(settings.top_k, dim=-1)  # (T, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(tokens.dtype)
        down, up = block.comoe_A["default"], block.comoe_B["default"]
        down_out, up_out = block.comoe_A_out["default"], block.comoe_B_out["default"]
        out = torch.zeros_like(tokens)
        for e in range(num_experts):
            token_pos, slot = torch.where(selected == e)
            t = tokens[token_pos]
            gate = mlp.gate_proj(t) + s * (t @ down[e * r:(e + 1) * r].t()) @ up[0][:, e * r:(e + 1) * r].t()
            upper = mlp.up_proj(t) + s * (t @ down[(num_experts + e) * r:(num_experts + e + 1) * r].t()) \
                @ up[1][:, e * r:(e + 1) * r].t()
            hidden = mlp.act_fn(gate) * upper
            y = mlp.down_proj(hidden) + s * (hidden @ down_out[e * r:(e + 1) * r].t()) @ up_out[:, e * r:(e + 1) * r].t()
            out = out.index_add(0, token_pos, y * weights[token_pos, slot, None])
        return out.view(x.shape)


def build_arms(d: int, d_ff: int, num_experts: int, top_k: int, r: int, seed: int = 0) -> dict[str, nn.Module]:
    arms = {"base": frozen_mlp(d, d_ff, seed), "lora_kr": peft_lora_mlp(frozen_mlp(d, d_ff, seed), top_k * r)}
    torch.manual_seed(seed + 1)
    arms["block"] = block_experts(frozen_mlp(d, d_ff, seed), num_experts, top_k, r, contrastive=False).train()
    arms["loop"] = LoopMixLoRA(arms["block"]).train()
    torch.manual_seed(seed + 1)
    arms["block_con"] = block_experts(frozen_mlp(d, d_ff, seed), num_experts, top_k, r, contrastive=True).train()
    return arms


def check_block_against_loop(block: Block, loop: LoopMixLoRA, d: int) -> float:
    """Largest absolute difference of the outputs on 64 tokens (float32)."""
    x = torch.randn(1, 64, d)
    with torch.no_grad():
        return float((block(x) - loop(x)).abs().max())


def make_step(name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def forward():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        if name == "block_con":
            return out, module.recorded_aux_losses("default")["contrastive"]
        return out

    def backward(value):
        if name == "block_con":
            out, con = value
            torch.autograd.backward([out, con], [grad_out, torch.tensor(0.01)])
        else:
            value.backward(grad_out)

    return forward, backward


def decode_ratio(arms: dict[str, nn.Module], d: int, tokens: int, rounds: int, reps: int) -> float:
    """Median ratio block / lora_kr of forward-only eval steps on `tokens` tokens (a decoding step's batch)."""
    x = torch.randn(tokens, 1, d)
    steps = {}
    for name in ("lora_kr", "block"):
        module = arms[name].eval()
        steps[name] = (lambda m=module: m(x), lambda _: None)
    times = {name: [] for name in steps}
    with torch.no_grad():
        for _ in range(2):
            for forward, _ in steps.values():
                forward()
        for round_index in range(rounds):
            for name in (list(steps) if round_index % 2 == 0 else list(steps)[::-1]):
                times[name].append(time_steps(*steps[name], reps, "cpu"))
    for name in ("lora_kr", "block"):
        arms[name].train()
    return median_ratio(times, "block", "lora_kr")


def run_shape(shape: str, tokens: int, num_experts: int, top_k: int, r: int, rounds: int, reps: int,
              decode_tokens: int) -> dict:
    d, d_ff = SHAPES[shape]
    arms = build_arms(d, d_ff, num_experts, top_k, r)
    difference = check_block_against_loop(arms["block"], arms["loop"], d)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(tokens // SEQ_LEN, SEQ_LEN, d, generator=generator).requires_grad_(True)
    grad_out = torch.randn(tokens // SEQ_LEN, SEQ_LEN, d, generator=generator)
    steps = {name: make_step(name, module, x, grad_out) for name, module in arms.items()}
    saved = {name: saved_bytes(*steps[name], [x, *arms[name].parameters()]) for name in ARMS}
    for forward, backward in steps.values():
        backward(forward())
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for round_index in range(rounds):
        shift = round_index % len(ARMS)
        for name in ARMS[shift:] + ARMS[:shift]:
            times[name].append(time_steps(*steps[name], reps, "cpu"))
    results = {name: {"median_seconds": statistics.median(times[name]),
                      "ratio_to_base": median_ratio(times, name, "base"),
                      "ratio_to_lora_kr": median_ratio(times, name, "lora_kr"),
                      "saved_bytes": saved[name],
                      "trainable_params": sum(p.numel() for p in arms[name].parameters() if p.requires_grad)}
               for name in ARMS}
    decode = decode_ratio(arms, d, decode_tokens, rounds, max(reps, 20))
    return {"shape": shape, "d": d, "d_ff": d_ff, "tokens": tokens, "num_experts": num_experts, "top_k": top_k,
            "r": r, "rounds": rounds, "reps": reps, "max_abs_difference_block_vs_loop": difference,
            "arms": results, "decode_tokens": decode_tokens, "decode_ratio_block_to_lora_kr": decode,
            "targets": {"block_le_1.3x_lora_kr": results["block"]["ratio_to_lora_kr"] <= 1.3,
                        "decode_le_1.15x_lora_kr": decode <= 1.15}}


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["# Block experts: speed on one MLP block (forward + backward)", "",
             f"Command: `python benchmarks/block_speed.py {' '.join(meta['argv'])}`  ",
             f"Machine: {meta['device_name']}, {meta['threads']} thread, torch {meta['torch']}, peft {meta['peft']}, "
             f"{meta['date']}; float32; timer {meta['timer']}.", "",
             "| shape | T | N, k, r | block / LoRA k*r | block_con / LoRA k*r | loop / LoRA k*r | block / base "
             "| decode block / LoRA | saved MiB block, LoRA, loop |", "|---|---|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        arms = res["arms"]
        mib = ", ".join(f"{arms[a]['saved_bytes'] / 2**20:.0f}" for a in ("block", "lora_kr", "loop"))
        lines.append(f"| {res['shape']} ({res['d']}->{res['d_ff']}) | {res['tokens']} | {res['num_experts']}, "
                     f"{res['top_k']}, {res['r']} | {arms['block']['ratio_to_lora_kr']:.2f} | "
                     f"{arms['block_con']['ratio_to_lora_kr']:.2f} | {arms['loop']['ratio_to_lora_kr']:.2f} | "
                     f"{arms['block']['ratio_to_base']:.2f} | {res['decode_ratio_block_to_lora_kr']:.2f} "
                     f"(T={res['decode_tokens']}) | {mib} |")
    lines += ["", "Targets: block <= 1.3x LoRA at r = k*r (forward + backward), decode <= 1.15x. Met: "
              + "; ".join(f"{r['shape']}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["targets"].items())
                          for r in report["results"]) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smollm2 only, 256 tokens, 2 rounds")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["smollm2", "d2048"])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (a multiple of 128)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.shapes, args.tokens, args.rounds, args.reps = ["smollm2"], 256, 2, 1
    if args.tokens % SEQ_LEN:
        parser.error(f"--tokens must be a multiple of {SEQ_LEN}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    report = {"meta": machine("cpu", args.argv), "results": []}
    for shape in args.shapes:
        began = time.perf_counter()
        result = run_shape(shape, args.tokens, args.experts, args.top_k, args.r, args.rounds, args.reps,
                           args.decode_tokens)
        result["wall_seconds"] = time.perf_counter() - began
        report["results"].append(result)
        print(f"{shape}: block/LoRA_kr {result['arms']['block']['ratio_to_lora_kr']:.2f} "
              f"({result['wall_seconds']:.0f} s)", flush=True)
    write_report(report, markdown(report), args.out, args.markdown)
    return report


if __name__ == "__main__":
    main()
