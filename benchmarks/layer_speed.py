"""Speed and memory of one adapted linear layer: CoMoE against the frozen base, peft LoRA and a loop MoE-LoRA.

The protocol of `shared/design/fast-layer.md`: every arm lives in one process and the arms are interleaved round by
round (the order rotates each round), so a slow moment of a shared machine hits every arm alike. Each measurement is
one forward + backward of the layer on a 3-D input (tokens // 128, 128, d_in) that requires grad, as inside a model;
a round's time of an arm is the mean over `--reps` steps (raised for short steps, see --min-time). Reported: the median
over rounds of the per-round ratio to the frozen base layer and to peft LoRA at rank k*r, the bytes the autograd graph
saves for backward (unique storages, parameters and the input left out), and on CUDA the peak memory.

Arms (same frozen base layer, inputs and output gradient):

    base               the frozen nn.Linear alone
    lora_kr            real peft LoRA (`peft.tuners.lora.Linear` from get_peft_model) at r = k*r, the same active rank
    lora_nr            real peft LoRA at r = N*r, the same parameter count as the experts
    loop               mixture of LoRA experts the MoLA / MixLoRA way: route, then a Python loop over the experts
                       with torch.where / index_add (written here; also the correctness oracle)
    comoe              `comoe_peft.tuner.layer.Linear` in train mode, contrastive loss off
    comoe_con          ... contrastive loss on, every inactive expert a negative
    comoe_con_sampled  ... contrastive loss on, m sampled negatives (m = 2, or 1 when N - k <= 2)
    dora_kr            real peft DoRA (LoraConfig(use_dora=True)) at r = k*r
    comoe_dora         `comoe_peft.tuner.layer.Linear` with DoRA experts (use_dora), contrastive loss off
    comoe_dora_con     ... contrastive loss on, every inactive expert a negative

The backward is `torch.autograd.backward([out, contrastive], [grad_out, 0.01])`, i.e. the gradient of
loss = <out, grad_out> + 0.01 * contrastive with a fixed random grad_out; `--loss pow2` uses
loss = out.pow(2).mean() + 0.01 * contrastive instead (adds the same two full-width passes to every arm, which pulls
every ratio towards 1).

Before timing a case, CoMoE (contrastive off) is checked against the loop arm in float64 on the same weights and
routing: outputs and the gradients of x, A, B and the router.

CPU: torch.set_num_threads(1) and time.thread_time. CUDA: CUDA events and torch.cuda.max_memory_allocated.

    python benchmarks/layer_speed.py --quick
    python benchmarks/layer_speed.py --cases d576:2048:8 d2048:2048:8 mlp_up:2048:8 d576:512:8 d576:2048:4 \
        --dtypes fp32 bf16 --out benchmarks/results/layer_speed_cpu.json --markdown benchmarks/results/layer_speed_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comoe_peft.tuner.files import write_json_atomic, write_text_atomic
from comoe_peft.tuner.layer import ExpertSettings
from comoe_peft.tuner.layer import Linear as CoMoELinear

ARMS = (
    "base", "lora_kr", "lora_nr", "loop", "comoe", "comoe_con", "comoe_con_sampled", "dora_kr", "comoe_dora",
    "comoe_dora_con",
)
ARM_LABELS = {
    "base": "frozen base",
    "lora_kr": "peft LoRA r=k*r",
    "lora_nr": "peft LoRA r=N*r",
    "loop": "loop MoE-LoRA",
    "comoe": "CoMoE",
    "comoe_con": "CoMoE + con (all neg)",
    "comoe_con_sampled": "CoMoE + con (m neg)",
    "dora_kr": "peft DoRA r=k*r",
    "comoe_dora": "CoMoE-DoRA",
    "comoe_dora_con": "CoMoE-DoRA + con",
}
SHAPES = {"d576": (576, 576), "d2048": (2048, 2048), "mlp_up": (576, 1536)}
DTYPES = {
    "fp32": (torch.float32, torch.float32),  # (base and input dtype, adapter dtype)
    "bf16": (torch.bfloat16, torch.bfloat16),
    # what get_peft_model does to a bf16 model by default (autocast_adapter_dtype=True): adapters upcast to fp32
    "bf16_fp32adapters": (torch.bfloat16, torch.float32),
}
CONTRASTIVE_COEF = 0.01
TEMPERATURE = 0.1
SEQ_LEN = 128  # the input is (tokens // SEQ_LEN, SEQ_LEN, d_in)
CHECK_TOKENS = 512  # tokens of the float64 correctness check (the code path does not depend on T)

QUICK = {"shapes": ["d576"], "tokens": [2048], "experts": [4, 8], "dtypes": ["fp32", "bf16"], "rounds": 5, "reps": 1}
FULL = {
    "shapes": ["d576", "d2048", "mlp_up"],
    "tokens": [2048],
    "experts": [8],
    "dtypes": ["fp32", "bf16"],
    "rounds": 11,
    "reps": 1,
}
MIN_MEASURE_SECONDS = 0.05  # more steps per measurement when one step is shorter than this


@dataclass(frozen=True)
class Case:
    shape: str
    d_in: int
    d_out: int
    tokens: int
    num_experts: int
    top_k: int
    r: int
    dtype: str
    device: str

    def label(self) -> str:
        return f"{self.shape} ({self.d_in}->{self.d_out}) T={self.tokens} N={self.num_experts} {self.dtype}"


# ---------------------------------------------------------------------------------------------- the loop arm


class LoopMoELoRA(nn.Module):
    """A mixture of LoRA experts computed the MoLA / MixLoRA / Mixtral way, for comparison.

    Router logits in the model dtype, softmax in float32, top-k renormalised; then, per expert, `torch.where` finds
    its tokens, they are gathered, sent through B_e A_e, weighted, and `index_add`-ed into a zero tensor that is
    finally added to the frozen output.
    """

    def __init__(self, base: nn.Module, num_experts: int, top_k: int, r: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.top_k = top_k
        self.scaling = scaling
        d_in, d_out = base.in_features, base.out_features
        self.router = nn.Linear(d_in, num_experts, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False) for _ in range(num_experts))
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(num_experts))

    @torch.no_grad()
    def copy_from(self, layer: CoMoELinear, adapter_name: str = "default") -> LoopMoELoRA:
        """Take the experts and router of a CoMoE layer (same routing, same outputs)."""
        r = layer.r[adapter_name]
        for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            a.weight.copy_(layer.comoe_A[adapter_name][e * r : (e + 1) * r])
            b.weight.copy_(layer.comoe_B[adapter_name][:, e * r : (e + 1) * r])
        self.router.weight.copy_(layer.comoe_router[adapter_name])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        tokens = x.reshape(-1, x.shape[-1])  # (T, d_in)
        adapter_dtype = self.lora_A[0].weight.dtype
        tokens = tokens.to(adapter_dtype)
        router_logits = self.router(tokens)  # (T, N)
        router_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        routing_weights = F.softmax(router_logits, dim=-1, dtype=router_dtype)  # (T, N)
        routing_weights, selected = routing_weights.topk(self.top_k, dim=-1)  # (T, k)
        if self.top_k > 1:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(tokens.dtype)
        expert_mask = F.one_hot(selected, num_classes=len(self.lora_A)).permute(2, 1, 0)  # (N, k, T)
        delta = torch.zeros(tokens.shape[0], result.shape[-1], dtype=tokens.dtype, device=tokens.device)
        for e, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B)):
            slot, token_pos = torch.where(expert_mask[e])
            expert_out = lora_b(lora_a(tokens[token_pos])) * (self.scaling * routing_weights[token_pos, slot, None])
            delta.index_add_(0, token_pos, expert_out)
        return result + delta.view(*result.shape[:-1], -1).to(result.dtype)


# ---------------------------------------------------------------------------------------------- building the arms


class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def peft_lora(base: nn.Module, r: int, adapter_dtype: torch.dtype, use_dora: bool = False) -> nn.Module:
    """The real peft LoRA (or DoRA) module (`peft.tuners.lora.Linear`) around `base`, through get_peft_model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False,
                        use_dora=use_dora)
    model = get_peft_model(_OneLayer(base), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        getattr(layer, name).to(adapter_dtype)
    return layer


def comoe_layer(
    base: nn.Module,
    case: Case,
    contrastive: bool,
    num_negatives: int | None,
    adapter_dtype: torch.dtype,
    use_dora: bool = False,
) -> CoMoELinear:
    settings = ExpertSettings(case.num_experts, case.top_k, 0.0, contrastive, TEMPERATURE, num_negatives, "random")
    layer = CoMoELinear(
        base, "default", r=case.r, lora_alpha=2 * case.r, lora_dropout=0.0, settings=settings, init_weights=False,
        use_dora=use_dora,
    )
    for name in ("comoe_A", "comoe_B", "comoe_router", "comoe_magnitude"):
        getattr(layer, name).to(adapter_dtype)
    return layer.train()


def sampled_negatives(case: Case) -> int:
    return 2 if case.num_experts - case.top_k > 2 else 1


def build_arms(case: Case, seed: int = 0) -> dict[str, nn.Module]:
    """Every arm of one case, all around the same frozen base layer."""
    model_dtype, adapter_dtype = DTYPES[case.dtype]
    torch.manual_seed(seed)
    base = nn.Linear(case.d_in, case.d_out, bias=False).to(device=case.device, dtype=model_dtype)
    base.requires_grad_(False)
    arms: dict[str, nn.Module] = {"base": base}
    arms["lora_kr"] = peft_lora(base, case.top_k * case.r, adapter_dtype)
    arms["lora_nr"] = peft_lora(base, case.num_experts * case.r, adapter_dtype)
    comoe = comoe_layer(base, case, False, None, adapter_dtype)
    loop = LoopMoELoRA(base, case.num_experts, case.top_k, case.r, comoe.scaling["default"]).copy_from(comoe)
    for adapter_part in (loop.router, loop.lora_A, loop.lora_B):
        adapter_part.to(device=case.device, dtype=adapter_dtype)
    arms["loop"] = loop
    arms["comoe"] = comoe
    arms["comoe_con"] = comoe_layer(base, case, True, None, adapter_dtype)
    arms["comoe_con_sampled"] = comoe_layer(base, case, True, sampled_negatives(case), adapter_dtype)
    arms["dora_kr"] = peft_lora(base, case.top_k * case.r, adapter_dtype, use_dora=True)
    arms["comoe_dora"] = comoe_layer(base, case, False, None, adapter_dtype, use_dora=True)
    arms["comoe_dora_con"] = comoe_layer(base, case, True, None, adapter_dtype, use_dora=True)
    for module in arms.values():
        module.to(case.device)
    return arms


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- one step


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, SEQ_LEN, d_in) requiring grad, as inside a model, and a fixed output gradient (batch, SEQ_LEN, d_out).

    3-D like a transformer's hidden states: with a 3-D input, autograd accumulates the input gradient of the base
    and adapter paths out of place for every arm (with a 2-D input peft LoRA gets an in-place accumulation that a
    model never gives it).
    """
    model_dtype, _ = DTYPES[case.dtype]
    seq = SEQ_LEN if case.tokens % SEQ_LEN == 0 else case.tokens
    generator = torch.Generator(device="cpu").manual_seed(seed + 2)
    x = torch.randn(case.tokens // seq, seq, case.d_in, generator=generator)
    grad_out = torch.randn(case.tokens // seq, seq, case.d_out, generator=generator)
    return x.to(case.device, model_dtype).requires_grad_(True), grad_out.to(case.device, model_dtype)


def make_step(
    name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, loss: str
) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]:
    """(forward, backward) of one arm; forward returns what backward needs."""
    params = trainable(module)
    contrastive = "con" in name.split("_")  # comoe_con, comoe_con_sampled, comoe_dora_con

    def forward():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        if loss == "pow2":
            total = out.float().pow(2).mean()
            if contrastive:
                total = total + CONTRASTIVE_COEF * module.recorded_aux_losses("default")["contrastive"]
            return total
        if contrastive:
            return out, module.recorded_aux_losses("default")["contrastive"]
        return out

    coef = torch.tensor(CONTRASTIVE_COEF, device=x.device)

    def backward(value):
        if loss == "pow2":
            value.backward()
        elif contrastive:
            out, con = value
            torch.autograd.backward([out, con], [grad_out, coef.to(con.dtype)])
        else:
            value.backward(grad_out)

    return forward, backward


def saved_bytes(forward: Callable, backward: Callable, exclude: list[torch.Tensor]) -> int:
    """Bytes of the unique storages the autograd graph saves for backward, leaving out `exclude` (params, input)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = forward()
    backward(value)
    return sum(storages.values())


def time_steps(forward: Callable, backward: Callable, reps: int, device: str) -> float:
    """Seconds per forward + backward: thread CPU time on CPU, CUDA events on GPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            backward(forward())
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / reps
    began = time.thread_time()
    for _ in range(reps):
        backward(forward())
    return (time.thread_time() - began) / reps


def peak_memory(forward: Callable, backward: Callable, device: str) -> int | None:
    """Extra CUDA memory at the peak of one step, over what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    backward(forward())
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------------------------------------- correctness


def check_correctness(comoe: CoMoELinear, loop: LoopMoELoRA, d_in: int, device: str, seed: int = 0) -> dict:
    """CoMoE (contrastive off) equals the loop arm in float64 on the same weights: outputs and all gradients."""
    comoe64 = copy.deepcopy(comoe).double()
    loop64 = copy.deepcopy(loop).double()
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(CHECK_TOKENS, d_in, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    out_fast = comoe64(x)
    out_loop = loop64(x)
    torch.testing.assert_close(out_fast, out_loop, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(out_fast)
    fast_params = [x, comoe64.comoe_A["default"], comoe64.comoe_B["default"], comoe64.comoe_router["default"]]
    loop_params = [x, *[a.weight for a in loop64.lora_A], *[b.weight for b in loop64.lora_B], loop64.router.weight]
    fast_grads = torch.autograd.grad((out_fast * weights).sum(), fast_params)
    loop_grads = torch.autograd.grad((out_loop * weights).sum(), loop_params)
    n = len(loop64.lora_A)
    loop_grads = [
        loop_grads[0],
        torch.cat(loop_grads[1 : 1 + n]),  # (N*r, d_in), the stacked A
        torch.cat(loop_grads[1 + n : 1 + 2 * n], dim=1),  # (d_out, N*r), B side by side
        loop_grads[-1],
    ]
    errors = {"output": (out_fast - out_loop).abs().max().item()}
    for name, g_fast, g_loop in zip(["x", "A", "B", "router"], fast_grads, loop_grads):
        torch.testing.assert_close(g_fast, g_loop, rtol=1e-8, atol=1e-8, msg=lambda m, n=name: f"grad {n}: {m}")
        errors[f"grad_{name}"] = (g_fast - g_loop).abs().max().item()
    return {"passed": True, "dtype": "float64", "tokens": CHECK_TOKENS, "max_abs_error": errors}


# ---------------------------------------------------------------------------------------------- one case


def median_ratio(times: dict[str, list[float]], arm: str, reference: str) -> float:
    return statistics.median(a / b for a, b in zip(times[arm], times[reference]))


def run_case(
    case: Case, rounds: int, reps: int, loss: str, warmup: int = 1, seed: int = 0, min_time: float = 0.0
) -> dict:
    arms = build_arms(case, seed)
    correctness = check_correctness(arms["comoe"], arms["loop"], case.d_in, case.device, seed)

    x, grad_out = make_inputs(case, seed)
    steps = {name: make_step(name, module, x, grad_out, loss) for name, module in arms.items()}

    saved, peaks = {}, {}
    for name, (forward, backward) in steps.items():
        saved[name] = saved_bytes(forward, backward, [x, *arms[name].parameters()])
        peaks[name] = peak_memory(forward, backward, case.device)
        for _ in range(warmup):
            backward(forward())
    one_step = time_steps(*steps["lora_kr"], 1, case.device)
    reps = max(reps, math.ceil(min_time / max(one_step, 1e-6)))

    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for round_index in range(rounds):
        shift = round_index % len(ARMS)
        for name in ARMS[shift:] + ARMS[:shift]:  # rotate the order every round
            times[name].append(time_steps(*steps[name], reps, case.device))

    results = {}
    for name in ARMS:
        results[name] = {
            "median_seconds": statistics.median(times[name]),
            "ratio_to_base": median_ratio(times, name, "base"),
            "ratio_to_lora_kr": median_ratio(times, name, "lora_kr"),
            "saved_bytes": saved[name],
            "peak_cuda_bytes": peaks[name],
            "trainable_params": sum(p.numel() for p in trainable(arms[name])),
            "seconds_per_round": times[name],
        }
    speedup_vs_loop = {name: 1.0 / median_ratio(times, name, "loop") for name in ("comoe", "comoe_con")}
    dora_vs_peft_dora = {name: median_ratio(times, name, "dora_kr") for name in ("comoe_dora", "comoe_dora_con")}
    saved_vs_loop = {name: saved[name] / max(saved["loop"], 1) for name in ("comoe", "comoe_con")}
    targets = {
        "comoe_le_1.0x_lora_kr": results["comoe"]["ratio_to_lora_kr"] <= 1.0,
        "comoe_con_le_1.25x_lora_kr": results["comoe_con"]["ratio_to_lora_kr"] <= 1.25,
        "comoe_ge_2x_faster_than_loop": speedup_vs_loop["comoe"] >= 2.0,
        "comoe_saved_le_0.1x_loop": saved_vs_loop["comoe"] <= 0.1,
    }
    return {
        "case": asdict(case),
        "label": case.label(),
        "num_negatives_sampled": sampled_negatives(case),
        "rounds": rounds,
        "reps": reps,
        "correctness": correctness,
        "arms": results,
        "speedup_vs_loop": speedup_vs_loop,
        "dora_ratio_to_peft_dora_kr": dora_vs_peft_dora,
        "saved_fraction_of_loop": saved_vs_loop,
        "targets": targets,
    }


# ---------------------------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# CoMoE layer speed",
        "",
        (
            f"{meta['device_name']}; torch {meta['torch']}, peft {meta['peft']}; timer: {meta['timer']}; "
            f"threads: {meta['threads']}; loss: {meta['loss']}; k={meta['top_k']}, r={meta['r']}; "
            "medians of per-round ratios over interleaved rounds."
        ),
        "",
        "## Forward + backward time, ratio to the frozen base layer",
        "",
    ]
    header = "| case | " + " | ".join(ARM_LABELS[a] for a in ARMS) + " |"
    rule = "|---|" + "---|" * len(ARMS)
    lines += [header, rule]
    for result in report["results"]:
        row = [f"{result['arms'][a]['ratio_to_base']:.2f}" for a in ARMS]
        lines.append(f"| {result['label']} | " + " | ".join(row) + " |")
    lines += ["", "## Ratio to peft LoRA at r = k*r", "", header, rule]
    for result in report["results"]:
        row = [f"{result['arms'][a]['ratio_to_lora_kr']:.2f}" for a in ARMS]
        lines.append(f"| {result['label']} | " + " | ".join(row) + " |")
    lines += ["", "## Saved for backward (MB; parameters and the input left out)", "", header, rule]
    for result in report["results"]:
        row = [f"{result['arms'][a]['saved_bytes'] / 1e6:.2f}" for a in ARMS]
        lines.append(f"| {result['label']} | " + " | ".join(row) + " |")
    if any(result["arms"]["base"]["peak_cuda_bytes"] is not None for result in report["results"]):
        lines += ["", "## Peak CUDA memory of one step (MB over the resting allocation)", "", header, rule]
        for result in report["results"]:
            row = [f"{(result['arms'][a]['peak_cuda_bytes'] or 0) / 1e6:.1f}" for a in ARMS]
            lines.append(f"| {result['label']} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Targets",
        "",
        (
            "| case | CoMoE / LoRA kr (<= 1.0) | CoMoE+con / LoRA kr (<= 1.25) | loop / CoMoE (>= 2) | "
            "CoMoE saved / loop saved (<= 0.1) | loop / CoMoE+con | correctness (float64 vs loop) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        arms, targets = result["arms"], result["targets"]

        def mark(ok: bool) -> str:
            return "ok" if ok else "MISSED"

        lines.append(
            f"| {result['label']} "
            f"| {arms['comoe']['ratio_to_lora_kr']:.2f} {mark(targets['comoe_le_1.0x_lora_kr'])} "
            f"| {arms['comoe_con']['ratio_to_lora_kr']:.2f} {mark(targets['comoe_con_le_1.25x_lora_kr'])} "
            f"| {result['speedup_vs_loop']['comoe']:.2f} {mark(targets['comoe_ge_2x_faster_than_loop'])} "
            f"| {result['saved_fraction_of_loop']['comoe']:.3f} {mark(targets['comoe_saved_le_0.1x_loop'])} "
            f"| {result['speedup_vs_loop']['comoe_con']:.2f} "
            f"| {'passed' if result['correctness']['passed'] else 'FAILED'} |"
        )
    lines += [
        "",
        "## DoRA experts: ratio to peft DoRA at r = k*r",
        "",
        "| case | CoMoE-DoRA | CoMoE-DoRA + con | peft DoRA r=k*r / peft LoRA r=k*r |",
        "|---|---|---|---|",
    ]
    for result in report["results"]:
        dora = result["dora_ratio_to_peft_dora_kr"]
        lines.append(
            f"| {result['label']} | {dora['comoe_dora']:.2f} | {dora['comoe_dora_con']:.2f} "
            f"| {result['arms']['dora_kr']['ratio_to_lora_kr']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        name = names[0] if names else name
    except OSError:
        pass
    return f"CPU {name} ({torch.backends.cpu.get_cpu_capability()})"


def machine(device: str, argv: list[str] | None) -> dict:
    """What every benchmark report's `meta` names: versions, device, threads, clock, command line and date."""
    import peft

    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "timer": "CUDA events" if device == "cuda" else "time.thread_time",
        "argv": sys.argv[1:] if argv is None else argv,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_report(report: dict, table: str, out: str | None, markdown_path: str | None) -> None:
    """Print the markdown table and write the JSON report and the table where asked (atomically)."""
    print(table)
    if out:
        write_json_atomic(out, report)
    if markdown_path:
        write_text_atomic(markdown_path, table)


def environment(args: argparse.Namespace, device: str) -> dict:
    loss = "pow2: out.pow(2).mean() + 0.01 * con" if args.loss == "pow2" else "<out, g> + 0.01 * con"
    return {**machine(device, args.argv), "loss": loss, "top_k": args.top_k, "r": args.r}


# ---------------------------------------------------------------------------------------------- command line


def parse_shape(spec: str) -> tuple[str, int, int]:
    if spec in SHAPES:
        return (spec, *SHAPES[spec])
    d_in, d_out = (int(v) for v in spec.lower().split("x"))  # "DINxDOUT"
    return spec, d_in, d_out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small settings for a run well under 2 min: {QUICK}")
    parser.add_argument("--shapes", nargs="+", help=f"names {list(SHAPES)} or DINxDOUT")
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--experts", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--reps", type=int, help="steps per arm per round (timed together)")
    parser.add_argument(
        "--min-time",
        type=float,
        default=MIN_MEASURE_SECONDS,
        help="raise the steps per measurement until one measurement lasts about this long (seconds)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="SHAPE:TOKENS:N",
        help="explicit cases instead of the product of --shapes, --tokens and --experts (each run in every dtype)",
    )
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--loss", choices=["grad", "pow2"], default="grad")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the protocol uses 1)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--markdown", help="also write the markdown table here")
    args = parser.parse_args(argv)
    args.argv = argv
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    report = {"meta": environment(args, device), "results": []}
    if args.cases:
        grid = [(spec.split(":")[0], int(spec.split(":")[1]), int(spec.split(":")[2])) for spec in args.cases]
    else:
        grid = [(s, t, n) for s in args.shapes for n in args.experts for t in args.tokens]
    for shape, tokens, num_experts in grid:
        name, d_in, d_out = parse_shape(shape)
        for dtype in args.dtypes:
            case = Case(name, d_in, d_out, tokens, num_experts, args.top_k, args.r, dtype, device)
            began = time.perf_counter()
            result = run_case(case, args.rounds, args.reps, args.loss, min_time=args.min_time)
            result["wall_seconds"] = time.perf_counter() - began
            report["results"].append(result)
            arms = result["arms"]
            print(
                f"{case.label()}: vs base "
                + " ".join(f"{a}={arms[a]['ratio_to_base']:.2f}" for a in ARMS)
                + f" | CoMoE/LoRA_kr={arms['comoe']['ratio_to_lora_kr']:.2f}"
                f" con/LoRA_kr={arms['comoe_con']['ratio_to_lora_kr']:.2f}"
                f" loop/CoMoE={result['speedup_vs_loop']['comoe']:.2f}"
                f" CoMoE-DoRA/DoRA_kr={result['dora_ratio_to_peft_dora_kr']['comoe_dora']:.2f}"
                f" ({result['wall_seconds']:.0f} s)",
                flush=True,
            )
    write_report(report, markdown(report), args.out, args.markdown)
    return report


if __name__ == "__main__":
    main()
