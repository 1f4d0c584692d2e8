"""Why a trained run's routers stay near uniform: drift from initialisation, gradient size and consistency, logits.

For each trained comoe / moe run folder, the script rebuilds the run's model at initialisation (same options, same
seed, the same code path as `comoe-peft train`: TRL seeds the generator right before peft creates the adapter, so
the initial weights come out identical) and compares it with the trained adapter. Per parameter kind (router,
expert A, expert B) it reports

- drift: ||W_end - W_init|| / ||W_init|| over all layers (B starts at zero: its drift is reported against A's
  initial norm, so the three numbers share a scale);
- the gradient's size (root mean square per element) at initialisation and at the end of training, over
  `--batches` training batches (the training loss: language-model loss plus CoMoE's auxiliary terms);
- the gradient's consistency ||mean_b g_b|| / mean_b ||g_b||: 1 when every batch pushes the weights the same way,
  about 1 / sqrt(batches) when the batches' gradients are uncorrelated noise. Adam normalises the step size, so
  a small gradient alone does not keep weights in place; an inconsistent one does (Adam then random-walks);
- the router logits on those batches: the per-token standard deviation across experts and the routing entropy
  (nats) it gives; for small logits the entropy is about log N - var / 2.

    python benchmarks/router_diagnosis.py benchmarks/results/quality_v2/runs/comoe-s0 \
        benchmarks/results/quality_v2/runs/moe-s0 --out benchmarks/results/quality_v2/router_diagnosis.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from comoe_peft.experiments.analysis_metrics import routing_entropy
from comoe_peft.experiments.data import train_test_split_per_task
from comoe_peft.experiments.jobs import (
    TrainOptions,
    build_trainer,
    load_base_model,
    load_mixture,
    quantization_kwargs,
)
from comoe_peft.experiments.runs import RUN_CONFIG, write_json
from comoe_peft.tuner.layer import CoMoELayer

KINDS = ("comoe_router", "comoe_A", "comoe_B")
ADAPTER_FILE = "adapter/adapter_model.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained comoe / moe run folders")
    parser.add_argument("--batches", type=int, default=8, help="training batches for the gradient statistics")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here as well")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error("--batches must be at least 2 (the consistency compares batches)")
    return args


def check_run_folders(runs: list[Path]) -> None:
    """Exit 2 with one line when a folder is not a finished run (before anything is loaded)."""
    for run in runs:
        if not (run / RUN_CONFIG).is_file() or not (run / ADAPTER_FILE).is_file():
            print(f"router_diagnosis.py: error: {run} is not a finished comoe / moe run folder (needs {RUN_CONFIG} "
                  f"and {ADAPTER_FILE}); pass the run folders quality.py made", file=sys.stderr)
            raise SystemExit(2)


def run_options(run_dir: Path, scratch: Path) -> TrainOptions:
    """The run's training options, writing into `scratch`, without checkpoints or routing probes."""
    stored = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))["options"]
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {name: value for name, value in stored.items() if name in known}
    values |= {"output_dir": str(scratch / "run"), "overwrite": True, "save_steps": None, "routing_eval_steps": []}
    return TrainOptions(**values).resolved()


def initial_trainer(options: TrainOptions, scratch: Path):
    """The run's trainer with its model at initialisation (built exactly as `comoe-peft train` builds it)."""
    mixture = load_mixture(options)
    splits = train_test_split_per_task(mixture, options.test_size, options.seed, options.max_train_per_task)
    quantization = quantization_kwargs(options.load_in_4bit, options.load_in_8bit)
    _, model, tokenizer = load_base_model(options.model, options.cache_dir, quantization)
    return build_trainer(options, model, tokenizer, splits["train"], scratch / "trainer")


def kind_of(name: str) -> str | None:
    return next((kind for kind in KINDS if f".{kind}" in name), None)


def drift(initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative change per kind, over all layers: ||end - init|| / ||init|| (B: against A's initial norm)."""
    squares = {kind: [0.0, 0.0] for kind in KINDS}  # kind -> [sum (end - init)^2, sum init^2]
    for name, start in initial.items():
        kind = kind_of(name)
        if kind is None:
            continue
        if name not in trained:
            raise SystemExit(f"{name} is in the rebuilt model but not in the trained adapter: not the same setup")
        squares[kind][0] += (trained[name].float() - start.float()).pow(2).sum().item()
        squares[kind][1] += start.float().pow(2).sum().item()
    squares["comoe_B"][1] = squares["comoe_A"][1]
    return {kind: math.sqrt(change / reference) for kind, (change, reference) in squares.items() if reference}


def batch_gradients(trainer, batches: list[dict[str, torch.Tensor]], bf16: bool) -> dict[str, list[torch.Tensor]]:
    """Per kind, one flattened gradient per batch (all layers concatenated)."""
    model = trainer.model
    model.train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad and kind_of(name)}
    grads: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        for kind in KINDS:
            parts = [p.grad.detach().float().flatten() for name, p in params.items()
                     if kind_of(name) == kind and p.grad is not None]
            if parts:
                grads[kind].append(torch.cat(parts))
    model.zero_grad(set_to_none=True)
    return grads


def gradient_summary(grads: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per kind: RMS per element (mean over batches) and consistency ||mean g|| / mean ||g|| (0 when all zero)."""
    summary = {}
    for kind, per_batch in grads.items():
        if not per_batch:
            continue
        stacked = torch.stack(per_batch)  # (batches, params)
        norms = stacked.norm(dim=1)  # (batches,)
        mean_norm = norms.mean().item()
        summary[kind] = {
            "rms": (norms / math.sqrt(stacked.shape[1])).mean().item(),
            "consistency": stacked.mean(dim=0).norm().item() / mean_norm if mean_norm > 0 else 0.0,
        }
    return summary


def router_logit_spread(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-token std of the router logits across experts and the routing entropy, averaged over layers and tokens."""
    layers = [m for m in model.modules() if isinstance(m, CoMoELayer) and m.comoe_router]
    stds, entropies = [], []

    def hook(module, inputs):
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (T, d_in)
        logits = x @ module.comoe_router[module.active_adapters[0]].detach().float().T  # (T, N)
        stds.append(logits.std(dim=-1).mean().item())
        entropies.append(routing_entropy(logits.softmax(dim=-1)))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        for handle in handles:
            handle.remove()
    return {"logit_std": sum(stds) / len(stds), "routing_entropy": sum(entropies) / len(entropies)}


def diagnose(run_dir: Path, num_batches: int) -> dict[str, Any]:
    """All of the module docstring's numbers for one run folder."""
    with tempfile.TemporaryDirectory() as scratch:
        options = run_options(run_dir, Path(scratch))
        if options.method not in ("comoe", "moe"):
            raise SystemExit(f"{run_dir} is a {options.method} run; the diagnosis is for comoe / moe runs")
        trainer = initial_trainer(options, Path(scratch))
        batches = [b for b, _ in zip(trainer.get_train_dataloader(), range(num_batches))]
        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
        trained = load_file(str(run_dir / ADAPTER_FILE))
        at_init = gradient_summary(batch_gradients(trainer, batches, bool(options.bf16)))
        spread_init = router_logit_spread(trainer.model, batches)
        set_peft_model_state_dict(trainer.model, trained)
        at_end = gradient_summary(batch_gradients(trainer, batches, bool(options.bf16)))
        spread_end = router_logit_spread(trainer.model, batches)
    num_experts = options.num_experts
    return {
        "run": str(run_dir), "method": options.method, "seed": options.seed,
        "router_lr_multiplier": options.router_lr_multiplier, "learning_rate": options.learning_rate,
        "max_steps": options.max_steps, "batches": num_batches, "drift": drift(initial, trained),
        "gradient_at_init": at_init, "gradient_at_end": at_end,
        "router_logits_at_init": spread_init, "router_logits_at_end": spread_end,
        "uniform_entropy": math.log(num_experts),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table row per run and parameter kind."""
    lines = ["| run | kind | drift | grad RMS init | grad RMS end | consistency init | consistency end |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        name = Path(row["run"]).name
        for kind in KINDS:
            start, end = row["gradient_at_init"].get(kind, {}), row["gradient_at_end"].get(kind, {})
            lines.append(f"| {name} | {kind.removeprefix('comoe_')} | {row['drift'].get(kind, float('nan')):.3f} | "
                         f"{start.get('rms', 0):.2e} | {end.get('rms', 0):.2e} | {start.get('consistency', 0):.2f} | "
                         f"{end.get('consistency', 0):.2f} |")
    lines += ["", "| run | logit std init | logit std end | entropy init | entropy end | log N |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        start, end = row["router_logits_at_init"], row["router_logits_at_end"]
        lines.append(f"| {Path(row['run']).name} | {start['logit_std']:.3f} | {end['logit_std']:.3f} | "
                     f"{start['routing_entropy']:.3f} | {end['routing_entropy']:.3f} | {row['uniform_entropy']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    check_run_folders(args.runs)
    rows = [diagnose(run, args.batches) for run in args.runs]
    if args.out:
        write_json(args.out, {"batches": args.batches, "runs": rows})
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
