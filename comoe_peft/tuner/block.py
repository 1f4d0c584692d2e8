"""Routed FFN-block experts (the MixLoRA layout): one router at an MLP block's input, N experts that are each the
frozen block with its own LoRA on every projection inside it.

Follow one token x (d) through a Llama-style gated block y = W_d (act(W_g x) * (W_u x)) in `Block._expert_mix`:

    x -> the frozen W_g x, W_u x, once for all experts       -> G, U (f)
    x -> router logits in float32, top-k, renormalise         -> the k active experts e_s and their gates w_s
    x -> one GEMM [A_g,1..N; A_u,1..N] x                      -> every expert's rank-space activations (2, N, r)
      -> per projection, one GEMM of the k slots (each keeping only its own expert's r activations) against the
         stacked [B_1 ... B_N]                                 -> the active experts' deltas (k, f), no weights gathered
    h_s = act(G + s B_g,e_s A_g,e_s x) * (U + s B_u,e_s A_u,e_s x)  for the k active experts only  (k, f)
    y = W_d (sum_s w_s h_s)  +  s sum_s w_s B_d,e_s A_d,e_s h_s         ONE frozen down-projection, on the gated mix

With renormalised gates (k >= 2) the gates sum to 1 and y = sum_s w_s E_s(x), the gated sum of the experts' blocks
(at initialisation, B = 0, that is the frozen block up to rounding). With k = 1 the raw probability p is the gate and
y = MLP(x) + p (E(x) - MLP(x)), so the adapter starts as the block and the router still trains (the rule of the
per-linear layer); several active adapters each add their change to the frozen block's h_0 = act(G) * U. GPT-2's MLP
is the same without the gate projection: h_s = act(F + s B_f A_f x), then c_proj and its dropout.

Compared with LoRA at rank k*r on the three projections, the extra work is the N-fold wider rank space of the masked
up-projections of gate and up (k GEMMs of N*r columns instead of one of k*r) and k d_ff-wide elementwise passes.

The contrastive term (training only) contrasts each token's activated experts with m sampled inactive ones. Expert
j is represented by what it changes in the block's output, o_j = E_j(x) - MLP(x) = W_d (h_j - h_0) + s B_d A_d h_j:
for a per-linear expert this is exactly B_j A_j x, the representation the per-linear layer contrasts. No Gram trick
passes the nonlinearity, so the k + m representations are materialised ((T, k + m, d); k + m frozen down GEMMs).

With DoRA experts (`use_dora`, MixDoRA, see `block_dora.py`) every projection's output rows are rescaled per expert:
gate and up keep their shared frozen products, while the down projection's scale differs per expert, so it runs on
each active slot (k rows per token in one GEMM) instead of once on the gated mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .block_dora import (
    BlockScales,
    FrozenDown,
    block_scales,
    rescale_pre_activation,
    reset_block_magnitudes,
    routed_output,
    scaled_change,
)
from .dora import scale_columns
from .fused_down import router_dtype
from .layer import CoMoELayer, ExpertSettings, _as_dtype, routing_stats
from .losses import (
    contrastive_loss_from_outputs,
    load_balancing_loss,
    router_z_loss,
    sample_contrastive_indices,
)

__all__ = ["BLOCK_LAYOUTS", "Block", "BlockLayout", "block_layout", "describe_supported_blocks"]


@dataclass(frozen=True)
class BlockLayout:
    """Where the parts of a supported MLP block live (attribute names on the block)."""

    name: str
    inputs: tuple[str, ...]  # projections that read the block's input: (gate, up) or (fc,)
    output: str  # the projection that writes the block's output
    activation: str
    dropout: str | None = None  # applied after the output projection (GPT-2)

    @property
    def gated(self) -> bool:
        return len(self.inputs) == 2


BLOCK_LAYOUTS = (
    BlockLayout("gated (Llama, Qwen2, Mistral, Gemma, ...)", ("gate_proj", "up_proj"), "down_proj", "act_fn"),
    BlockLayout("GPT-2", ("c_fc",), "c_proj", "act", "dropout"),
)


def _is_projection(module: Any) -> bool:
    """A linear layer the block can call: torch Linear (bitsandbytes' quantized layers are subclasses) or Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def block_layout(module: nn.Module, unwrap: bool = False) -> BlockLayout | None:
    """The layout of `module` if it is a supported MLP block, else None. Its projections must be plain layers, or,
    with `unwrap`, may be adapted ones (peft tuner layers, judged by their base layers)."""
    for layout in BLOCK_LAYOUTS:
        parts = [getattr(module, name, None) for name in (*layout.inputs, layout.output)]
        if unwrap:
            parts = [part.get_base_layer() if hasattr(part, "get_base_layer") else part for part in parts]
        if all(_is_projection(part) for part in parts) and callable(getattr(module, layout.activation, None)):
            return layout
    return None


def describe_supported_blocks() -> str:
    """One phrase naming the supported block structures, for error messages."""
    return "; ".join(f"{layout.name}: {' / '.join((*layout.inputs, layout.output))} + {layout.activation}"
                     for layout in BLOCK_LAYOUTS)


def projection_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a projection inside a block: Conv1D stores its weight (in, out); linear layers, quantized
    ones included, carry in_features / out_features."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    from .bnb import quantized_in_out_features  # a quantized base: its weight is packed

    return quantized_in_out_features(module)


def _without_bias(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """module(z) minus its bias: the linear part W z of a frozen projection, any type (quantized included)."""
    out = module(z)
    bias = getattr(module, "bias", None)
    return out - bias.to(out.dtype) if isinstance(bias, torch.Tensor) else out


class Block(nn.Module, CoMoELayer):
    """Routed FFN-block experts on a transformer MLP block (see the module docstring for the computation).

    Per adapter the parameters are, with n the number of input projections (2 gated, 1 GPT-2), N experts of rank r,
    d the model width and f the block's hidden width:

        comoe_A      (n*N*r, d)   the input projections' LoRA down-projections, projection-major then expert
        comoe_B      (n, f, N*r)  their up-projections
        comoe_A_out  (N*r, f)     the output projection's down-projections
        comoe_B_out  (d, N*r)     its up-projections
        comoe_router (N, d)       the block's router, bias-free

    and with DoRA experts (`use_dora`, see `block_dora.py`) the magnitudes, one per projection and expert:

        comoe_magnitude      (n, N, f)  the input projections' m_p,j
        comoe_magnitude_out  (N, d)     the output projection's m_d,j
    """

    adapter_layer_names: tuple[str, ...] = ("comoe_A", "comoe_B", "comoe_A_out", "comoe_B_out", "comoe_router",
                                            "comoe_magnitude", "comoe_magnitude_out")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_args: Any) -> None:
        """`layer_args` are `update_layer`'s (r, lora_alpha, lora_dropout, settings, ...), as for `layer.Linear`."""
        super().__init__()
        layout = block_layout(base_layer)
        if layout is None:
            raise ValueError(f"{type(base_layer).__name__} is not a supported MLP block ({describe_supported_blocks()})")
        self.layout = layout
        CoMoELayer.__init__(self, base_layer)
        self.comoe_A_out = nn.ParameterDict({})
        self.comoe_B_out = nn.ParameterDict({})
        self.comoe_magnitude_out = nn.ParameterDict({})  # (N, d): DoRA experts only; comoe_magnitude is (n, N, f)
        self.hidden_features = projection_features(getattr(base_layer, layout.inputs[0]))[1]
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **layer_args)

    def _base_in_out_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        layout = block_layout(base)
        return projection_features(getattr(base, layout.inputs[0]))[0], projection_features(getattr(base, layout.output))[1]

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        """The adapters follow the block's output projection, which has the weight the block lacks: its device and
        dtype (a 4-bit layer's compute dtype), as peft reads them for a projection."""
        output = getattr(base_layer, self.layout.output)
        weight = getattr(output, "weight", None)
        if weight is None:
            return None, None
        return weight.device, getattr(output, "compute_dtype", None) or weight.dtype

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        """Put `adapter_name`'s parameters on the output projection's device and, where it is a float, dtype. peft
        0.19 and newer do this through `_get_base_layer_device_and_dtype`; peft 0.18 reads the block's own `weight`,
        finds none and would move nothing (a float64 or bf16 model would keep float32 adapters)."""
        if hasattr(BaseTunerLayer, "_get_base_layer_device_and_dtype"):
            super()._move_adapter_to_device_of_base_layer(adapter_name, device)
            return
        base_device, dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        device = device if device is not None else base_device
        if device is None:
            return
        dtype = dtype if dtype is not None and dtype.is_floating_point else None
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and not params[adapter_name].is_meta:
                params[adapter_name] = params[adapter_name].to(device, dtype=dtype)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        settings: ExpertSettings,
        init_weights: bool = True,
        router_init_std: float = 0.02,
        use_dora: bool = False,
        use_rslora: bool = False,
    ) -> None:
        """Create (or replace) the block experts and router of `adapter_name`; `use_dora` gives every expert a
        magnitude vector per projection (DoRA experts, `block_dora.py`)."""
        num_experts, inputs = settings.num_experts, len(self.layout.inputs)
        self._store_adapter_settings(adapter_name, r, lora_alpha, lora_dropout, settings, use_rslora)
        f = self.hidden_features
        self.comoe_A[adapter_name] = nn.Parameter(torch.empty(inputs * num_experts * r, self.in_features))
        self.comoe_B[adapter_name] = nn.Parameter(torch.empty(inputs, f, num_experts * r))
        self.comoe_A_out[adapter_name] = nn.Parameter(torch.empty(num_experts * r, f))
        self.comoe_B_out[adapter_name] = nn.Parameter(torch.empty(self.out_features, num_experts * r))
        self.comoe_router[adapter_name] = nn.Parameter(torch.empty(num_experts, self.in_features))
        if use_dora:
            self.comoe_magnitude[adapter_name] = nn.Parameter(torch.empty(inputs, num_experts, f))
            self.comoe_magnitude_out[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features))
        else:  # the adapter is (re-)created without DoRA
            for magnitudes in (self.comoe_magnitude, self.comoe_magnitude_out):
                if adapter_name in magnitudes:
                    del magnitudes[adapter_name]
        self.reset_parameters(adapter_name, init_weights, router_init_std)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if use_dora:  # after the move, as for the per-linear layer: every c starts at exactly 1
            reset_block_magnitudes(self, adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True, router_init_std: float = 0.02) -> None:
        """Every expert's A like LoRA's (Kaiming-uniform), B = 0 (random if `init_weights` is False), router N(0, std)."""
        if adapter_name not in self.comoe_A or self.comoe_A[adapter_name].is_meta:
            return
        r = self.r[adapter_name]
        for down in (self.comoe_A[adapter_name], self.comoe_A_out[adapter_name]):
            for expert_rows in down.split(r, dim=0):
                nn.init.kaiming_uniform_(expert_rows, a=math.sqrt(5))
        for up in (self.comoe_B[adapter_name], self.comoe_B_out[adapter_name]):
            if init_weights:
                nn.init.zeros_(up)
            else:
                nn.init.normal_(up, std=1.0 / math.sqrt(r))
        nn.init.normal_(self.comoe_router[adapter_name], std=router_init_std)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The block's output with, for each active adapter, its top-k block experts in place of the frozen block."""
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        adapters = [name for name in self.active_adapters if name in self.comoe_A]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_adapters(x, adapters).view(*x.shape[:-1], self.out_features)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Row i gets the block experts of `adapter_names[i]` (`"__base__"` or an adapter this block lacks: the
        frozen block), each adapter's rows computed together on the lean path. x: (B, ..., d)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} rows; give "
                             "one name per row")
        result = self.base_layer(x)  # (B, ..., d)
        for adapter_name in dict.fromkeys(adapter_names):
            if adapter_name not in self.comoe_A:
                continue
            rows = torch.tensor([i for i, name in enumerate(adapter_names) if name == adapter_name],
                                device=x.device)  # (B_a,)
            self.store_record(adapter_name, {}, None)
            rows_out = self._forward_adapters(x[rows], [adapter_name])  # (T_a, d)
            result[rows] = rows_out.view(result[rows].shape).to(result.dtype)
        return result

    def _forward_adapters(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """(T, d) output of the block with the given adapters' experts. One adapter: the frozen down-projection reads
        its gated mix of hidden activations (LoRA experts) or each active slot's (DoRA experts); several: each adds
        its difference from the frozen block."""
        base = self.get_base_layer()
        tokens = x.reshape(-1, self.in_features)  # (T, d)
        frozen_in = [getattr(base, name)(tokens) for name in self.layout.inputs]  # each (T, f)
        frozen_hidden = self._hidden(frozen_in) if self._needs_frozen_hidden(adapters) else None  # h_0: (T, f)
        hidden, added = None, None
        for position, adapter_name in enumerate(adapters):
            mix, extra = self._expert_mix(x, tokens, frozen_in, frozen_hidden, adapter_name)
            if position > 0:  # a further adapter adds E_a(x) - MLP(x): its h_0 share leaves the mix
                mix = -frozen_hidden if mix is None else mix - frozen_hidden
            if mix is not None:
                hidden = mix if hidden is None else hidden + mix.to(hidden.dtype)
            added = extra if added is None else added + extra
        out_proj = getattr(base, self.layout.output)
        if hidden is not None:
            y = out_proj(hidden.to(tokens.dtype))  # (T, d): the frozen down-projection on the mix, once
            y = y + added.to(y.dtype)
        else:  # one adapter of DoRA experts: its output already holds the frozen down-projections
            bias = getattr(out_proj, "bias", None)
            y = added + bias.to(added.dtype) if isinstance(bias, torch.Tensor) else added
        if self.layout.dropout is not None:
            y = getattr(base, self.layout.dropout)(y)
        return y

    def _needs_frozen_hidden(self, adapters: list[str]) -> bool:
        """h_0 = act(G) * U is needed for top-1 gates (not summing to 1), several adapters, or the contrastive
        representations; the lean path with k >= 2 never builds it (LoRA or DoRA experts)."""
        if len(adapters) > 1:
            return True
        settings = self.comoe_settings[adapters[0]]
        recording = self.training or self.forward_context.record_in_eval
        return settings.top_k == 1 or (recording and settings.contrastive)

    def _hidden(self, pre: list[torch.Tensor]) -> torch.Tensor:
        """The block's hidden activation from its input projections' outputs: act(g) * u, or act(f)."""
        act = getattr(self.get_base_layer(), self.layout.activation)
        return act(pre[0]) * pre[1] if self.layout.gated else act(pre[0])

    def _route(self, tokens: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """Router logits (T, N) in float32, probabilities (T, N), the top-k experts (T, k) and their gates (T, k)."""
        settings = self.comoe_settings[adapter_name]
        router = self.comoe_router[adapter_name]
        logit_dtype = router_dtype(router.dtype)
        router_x = _as_dtype(tokens, logit_dtype)
        jitter = settings.router_jitter_noise if self.training else 0.0
        if jitter > 0:
            router_x = router_x * torch.empty_like(router_x).uniform_(1.0 - jitter, 1.0 + jitter)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = router_x @ _as_dtype(router, logit_dtype).t()  # (T, N)
        probs = logits.softmax(dim=-1)
        top_p, topk_idx = probs.topk(settings.top_k, dim=-1)  # (T, k)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if settings.top_k > 1 else top_p
        return logits, probs, topk_idx, gates

    def _expert_mix(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        frozen_in: list[torch.Tensor],
        frozen_hidden: torch.Tensor | None,
        adapter_name: str,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One adapter's part of the block's output, for `_forward_adapters` to combine; records losses and statistics
        while training (or in `recording()`).

        LoRA experts: the gated mix of hidden activations, sum_s w_s h_s (+ (1 - w) h_0 for top-1 gates) (T, f), and
        the output-projection LoRA term (T, d). DoRA experts: None and the whole output without the bias (T, d), the
        down-projection's scales being per expert (`block_dora.routed_output`)."""
        settings = self.comoe_settings[adapter_name]
        num_experts, k, r, scaling = settings.num_experts, settings.top_k, self.r[adapter_name], self.scaling[adapter_name]
        down = self.comoe_A[adapter_name]
        scales = block_scales(self, adapter_name) if adapter_name in self.comoe_magnitude else None  # DoRA: the c
        logits, probs, topk_idx, gates = self._route(tokens, adapter_name)
        record = self.training or self.forward_context.record_in_eval
        indices = None
        chosen = topk_idx  # (T, S): the experts whose hidden activations are built
        if record and settings.contrastive:
            indices = sample_contrastive_indices(topk_idx, num_experts, settings.anchor, settings.num_negatives)
            chosen = torch.cat([topk_idx, indices.negative_idx], dim=1)  # (T, k + M)

        dropout = self.comoe_dropout[adapter_name]
        experts_x = dropout(_as_dtype(tokens, down.dtype))  # (T, d)
        rank_acts = (experts_x @ down.t()).view(tokens.shape[0], len(self.layout.inputs), num_experts, r)
        pre = self._chosen_pre_activations(rank_acts, frozen_in, chosen, adapter_name, scales)  # each (T, S, f)
        hidden = self._hidden(pre)  # (T, S, f): the chosen experts' hidden activations
        weights = gates.to(hidden.dtype)  # (T, k)
        # the active slots, sliced once and only when there are negatives (a slice's backward zero-fills its input)
        active = hidden if hidden.shape[1] == k else hidden[:, :k]  # (T, k, f)
        # A_out,e (w_s h_s) as w_s (A_out,e h_s): the gates applied in rank space, not at width f
        own_rank = self._own_output_rank_acts(dropout(active), topk_idx, adapter_name, weights)  # (T, k, N*r)
        frozen_down = None
        if scales is None:
            mix = (weights.unsqueeze(1) @ active).squeeze(1)  # (T, 1, k) @ (T, k, f) -> (T, f): sum_s w_s h_s
            if k == 1:  # y = MLP(x) + p (E(x) - MLP(x))
                mix = mix + (1.0 - weights[:, :1]) * frozen_hidden
            extra = own_rank.sum(dim=1) @ self.comoe_B_out[adapter_name].t() * scaling  # (T, d)
        else:  # DoRA experts: k frozen down-projections, then each slot's own row scale
            mix = None
            frozen_down = self._frozen_down(hidden, frozen_hidden, tokens.dtype)
            up_out = scale_columns(self.comoe_B_out[adapter_name], scales.output)  # (d, N*r): [c_1 B_1 ... c_N B_N]
            lora = own_rank.sum(dim=1) @ up_out.t() * scaling  # (T, d)
            frozen_part = routed_output(frozen_down, gates, topk_idx, scales.output)  # (T, d)
            extra = frozen_part + lora.to(frozen_part.dtype)

        if record:
            self._record(adapter_name, settings, x, logits, probs, topk_idx, indices, hidden, frozen_hidden, chosen,
                         scales, frozen_down)
        else:
            self.store_record(adapter_name, {}, None)
        return mix, extra

    def _frozen_down(self, hidden: torch.Tensor, frozen_hidden: torch.Tensor | None, dtype: torch.dtype) -> FrozenDown:
        """The frozen output projection of each slot, bias excluded, in one GEMM: W_d h_s (T, S, d) on the lean path
        (no h_0), else W_d (h_s - h_0) and W_d h_0 (T, S + 1 rows per token). hidden: (T, S, f); h_0: (T, f)."""
        out_proj = getattr(self.get_base_layer(), self.layout.output)
        num_tokens, slots, f = hidden.shape
        if frozen_hidden is None:
            rows = hidden  # (T, S, f)
        else:
            h_0 = frozen_hidden.unsqueeze(1).to(hidden.dtype)  # (T, 1, f)
            rows = torch.cat([hidden - h_0, h_0], dim=1)  # (T, S + 1, f)
        out = _without_bias(out_proj, rows.reshape(-1, f).to(dtype)).view(num_tokens, rows.shape[1], -1)
        if frozen_hidden is None:
            return FrozenDown(slots=out, frozen=None)
        return FrozenDown(slots=out[:, :slots], frozen=out[:, slots])  # (T, S, d), (T, d)

    @torch.no_grad()
    def expert_outputs(self, tokens: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Every expert's E_j(x) - MLP(x) for the tokens (T, d) -> (T, N, d): the representation the contrastive
        term compares, built for all N experts (for analyses on a few hundred tokens; training never does this)."""
        base = self.get_base_layer()
        frozen_in = [getattr(base, name)(tokens) for name in self.layout.inputs]  # each (T, f)
        frozen_hidden = self._hidden(frozen_in)  # (T, f)
        num_experts, r = self.comoe_settings[adapter_name].num_experts, self.r[adapter_name]
        down = self.comoe_A[adapter_name]
        scales = block_scales(self, adapter_name) if adapter_name in self.comoe_magnitude else None
        rank_acts = (_as_dtype(tokens, down.dtype) @ down.t()).view(tokens.shape[0], len(self.layout.inputs),
                                                                     num_experts, r)
        every = torch.arange(num_experts, device=tokens.device).expand(tokens.shape[0], -1)  # (T, N)
        pre = self._chosen_pre_activations(rank_acts, frozen_in, every, adapter_name, scales)  # (T, N, f) each
        hidden = self._hidden(pre)  # (T, N, f)
        frozen_down = None if scales is None else self._frozen_down(hidden, frozen_hidden, tokens.dtype)
        return self._expert_representations(adapter_name, hidden, frozen_hidden, every, scales, frozen_down)

    def _chosen_pre_activations(self, rank_acts: torch.Tensor, frozen_in: list[torch.Tensor], chosen: torch.Tensor,
                                adapter_name: str, scales: BlockScales | None = None) -> list[torch.Tensor]:
        """Each input projection's output for the chosen experts, frozen part plus s B_p,e A_p,e x (with DoRA
        experts, its rows then scaled by c_p,e, the bias kept as is): (T, S, f) each.

        rank_acts: (T, n, N, r) every expert's rank-space activation; chosen: (T, S) expert indices. Each chosen
        slot keeps only its own expert's r activations (a one-hot mask), so one GEMM against the stacked B_p per
        projection gives every slot its own expert's delta without gathering weights per token."""
        inputs, num_experts = rank_acts.shape[1:3]
        # (T, S, N, 1): the scaling s on each slot's own expert, 0 elsewhere (scaling in rank space, not at width f)
        mask = (torch.nn.functional.one_hot(chosen, num_experts).to(rank_acts.dtype)
                * self.scaling[adapter_name]).unsqueeze(-1)
        pre = []
        for p in range(inputs):
            own = rank_acts[:, p].unsqueeze(1) * mask  # (T, S, N, r): s A_p,e x in its block, zero elsewhere
            delta = own.flatten(2) @ self.comoe_B[adapter_name][p].t()  # (T, S, f)
            frozen = frozen_in[p].unsqueeze(1)  # (T, 1, f)
            # into the GEMM's own fresh output where the dtypes agree: one buffer of width f less per projection
            pre.append(delta.add_(frozen) if delta.dtype == frozen.dtype else frozen + delta.to(frozen.dtype))
            if scales is not None:
                bias = getattr(getattr(self.get_base_layer(), self.layout.inputs[p]), "bias", None)
                bias = bias if isinstance(bias, torch.Tensor) else None
                pre[p] = rescale_pre_activation(pre[p], bias, scales.inputs[p], chosen)
        return pre

    def _own_output_rank_acts(self, hidden: torch.Tensor, chosen: torch.Tensor, adapter_name: str,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
        """A_out,e h for each slot's own expert e (times the slot's weight where given), in its block of the stacked
        rank space: (T, S, N*r), zero elsewhere. hidden: (T, S, f); chosen and weights: (T, S)."""
        down_out = self.comoe_A_out[adapter_name]  # (N*r, f)
        num_experts = self.comoe_settings[adapter_name].num_experts
        num_tokens, slots, f = hidden.shape
        every = (_as_dtype(hidden, down_out.dtype).reshape(-1, f) @ down_out.t()).view(num_tokens, slots,
                                                                                        num_experts, -1)
        mask = torch.nn.functional.one_hot(chosen, num_experts).to(every.dtype)  # (T, S, N)
        if weights is not None:
            mask = mask * weights.unsqueeze(-1).to(every.dtype)
        return (every * mask.unsqueeze(-1)).flatten(2)  # (T, S, N*r)

    def _expert_representations(
        self,
        adapter_name: str,
        hidden: torch.Tensor,
        frozen_hidden: torch.Tensor,
        chosen: torch.Tensor,
        scales: BlockScales | None = None,
        frozen_down: FrozenDown | None = None,
    ) -> torch.Tensor:
        """o_j = E_j(x) - MLP(x) = W_d (h_j - h_0) + s B_d,j A_d,j h_j for the chosen experts: (T, S, d). DoRA
        experts: c_j * (W_d (h_j - h_0) + s B_d,j A_d,j h_j) + (c_j - 1) * W_d h_0, from the forward's
        `frozen_down`."""
        num_tokens, num_chosen, f = hidden.shape
        up_out = self.comoe_B_out[adapter_name]  # (d, N*r)
        if scales is None:
            out_proj = getattr(self.get_base_layer(), self.layout.output)
            difference = (hidden - frozen_hidden.unsqueeze(1)).reshape(-1, f)  # (T*S, f)
            frozen_part = _without_bias(out_proj, difference.to(frozen_hidden.dtype)).view(num_tokens, num_chosen, -1)
        else:
            frozen_part = scaled_change(frozen_down, scales.output, chosen)  # (T, S, d)
            up_out = scale_columns(up_out, scales.output)  # [c_1 B_1 ... c_N B_N]
        own_rank = self._own_output_rank_acts(hidden, chosen, adapter_name)  # (T, S, N*r)
        lora_part = own_rank @ up_out.t() * self.scaling[adapter_name]  # (T, S, d)
        return frozen_part.to(lora_part.dtype) + lora_part

    def _record(
        self,
        adapter_name: str,
        settings: ExpertSettings,
        x: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        topk_idx: torch.Tensor,
        indices: Any,
        hidden: torch.Tensor,
        frozen_hidden: torch.Tensor,
        chosen: torch.Tensor,
        scales: BlockScales | None = None,
        frozen_down: FrozenDown | None = None,
    ) -> None:
        token_mask = self.forward_context.token_mask(x)
        losses = {"balance": load_balancing_loss(logits, settings.top_k, token_mask),
                  "z": router_z_loss(logits, token_mask)}
        if indices is not None:  # the representations in the forward's dtypes; the loss itself in float32
            outputs = self._expert_representations(adapter_name, hidden, frozen_hidden, chosen, scales,
                                                   frozen_down)  # (T, k + M, d)
            losses["contrastive"] = contrastive_loss_from_outputs(
                outputs, indices, settings.contrastive_temperature, token_mask
            )
        self.store_record(adapter_name, losses, routing_stats(probs.detach(), topk_idx, token_mask))

    def __repr__(self) -> str:
        return "comoe." + super().__repr__()
