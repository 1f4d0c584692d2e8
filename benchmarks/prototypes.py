"""Prototypes of a faster CoMoE layer, measured against the current one with the protocol of `layer_speed.py`.

Nothing here is used by the package: these are candidates for `comoe_peft/tuner/layer.py` and `comoe_peft/tuner/losses.py`,
kept with their measurements so the change can be judged and reproduced. Items 1 (with the router kept in float32)
and 4 (for sampled negatives) have since been taken into the package as `comoe_peft.tuner.fused_down.RoutedDownProjection`
and the dense path of `comoe_peft.tuner.losses.contrastive_logits`; `benchmarks/results/prototypes_cpu.json` compares the
prototypes with the layer as it was before that.

1. `RoutedDown` + `AddUp`: hand-written torch.autograd.Functions for fused down-projection -> routing -> gated
   rank activations -> up-projection (fast-layer.md item 4). `AddUp` adds into the frozen output in place (no
   copy of the d_out-wide output); together they save only the (T, N*r + N) fused activations, the (T, N) gates
   and the (T, N*r) gated activations; the routing gradient is written in closed form: for renormalised top-k
   gates g = softmax of the logits restricted to the top-k, dL/dlogit = g * (dL/dg - <g, dL/dg>). `RoutedDown`
   also returns h and the router logits, so the contrastive, balance and z losses stay ordinary autograd code whose
   gradients flow back into its single backward (one dx GEMM for everything).
2. Lean recording (`LeanRecordLinear` isolates it): the balance and z losses are computed only when asked for (they are off by default in CoMoE,
   yet the current layer builds both, plus a second softmax inside transformers' balance loss, on every training
   forward).
3. bf16: router logits from the same bf16 GEMM as the experts, upcast to float32 for the softmax (the Mixtral
   recipe). The current layer casts the whole input to float32 for a separate router GEMM instead, which costs a
   full-width pass and saves a float32 copy of x (T * d_in * 4 bytes) for backward.
4. `contrastive_loss_dense`: the contrastive loss with dense (T, A, N) logits and boolean masks instead of gathered
   candidates. Equal to `losses.contrastive_loss` for the same anchors and negatives; with sampled negatives it
   skips the (T, A, 1 + S, r, r) Gram-block gathers, which make the current sampled path slower than the
   all-negatives one.

Run:  python benchmarks/prototypes.py --shapes d576 d2048 --tokens 2048 --experts 8 --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_speed

from comoe_peft.tuner.layer import ExpertSettings, routing_stats
from comoe_peft.tuner.layer import Linear as CoMoELinear
from comoe_peft.tuner.losses import (
    CONTRASTIVE_EPS,
    NORM_EPS,
    ContrastiveIndices,
    contrastive_loss,
    expert_gram_matrix,
    masked_mean,
    sample_contrastive_indices,
)

# ---------------------------------------------------------------------------------------------- 1. fused Function


class RoutedDown(torch.autograd.Function):
    """h = A_cat x and router logits W_g x from one GEMM, top-k routing, gated rank activations; one autograd node.

    Inputs: x (T, d_in); down_router (N*r + N, d_in) = [A_1; ...; A_N; W_g].
    Outputs: gated (T, N*r) = gates (x) h, h (T, N*r), router logits (T, N) in float32, top-k indices (T, k),
    probabilities (T, N). h and the logits are outputs so that the contrastive, balance and z losses can use them;
    their gradients come back into this node's single backward.
    """

    @staticmethod
    def forward(ctx, x, down_router, num_experts: int, top_k: int):
        num_tokens = x.shape[0]
        rank_total = down_router.shape[0] - num_experts  # N*r
        rank = rank_total // num_experts
        fused = x @ down_router.t()  # (T, N*r + N): one pass over x
        h = fused[:, :rank_total]  # (T, N*r)
        router_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = fused[:, rank_total:].to(router_dtype)  # (T, N)
        probs = logits.softmax(dim=-1)  # (T, N)
        top_p, top_idx = probs.topk(top_k, dim=-1)  # (T, k)
        if top_k > 1:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter_(1, top_idx, top_p)  # (T, N), zero off the top-k
        gated = h.view(num_tokens, num_experts, rank) * gates.to(h.dtype).unsqueeze(-1)  # (T, N, r)
        ctx.mark_non_differentiable(top_idx, probs)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, down_router, fused, gates, probs if top_k == 1 else None)
        ctx.shape = (num_tokens, num_experts, rank, top_k)
        return gated.view(num_tokens, rank_total), h, logits, top_idx, probs

    @staticmethod
    def backward(ctx, grad_gated, grad_h, grad_logits, _grad_idx, _grad_probs):
        x, down_router, fused, gates, probs = ctx.saved_tensors
        num_tokens, num_experts, rank, top_k = ctx.shape
        rank_total = num_experts * rank
        h = fused[:, :rank_total].view(num_tokens, num_experts, rank)  # (T, N, r)
        grad_fused = torch.empty_like(fused)  # (T, N*r + N)
        grad_rank = grad_fused[:, :rank_total].view(num_tokens, num_experts, rank)  # (T, N, r)
        if grad_gated is not None:
            grad_gated = grad_gated.view(num_tokens, num_experts, rank)
            torch.mul(grad_gated, gates.to(h.dtype).unsqueeze(-1), out=grad_rank)
            grad_gates = (grad_gated * h).sum(-1).to(gates.dtype)  # (T, N)
            inner = (gates * grad_gates).sum(-1, keepdim=True)  # (T, 1)
            if top_k > 1:  # gates = softmax of the logits restricted to the top-k
                grad_router = gates * (grad_gates - inner)
            else:  # gate = raw probability of the chosen expert
                grad_router = probs * (grad_gates * (gates != 0) - inner)
        else:
            grad_rank.zero_()
            grad_router = torch.zeros_like(gates)
        if grad_h is not None:
            grad_rank += grad_h.view(num_tokens, num_experts, rank)
        if grad_logits is not None:
            grad_router = grad_router + grad_logits
        grad_fused[:, rank_total:] = grad_router
        grad_x = torch.mm(grad_fused, down_router) if ctx.needs_input_grad[0] else None  # (T, d_in)
        grad_down_router = torch.mm(grad_fused.t(), x) if ctx.needs_input_grad[1] else None  # (N*r + N, d_in)
        return grad_x, grad_down_router, None, None


class AddUp(torch.autograd.Function):
    """base_out += scaling * gated @ up^T in place (no copy of the d_out-wide output); one output, so base_out may be
    a view (a Function with several outputs may not modify a view in place)."""

    @staticmethod
    def forward(ctx, base_out, gated, up, scaling: float):
        out_2d = base_out.view(gated.shape[0], -1)  # (T, d_out), same storage
        if base_out.dtype == gated.dtype:
            out_2d.addmm_(gated, up.t(), alpha=scaling)
        else:  # e.g. bf16 base, float32 adapters
            out_2d.add_((gated @ up.t()).mul_(scaling).to(base_out.dtype))
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(gated, up)
        ctx.scaling = scaling
        return base_out

    @staticmethod
    def backward(ctx, grad_out):
        gated, up = ctx.saved_tensors
        grad_2d = grad_out.reshape(gated.shape[0], -1).to(up.dtype)  # (T, d_out)
        grad_gated = torch.mm(grad_2d, up).mul_(ctx.scaling) if ctx.needs_input_grad[1] else None  # (T, N*r)
        grad_up = torch.mm(grad_2d.t(), gated).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None  # (d_out, N*r)
        return grad_out, grad_gated, grad_up, None


# ---------------------------------------------------------------------------------------------- 4. dense contrastive


def contrastive_loss_dense(
    h: torch.Tensor,
    expert_up: torch.Tensor,
    indices: ContrastiveIndices,
    temperature: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`losses.contrastive_loss` with dense (T, A, N) cosine logits and masks (no candidate gathers)."""
    expert_gram = expert_gram_matrix(expert_up)  # (N*r, N*r)
    h = h.to(expert_gram.dtype)  # (T, N, r)
    num_tokens, num_experts, rank = h.shape
    anchor_idx = indices.anchor_idx  # (T, A)
    num_anchors = anchor_idx.shape[1]
    anchor_mask = F.one_hot(anchor_idx, num_experts).to(h.dtype)  # (T, A, N)
    anchor_only = (h.unsqueeze(1) * anchor_mask.unsqueeze(-1)).view(num_tokens, num_anchors, -1)  # (T, A, N*r)
    projected = (anchor_only @ expert_gram).view(num_tokens, num_anchors, num_experts, rank)  # h_a^T B_a^T B_cat
    dots = (projected * h.unsqueeze(1)).sum(-1)  # (T, A, N): <o_a, o_j>
    diagonal = torch.diagonal(expert_gram.view(num_experts, rank, num_experts, rank), dim1=0, dim2=2)
    diagonal = diagonal.permute(2, 0, 1)  # (N, r, r) = B_j^T B_j
    squared = (torch.bmm(h.transpose(0, 1), diagonal).transpose(0, 1) * h).sum(-1)  # (T, N): ||o_j||^2
    norms = squared.clamp_min(NORM_EPS**2).sqrt()  # (T, N)
    anchor_norm = norms.gather(1, anchor_idx)  # (T, A)
    logits = dots / (anchor_norm.unsqueeze(-1) * norms.unsqueeze(1)) / temperature  # (T, A, N)

    positive = torch.zeros(num_tokens, num_anchors, num_experts, dtype=torch.bool, device=h.device)
    positive.scatter_(2, indices.positive_idx, True)  # (T, A, N)
    negative = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=h.device)
    negative.scatter_(1, indices.negative_idx, True)  # (T, N)
    negative = negative.unsqueeze(1).expand_as(positive)  # (T, A, N)
    if indices.negative_log_weight:
        logits = logits + negative * indices.negative_log_weight
    log_numerator = torch.logsumexp(logits.masked_fill(~positive, -math.inf), dim=-1)  # (T, A)
    all_logits = logits.masked_fill(~(positive | negative), -math.inf)
    log_denominator = torch.logaddexp(
        torch.logsumexp(all_logits, dim=-1), torch.tensor(math.log(CONTRASTIVE_EPS), device=h.device)
    )  # (T, A)
    return masked_mean((log_denominator - log_numerator).sum(dim=-1), token_mask)


# ---------------------------------------------------------------------------------------------- the prototype layer


class PrototypeLinear(CoMoELinear):
    """The CoMoE layer with `RoutedDown` + `AddUp`, lean recording and (optionally) the dense contrastive loss.

    Same parameters as `comoe_peft.tuner.layer.Linear`, so outputs and gradients can be compared one to one.
    """

    def __init__(self, *args, dense_contrastive: bool = True, aux_losses: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dense_contrastive = dense_contrastive
        self.aux_losses = aux_losses  # which of "balance", "z" to compute (the contrastive one follows settings)

    def _add_experts(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        settings = self.comoe_settings[adapter_name]
        dropout = self.comoe_dropout[adapter_name]
        if self.training and (isinstance(dropout, nn.Dropout) or settings.router_jitter_noise > 0):
            return super()._add_experts(x, result, adapter_name)  # not prototyped: the plain autograd path
        down = self.comoe_A[adapter_name]  # (N*r, d_in)
        up = self.comoe_B[adapter_name]  # (d_out, N*r)
        router = self.comoe_router[adapter_name]  # (N, d_in)
        tokens = self._cast_input_dtype(x, down.dtype).reshape(-1, self.in_features)  # (T, d_in)
        down_router = torch.cat([down, router.to(down.dtype)])  # (N*r + N, d_in)
        gated, h, logits, topk_idx, probs = RoutedDown.apply(tokens, down_router, settings.num_experts, settings.top_k)
        result = AddUp.apply(result, gated, up, self.scaling[adapter_name])
        self._record_lean(adapter_name, settings, h, up, logits, probs, topk_idx, x)
        return result

    def _record_lean(self, adapter_name, settings, h, up, router_logits, probs, topk_idx, x) -> None:
        from comoe_peft.tuner.losses import load_balancing_loss, router_z_loss

        token_mask = self.forward_context.token_mask(x)
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            if "balance" in self.aux_losses:
                losses["balance"] = load_balancing_loss(router_logits, settings.top_k, token_mask)
            if "z" in self.aux_losses:
                losses["z"] = router_z_loss(router_logits, token_mask)
            if settings.contrastive:
                indices = sample_contrastive_indices(
                    topk_idx, settings.num_experts, settings.anchor, settings.num_negatives
                )
                h_experts = h.view(-1, settings.num_experts, self.r[adapter_name])  # (T, N, r)
                loss_fn = contrastive_loss_dense if self.dense_contrastive else contrastive_loss
                losses["contrastive"] = loss_fn(h_experts, up, indices, settings.contrastive_temperature, token_mask)
        self.store_record(adapter_name, losses, routing_stats(probs, topk_idx, token_mask))


class LeanRecordLinear(CoMoELinear):
    """The current layer, except that the balance and z losses are not built (isolates change 2 alone)."""

    def _record(self, adapter_name, settings, h, up, router_logits, probs, topk_idx, x) -> None:
        token_mask = self.forward_context.token_mask(x)
        losses: dict[str, torch.Tensor] = {}
        if self.training and settings.contrastive:
            indices = sample_contrastive_indices(
                topk_idx, settings.num_experts, settings.anchor, settings.num_negatives
            )
            h_experts = h.view(-1, settings.num_experts, self.r[adapter_name])  # (T, N, r)
            losses["contrastive"] = contrastive_loss(
                h_experts, up, indices, settings.contrastive_temperature, token_mask
            )
        self.store_record(adapter_name, losses, routing_stats(probs.detach(), topk_idx, token_mask))


# ---------------------------------------------------------------------------------------------- checks


def check_prototype(seed: int = 0) -> dict:
    """The prototype equals the current layer in float64: outputs, gradients (with and without the contrastive
    term), the dense contrastive loss equals the gathered one, and gradcheck of the Function passes."""
    errors = {}
    for top_k in (1, 2, 3):
        for contrastive in (False, True):
            if contrastive and top_k == 1:
                continue
            for num_negatives in (None, 1) if contrastive else (None,):
                torch.manual_seed(seed)
                base = nn.Linear(12, 10).double().requires_grad_(False)
                settings = ExpertSettings(5, top_k, 0.0, contrastive, 0.1, num_negatives, "random")
                kwargs = {"r": 3, "lora_alpha": 6, "lora_dropout": 0.0, "settings": settings, "init_weights": False}
                current = CoMoELinear(base, "default", **kwargs).double().train()
                proto = PrototypeLinear(base, "default", **kwargs).double().train()
                proto.load_state_dict(current.state_dict())
                x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
                weights = torch.randn(2, 7, 10, dtype=torch.float64)
                grads = []
                for layer in (current, proto):
                    torch.manual_seed(seed + 1)  # same anchors and negatives
                    out = layer(x)
                    loss = (out * weights).sum()
                    if contrastive:
                        loss = loss + layer.recorded_aux_losses("default")["contrastive"]
                    params = [x, layer.comoe_A["default"], layer.comoe_B["default"], layer.comoe_router["default"]]
                    grads.append((out.detach(), *torch.autograd.grad(loss, params)))
                label = f"k={top_k} con={contrastive} m={num_negatives}"
                for name, a, b in zip(["out", "x", "A", "B", "router"], *grads):
                    torch.testing.assert_close(a, b, msg=lambda m, n=f"{label} {name}": f"{n}: {m}")
                errors[label] = max((a - b).abs().max().item() for a, b in zip(*grads))
    # the Function alone, gradcheck in float64 (h and logits used downstream too)
    torch.manual_seed(seed)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    down_router = torch.randn(3 * 2 + 3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 3 * 2, dtype=torch.float64, requires_grad=True)
    base_out = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for top_k in (1, 2):

        def run(x_in, base_in, dr_in, up_in, top_k=top_k):
            gated, h, logits, _, _ = RoutedDown.apply(x_in, dr_in, 3, top_k)
            out = AddUp.apply(base_in.clone(), gated, up_in, 1.5)
            return out, h.pow(2).sum(-1), logits.sin()

        assert torch.autograd.gradcheck(run, (x, base_out, down_router, up))
    return {"passed": True, "max_abs_error": errors}


# ---------------------------------------------------------------------------------------------- benchmark


PROTO_ARMS = (
    "base",
    "lora_kr",
    "lora_nr",
    "comoe",
    "comoe_con",
    "comoe_con_sampled",
    "comoe_lean",
    "proto",
    "proto_con",
    "proto_con_sampled",
    "proto_con_gathered",
)


def build_proto_arms(case: layer_speed.Case, seed: int = 0) -> dict[str, nn.Module]:
    arms = layer_speed.build_arms(case, seed)
    arms.pop("loop")
    base = arms["base"]
    _, adapter_dtype = layer_speed.DTYPES[case.dtype]
    m = layer_speed.sampled_negatives(case)
    variants = {
        "proto": (False, None, True),
        "proto_con": (True, None, True),
        "proto_con_sampled": (True, m, True),
        "proto_con_gathered": (True, None, False),  # the Function with the current (gathered) contrastive loss
    }
    settings = ExpertSettings(case.num_experts, case.top_k, 0.0, False, 0.1, None, "random")
    lean = LeanRecordLinear(
        base, "default", r=case.r, lora_alpha=2 * case.r, lora_dropout=0.0, settings=settings, init_weights=False
    )
    for part in ("comoe_A", "comoe_B", "comoe_router"):
        getattr(lean, part).to(device=case.device, dtype=adapter_dtype)
    arms["comoe_lean"] = lean.train()
    for name, (contrastive, num_negatives, dense) in variants.items():
        settings = ExpertSettings(case.num_experts, case.top_k, 0.0, contrastive, 0.1, num_negatives, "random")
        layer = PrototypeLinear(
            base,
            "default",
            r=case.r,
            lora_alpha=2 * case.r,
            lora_dropout=0.0,
            settings=settings,
            init_weights=False,
            dense_contrastive=dense,
        )
        for part in ("comoe_A", "comoe_B", "comoe_router"):
            getattr(layer, part).to(device=case.device, dtype=adapter_dtype)
        arms[name] = layer.train()
    return arms


def run_case(case: layer_speed.Case, rounds: int, reps: int) -> dict:
    arms = build_proto_arms(case)
    x, grad_out = layer_speed.make_inputs(case)
    steps = {}
    for name, module in arms.items():
        step_name = "comoe_con" + name[len("proto_con") :] if name.startswith("proto_con") else name
        steps[name] = layer_speed.make_step(step_name, module, x, grad_out, "grad")
    saved = {}
    for name, (forward, backward) in steps.items():
        saved[name] = layer_speed.saved_bytes(forward, backward, [x, *arms[name].parameters()])
        backward(forward())
    times = {name: [] for name in PROTO_ARMS}
    for round_index in range(rounds):
        shift = round_index % len(PROTO_ARMS)
        for name in PROTO_ARMS[shift:] + PROTO_ARMS[:shift]:
            times[name].append(layer_speed.time_steps(*steps[name], reps, case.device))
    return {
        "label": case.label(),
        "arms": {
            name: {
                "ratio_to_base": layer_speed.median_ratio(times, name, "base"),
                "ratio_to_lora_kr": layer_speed.median_ratio(times, name, "lora_kr"),
                "saved_bytes": saved[name],
            }
            for name in PROTO_ARMS
        },
        "proto_over_current": {
            "no contrastive, only the balance and z losses left out": layer_speed.median_ratio(
                times, "comoe_lean", "comoe"
            ),
            "no contrastive": layer_speed.median_ratio(times, "proto", "comoe"),
            "contrastive, all negatives": layer_speed.median_ratio(times, "proto_con", "comoe_con"),
            "contrastive, sampled": layer_speed.median_ratio(times, "proto_con_sampled", "comoe_con_sampled"),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="current CoMoE layer vs the prototypes, interleaved")
    parser.add_argument("--shapes", nargs="+", default=["d576", "d2048"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048])
    parser.add_argument("--experts", nargs="+", type=int, default=[8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(layer_speed.DTYPES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = {"check": check_prototype(), "results": []}
    print("prototype equals the current layer (float64, k=1..3, contrastive on/off) and passes gradcheck")
    for shape in args.shapes:
        name, d_in, d_out = layer_speed.parse_shape(shape)
        for num_experts in args.experts:
            for tokens in args.tokens:
                for dtype in args.dtypes:
                    case = layer_speed.Case(name, d_in, d_out, tokens, num_experts, 2, 8, dtype, "cpu")
                    began = time.perf_counter()
                    result = run_case(case, args.rounds, args.reps)
                    report["results"].append(result)
                    arms = result["arms"]
                    print(f"\n{result['label']} ({time.perf_counter() - began:.0f} s)")
                    print(f"  {'arm':20s} {'/base':>7s} {'/lora_kr':>9s} {'saved MB':>9s}")
                    for arm in PROTO_ARMS:
                        a = arms[arm]
                        print(
                            f"  {arm:20s} {a['ratio_to_base']:7.3f} {a['ratio_to_lora_kr']:9.3f} "
                            f"{a['saved_bytes'] / 1e6:9.2f}"
                        )
                    print("  prototype / current:", {k: round(v, 3) for k, v in result["proto_over_current"].items()})
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
