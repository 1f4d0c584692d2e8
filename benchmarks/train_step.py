"""Whole training steps (forward, backward, AdamW step): CoMoE against peft LoRA and a loop MoE-LoRA.

Models: a tiny random Llama built from a LlamaConfig (hidden 256, 4 layers, vocab 8192) and, unless --quick, the
converted SmolLM2-135M from `comoe_peft.experiments.pretrained` when it is available. Targets q, k, v, o in every layer.

Arms (one copy of the model each, all in one process, interleaved round by round like `layer_speed.py`):

    lora_matched   peft LoRA with r chosen so its trainable parameters match CoMoE's (about N*r)
    lora_kr        peft LoRA at r = k*r (the same active rank as CoMoE)
    loop           mixture of LoRA experts with a Python loop over experts (`layer_speed.LoopMoELoRA`) replacing
                   q, k, v, o; no peft
    comoe          CoMoE through get_peft_model, contrastive loss off
    comoe_con      CoMoE, contrastive loss on (coefficient 0.01, every inactive expert a negative)
    (--prototype)  comoe_proto / comoe_con_proto: the same with the layer of `benchmarks/prototypes.py`
    (--blocks)     FFN-block experts on the MLP instead of q, k, v, o: lora_mlp_kr (peft LoRA on gate, up, down at
                   r = k*r), block (CoMoE with target_modules=["mlp"], contrastive loss off) and block_con
                   (contrastive loss on, one sampled negative), reported against lora_mlp_kr

Config (the issue's): N=4, k=2, r=16, lora_alpha=32, batch 8 x seq 128. Reported: median per-round ratios of the
step time to lora_matched and to lora_kr, the bytes saved for backward by the forward (unique storages, parameters
left out), trainable parameters, and on CUDA the peak memory of a step. CPU: torch.set_num_threads(1),
time.thread_time; CUDA: CUDA events.

    python benchmarks/train_step.py --quick --out benchmarks/results/train_step_cpu.json \
        --markdown benchmarks/results/train_step_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_speed

from comoe_peft.tuner.files import write_json_atomic, write_text_atomic
from comoe_peft import CoMoEConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ARMS = ("lora_matched", "lora_kr", "loop", "comoe", "comoe_con")
PROTOTYPE_ARMS = ("comoe_proto", "comoe_con_proto")
QUICK = {"models": ["tiny"], "batch": 8, "seq": 128, "rounds": 5, "reps": 1}
FULL = {"models": ["tiny", "smollm2"], "batch": 8, "seq": 128, "rounds": 7, "reps": 1}


# ---------------------------------------------------------------------------------------------- models


def tiny_llama(seed: int = 0, vocab: int = 8192, hidden: int = 256, layers: int = 4) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def smollm2() -> nn.Module | None:
    """The converted SmolLM2-135M, or None when `comoe_peft.experiments.pretrained` or the GGUF package is missing."""
    try:
        from comoe_peft.experiments.pretrained import ensure_default_model
    except ImportError as error:
        print(f"SmolLM2-135M skipped: comoe_peft.experiments.pretrained is not importable ({error})")
        return None
    try:
        folder = ensure_default_model()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        print(f"SmolLM2-135M skipped: {error}")
        return None
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- arms


def comoe_config(args: argparse.Namespace, contrastive: bool) -> CoMoEConfig:
    return CoMoEConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=args.dropout,
        num_experts=args.num_experts,
        top_k=args.top_k,
        target_modules=list(TARGETS),
        contrastive_loss_coef=0.01 if contrastive else 0.0,
    )


def comoe_trainable(model: nn.Module, args: argparse.Namespace) -> int:
    """CoMoE's trainable parameters on `model`: N*r*(d_in + d_out) + N*d_in per target."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in TARGETS:
            d_in, d_out = module.in_features, module.out_features
            total += args.num_experts * args.r * (d_in + d_out) + args.num_experts * d_in
    return total


def matched_lora_rank(model: nn.Module, args: argparse.Namespace) -> int:
    """The LoRA rank whose trainable parameters come closest to CoMoE's."""
    per_rank = sum(
        module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in TARGETS
    )
    return max(1, round(comoe_trainable(model, args) / per_rank))


def with_loop_experts(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Replace q, k, v, o by `LoopMoELoRA` wrappers (experts initialised like CoMoE: A Kaiming, B random small)."""
    model.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in TARGETS
    ]
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        wrapper = layer_speed.LoopMoELoRA(module, args.num_experts, args.top_k, args.r, 2.0)
        nn.init.normal_(wrapper.router.weight, std=0.02)
        for lora_b in wrapper.lora_B:
            nn.init.normal_(lora_b.weight, std=0.01)
        setattr(parent, name.rsplit(".", 1)[1], wrapper)
    return model


def to_prototype(model: nn.Module) -> nn.Module:
    """Swap every CoMoE layer's class for `prototypes.PrototypeLinear` (same parameters, the fused Functions)."""
    import prototypes

    from comoe_peft.tuner.layer import Linear as CoMoELinear

    for module in model.modules():
        if isinstance(module, CoMoELinear):
            module.__class__ = prototypes.PrototypeLinear
            module.dense_contrastive = True
            module.aux_losses = ()
    return model


def build_arms(base_model: nn.Module, args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict]:
    from peft import LoraConfig, get_peft_model

    info = {"lora_matched_r": matched_lora_rank(base_model, args), "lora_kr_r": args.top_k * args.r}
    arms: dict[str, nn.Module] = {}
    for name, rank in (("lora_matched", info["lora_matched_r"]), ("lora_kr", info["lora_kr_r"])):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=args.dropout, target_modules=list(TARGETS))
        arms[name] = get_peft_model(copy.deepcopy(base_model), config)
    arms["loop"] = with_loop_experts(copy.deepcopy(base_model), args)
    arms["comoe"] = get_peft_model(copy.deepcopy(base_model), comoe_config(args, contrastive=False))
    arms["comoe_con"] = get_peft_model(copy.deepcopy(base_model), comoe_config(args, contrastive=True))
    if args.blocks:
        config = LoraConfig(r=args.top_k * args.r, lora_alpha=2 * args.top_k * args.r, lora_dropout=args.dropout,
                            target_modules=list(MLP_PROJECTIONS))
        arms["lora_mlp_kr"] = get_peft_model(copy.deepcopy(base_model), config)
        for arm, contrastive in (("block", False), ("block_con", True)):
            config = dataclasses.replace(comoe_config(args, contrastive), target_modules=["mlp"],
                                         num_negatives=1 if contrastive else None)
            arms[arm] = get_peft_model(copy.deepcopy(base_model), config)
    if args.prototype:
        arms["comoe_proto"] = to_prototype(get_peft_model(copy.deepcopy(base_model), comoe_config(args, False)))
        arms["comoe_con_proto"] = to_prototype(get_peft_model(copy.deepcopy(base_model), comoe_config(args, True)))
    for module in arms.values():
        module.to(args.device).train()
    return arms, info


# ---------------------------------------------------------------------------------------------- one step


def make_step(model: nn.Module, batch: dict, lr: float = 1e-4) -> tuple[Callable[[], torch.Tensor], Callable]:
    """(forward, update): forward returns the loss (task + CoMoE's weighted aux losses); update runs backward and
    an AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    get_aux_loss = getattr(getattr(model, "base_model", None), "get_aux_loss", None)

    def forward() -> torch.Tensor:
        loss = model(**batch).loss
        aux = get_aux_loss() if callable(get_aux_loss) else None
        return loss if aux is None else loss + aux

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, update


def make_batch(vocab: int, batch: int, seq: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}


# ---------------------------------------------------------------------------------------------- one model


def run_model(name: str, base_model: nn.Module, args: argparse.Namespace) -> dict:
    arms, info = build_arms(base_model, args)
    names = tuple(arms)
    batch = make_batch(base_model.config.vocab_size, args.batch, args.seq, args.device)
    steps = {arm: make_step(module, batch) for arm, module in arms.items()}
    saved, peaks, losses = {}, {}, {}
    for arm, (forward, update) in steps.items():
        saved[arm] = layer_speed.saved_bytes(forward, update, list(arms[arm].parameters()))
        peaks[arm] = layer_speed.peak_memory(forward, update, args.device)
        loss = forward()
        losses[arm] = loss.item()
        update(loss)
    times: dict[str, list[float]] = {arm: [] for arm in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for arm in names[shift:] + names[:shift]:
            times[arm].append(layer_speed.time_steps(*steps[arm], args.reps, args.device))
    result_arms = {}
    for arm in names:
        result_arms[arm] = {
            "median_seconds": statistics.median(times[arm]),
            "ratio_to_lora_matched": layer_speed.median_ratio(times, arm, "lora_matched"),
            "ratio_to_lora_kr": layer_speed.median_ratio(times, arm, "lora_kr"),
            **({"ratio_to_lora_mlp_kr": layer_speed.median_ratio(times, arm, "lora_mlp_kr")}
               if "lora_mlp_kr" in times else {}),
            "saved_bytes": saved[arm],
            "peak_cuda_bytes": peaks[arm],
            "trainable_params": sum(p.numel() for p in arms[arm].parameters() if p.requires_grad),
            "loss": losses[arm],
            "seconds_per_round": times[arm],
        }
    con = result_arms["comoe_con"]["ratio_to_lora_matched"]
    return {
        "model": name,
        "params": sum(p.numel() for p in base_model.parameters()),
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "reps": args.reps,
        **info,
        "arms": result_arms,
        "targets": {"comoe_con_le_1.15x_lora_matched": con <= 1.15},
    }


# ---------------------------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Whole training step (forward, backward, AdamW step)",
        "",
        (
            f"{meta['device_name']}; torch {meta['torch']}; timer: {meta['timer']}; threads: {meta['threads']}; "
            f"CoMoE N={meta['num_experts']}, k={meta['top_k']}, r={meta['r']}, dropout {meta['dropout']}; "
            "targets q, k, v, o; medians of per-round ratios over interleaved rounds."
        ),
        "",
        "| model | arm | trainable params | s / step | vs LoRA matched | vs LoRA r=k*r | saved for backward (MB) |"
        + (" peak CUDA (MB) |" if meta["device"] == "cuda" else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if meta["device"] == "cuda" else ""),
    ]
    for result in report["results"]:
        for arm, values in result["arms"].items():
            label = arm
            if arm == "lora_matched":
                label = f"lora_matched (r={result['lora_matched_r']})"
            elif arm == "lora_kr":
                label = f"lora_kr (r={result['lora_kr_r']})"
            row = (
                f"| {result['model']} ({result['params'] / 1e6:.1f}M, {result['batch']}x{result['seq']}) | {label} "
                f"| {values['trainable_params']:,} | {values['median_seconds']:.3f} "
                f"| {values['ratio_to_lora_matched']:.3f} | {values['ratio_to_lora_kr']:.3f} "
                f"| {values['saved_bytes'] / 1e6:.1f} |"
            )
            if meta["device"] == "cuda":
                row += f" {(values['peak_cuda_bytes'] or 0) / 1e6:.0f} |"
            lines.append(row)
    lines += ["", "Target: CoMoE with the contrastive loss <= 1.15x LoRA at matched parameters.", ""]
    for result in report["results"]:
        ok = result["targets"]["comoe_con_le_1.15x_lora_matched"]
        ratio = result["arms"]["comoe_con"]["ratio_to_lora_matched"]
        lines.append(f"- {result['model']}: {ratio:.3f} ({'met' if ok else 'MISSED'})")
    blocks = [r for r in report["results"] if "lora_mlp_kr" in r["arms"]]
    if blocks:
        lines += ["", "FFN-block experts on the MLP (`--blocks`), against peft LoRA on gate, up, down at r = k*r "
                  "(target: block <= 1.3x):", ""]
        for result in blocks:
            arms = result["arms"]
            lines.append(f"- {result['model']}: block {arms['block']['ratio_to_lora_mlp_kr']:.3f}, block_con "
                         f"{arms['block_con']['ratio_to_lora_mlp_kr']:.3f}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny model only, few rounds: {QUICK}")
    parser.add_argument("--models", nargs="+", choices=["tiny", "smollm2"])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--tiny-hidden", type=int, default=256)
    parser.add_argument("--tiny-layers", type=int, default=4)
    parser.add_argument("--tiny-vocab", type=int, default=8192)
    parser.add_argument("--prototype", action="store_true", help="also time the prototype layer of prototypes.py")
    parser.add_argument("--blocks", action="store_true",
                        help="also time FFN-block experts on the MLP against peft LoRA on gate, up, down at r = k*r")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    args.argv = argv
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = "cpu" if device == "auto" else device
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    import peft

    meta = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "device_name": layer_speed.device_name(args.device),
        "threads": torch.get_num_threads(),
        "timer": "CUDA events" if args.device == "cuda" else "time.thread_time",
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "r": args.r,
        "dropout": args.dropout,
        "argv": sys.argv[1:] if args.argv is None else args.argv,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    report = {"meta": meta, "results": []}
    for model_name in args.models:
        if model_name == "tiny":
            model = tiny_llama(vocab=args.tiny_vocab, hidden=args.tiny_hidden, layers=args.tiny_layers)
        else:
            model = smollm2()
            if model is None:
                continue
        began = time.perf_counter()
        result = run_model(model_name, model, args)
        result["wall_seconds"] = time.perf_counter() - began
        report["results"].append(result)
        print(
            f"{model_name}: "
            + " ".join(f"{arm}={v['ratio_to_lora_matched']:.3f}" for arm, v in result["arms"].items())
            + f" (vs lora_matched r={result['lora_matched_r']}; {result['wall_seconds']:.0f} s)",
            flush=True,
        )
    table = markdown(report)
    print(table)
    if args.out:
        write_json_atomic(args.out, report)
    if args.markdown:
        write_text_atomic(args.markdown, table)
    return report


if __name__ == "__main__":
    main()
