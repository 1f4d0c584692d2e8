"""The CoMoE layer: a frozen linear layer plus N routed LoRA experts, computed without per-expert loops.

Follow one token x (d_in) through `Linear._add_experts`:

    x -> one fused down-projection [A_1; ...; A_N; W_g] x     -> h (N, r) and router logits (N)
      -> p = softmax(logits) in float32, top-k, renormalise   -> dense gates g (N), zero off the top-k
      -> gated rank activations g_j * h_j                     -> (N*r)
      -> one up-projection [B_1 ... B_N], scaled by alpha / r -> added to the frozen output W0 x

The first three steps are one autograd node with a hand-written backward (`fused_down.RoutedDownProjection`).

With DoRA experts (`use_dora`), `dora.dora_mixture` rescales W0 x by the experts' magnitudes and replaces B_cat by
[c_1 B_1 ... c_N B_N] before the up-projection (see `dora.py`).

While training, the layer also records, for the last forward, the contrastive loss (from h and the Gram matrix of
the stacked B, see `losses.py`), the load-balancing and z losses, and routing statistics. Nothing d_out-wide per
expert is ever built.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers.pytorch_utils import Conv1D

from .dora import dora_mixture, reset_magnitude
from .fused_down import RoutedDownProjection, route, router_dtype
from .losses import contrastive_loss, load_balancing_loss, masked_mean, router_z_loss, sample_contrastive_indices

__all__ = [
    "CoMoELayer",
    "ExpertSettings",
    "ForwardContext",
    "Linear",
    "RoutingStats",
    "raise_merge_error",
    "route",  # defined in fused_down, kept importable from here
    "router_dtype",
    "routing_stats",
]


@dataclass(frozen=True)
class ExpertSettings:
    """Per-adapter settings of one CoMoE layer (derived from `CoMoEConfig` and the layer's position)."""

    num_experts: int
    top_k: int
    router_jitter_noise: float
    contrastive: bool
    contrastive_temperature: float
    num_negatives: int | None
    anchor: str


@dataclass
class RoutingStats:
    """Routing statistics of one adapted layer for the last forward (detached tensors, padding excluded).

    Attributes:
        expert_load: (N,) share of the valid tokens' top-k slots that went to each expert (sums to 1).
        routing_entropy: mean entropy (nats) of the tokens' routing distributions.
        num_tokens: number of valid tokens.
    """

    expert_load: torch.Tensor
    routing_entropy: torch.Tensor
    num_tokens: torch.Tensor


class ForwardContext:
    """State shared by a CoMoE model and its layers for the current forward: the attention mask and the records.

    The tuner's forward pre-hook calls `new_forward` once per model call: it stores the attention mask, which the
    layers read to leave padding out of the losses and statistics, and starts an empty `records` dict, so values
    from earlier calls never mix in. Gradient-checkpointing recomputation re-runs a layer within the same model
    call and overwrites its entry, so nothing is counted twice. Nothing here is an int counter or other value that
    `torch.compile` would have to guard on and recompile for.

    In eval mode the layers take their lean path and record nothing, unless `record_in_eval` is set (the trainers
    set it while evaluating; `CoMoEModel.recording()` sets it for analyses).
    """

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.records: dict[tuple[int, str], tuple[dict[str, torch.Tensor], RoutingStats]] = {}
        self.record_in_eval: bool = False

    def new_forward(self, attention_mask: torch.Tensor | None) -> None:
        """Start a model call: remember its attention mask and drop what the previous call recorded."""
        self.attention_mask = attention_mask
        self.records = {}

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (T,) mask of valid tokens for an input x of shape (batch, seq, d), or None if it does not apply."""
        mask = self.attention_mask
        if mask is None or x.dim() != 3 or mask.dim() != 2:
            return None
        batch, seq = x.shape[0], x.shape[1]
        if mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, -seq:].reshape(-1).to(device=x.device)  # (T,), generation with a cache: the newest positions


_layer_keys = itertools.count()


BASE_ROWS = "__base__"  # in a mixed-adapter batch, the rows that get no adapter (peft's name)


class CoMoELayer(BaseTunerLayer):
    """peft tuner-layer mixin holding every adapter's experts and router, keyed by adapter name."""

    adapter_layer_names: tuple[str, ...] = ("comoe_A", "comoe_B", "comoe_router", "comoe_magnitude")
    other_param_names: tuple[str, ...] = ("r", "lora_alpha", "scaling", "comoe_dropout", "comoe_settings",
                                          "comoe_magnitude_dtype")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.comoe_settings: dict[str, ExpertSettings] = {}
        self.comoe_dropout = nn.ModuleDict({})
        self.comoe_A = nn.ParameterDict({})  # (N*r, d_in): the experts' down-projections, stacked
        self.comoe_B = nn.ParameterDict({})  # (d_out, N*r): the experts' up-projections, side by side
        self.comoe_router = nn.ParameterDict({})  # (N, d_in): the router, bias-free
        self.comoe_magnitude = nn.ParameterDict({})  # (N, d_out): DoRA experts' magnitudes (use_dora only)
        self.comoe_magnitude_dtype: dict[str, torch.dtype] = {}  # the magnitudes' dtype when they were set (dora.py)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.forward_context = ForwardContext()  # the tuner replaces it with the model's shared context
        self._record_key = next(_layer_keys)  # this layer's key in `ForwardContext.records`
        in_features, out_features = self._base_in_out_features()
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)  # weight stored (in, out); set by type
        self.kwargs = kwargs

    def _base_in_out_features(self) -> tuple[int, int]:
        """(d_in, d_out) of the base layer; quantized layers (`comoe_peft.tuner.bnb`) override it."""
        return _get_in_out_features(self.get_base_layer())

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
        """Create (or replace) the experts and router of `adapter_name` on this layer.

        `use_dora` gives every expert a magnitude vector (see `comoe_peft.tuner.dora`); `use_rslora` scales the experts by
        lora_alpha / sqrt(r) instead of lora_alpha / r.
        """
        num_experts = settings.num_experts
        self._store_adapter_settings(adapter_name, r, lora_alpha, lora_dropout, settings, use_rslora)
        self.comoe_A[adapter_name] = nn.Parameter(torch.empty(num_experts * r, self.in_features))
        self.comoe_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, num_experts * r))
        self.comoe_router[adapter_name] = nn.Parameter(torch.empty(num_experts, self.in_features))
        if use_dora:
            self.comoe_magnitude[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features))
        elif adapter_name in self.comoe_magnitude:
            del self.comoe_magnitude[adapter_name]  # the adapter is re-created without DoRA
        self.reset_parameters(adapter_name, init_weights, router_init_std)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if use_dora:  # after the move, as peft's DoRA: m_j in the dtype the forward divides it in, so c_j is exactly 1
            reset_magnitude(self, adapter_name)
        self.set_adapter(self.active_adapters)

    def _store_adapter_settings(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                                settings: ExpertSettings, use_rslora: bool) -> None:
        """Rank, alpha, scaling (lora_alpha / r, or / sqrt(r) with rsLoRA), expert settings and dropout of an adapter:
        what every CoMoE layer (per-linear or block) keeps per adapter besides its weights."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.comoe_settings[adapter_name] = settings
        self.comoe_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True, router_init_std: float = 0.02) -> None:
        """A like LoRA (Kaiming-uniform per expert), B = 0 (or random if `init_weights` is False), router N(0, std).

        DoRA magnitudes are not set here: `update_layer` sets them (`dora.reset_magnitude`) once the adapter has the
        base layer's device and dtype."""
        if adapter_name not in self.comoe_A or self.comoe_A[adapter_name].is_meta:
            return
        r = self.r[adapter_name]
        down = self.comoe_A[adapter_name]
        for expert_rows in down.split(r, dim=0):  # same fan-in bound as one LoRA A of rank r
            nn.init.kaiming_uniform_(expert_rows, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.comoe_B[adapter_name])
        else:
            nn.init.normal_(self.comoe_B[adapter_name], std=1.0 / math.sqrt(r))
        nn.init.normal_(self.comoe_router[adapter_name], std=router_init_std)

    # ------------------------------------------------------------------ merging is impossible

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Always raises: routed experts cannot be folded into the base weight (see `raise_merge_error`)."""
        raise_merge_error()

    def unmerge(self) -> None:
        """Nothing to undo: CoMoE adapters are never merged."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Always raises: the adapted layer's weight change depends on the token, so there is no single delta."""
        raise_merge_error()

    # ------------------------------------------------------------------ recorded losses and statistics

    def recorded_aux_losses(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The auxiliary losses this layer recorded for `adapter_name` in the current forward ({} if none)."""
        entry = self.forward_context.records.get((self._record_key, adapter_name))
        return entry[0] if entry is not None else {}

    def recorded_routing_stats(self, adapter_name: str) -> RoutingStats | None:
        """The routing statistics recorded for `adapter_name` in the current forward, or None (eval mode without
        recording)."""
        entry = self.forward_context.records.get((self._record_key, adapter_name))
        return entry[1] if entry is not None else None

    def store_record(self, adapter_name: str, losses: dict[str, torch.Tensor], stats: RoutingStats | None) -> None:
        """Record this forward's losses and statistics for `adapter_name` (None: forget what was recorded)."""
        key = (self._record_key, adapter_name)
        if stats is None:
            self.forward_context.records.pop(key, None)
        else:
            self.forward_context.records[key] = (losses, stats)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.forward_context.records.pop((self._record_key, adapter_name), None)


class Linear(nn.Module, CoMoELayer):
    """CoMoE experts on a `torch.nn.Linear` or a transformers `Conv1D` (GPT-2's transposed linear layer)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        settings: ExpertSettings,
        init_weights: bool = True,
        router_init_std: float = 0.02,
        use_dora: bool = False,
        use_rslora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        CoMoELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, settings, init_weights, router_init_std, use_dora, use_rslora
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen layer's output plus, for each active adapter, the gated sum of its top-k experts."""
        adapter_names = kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        for adapter_name in self.active_adapters:
            if adapter_name in self.comoe_A:
                result = self._add_experts(x, result, adapter_name)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """A mixed-adapter batch: row i gets the experts of `adapter_names[i]` (`BASE_ROWS` or an adapter this layer
        does not have: none), each adapter's rows computed together on the lean inference path.

        x: (B, ..., d_in); result: the base layer's (B, ..., d_out), a new tensor whose rows are replaced.
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} rows; give "
                             "one name per row")
        for adapter_name in dict.fromkeys(adapter_names):  # each adapter once, in order of first appearance
            if adapter_name not in self.comoe_A:
                continue
            rows = torch.tensor([i for i, name in enumerate(adapter_names) if name == adapter_name],
                                device=x.device)  # (B_a,)
            self.store_record(adapter_name, {}, None)
            result[rows] = self._add_experts_lean(x[rows], result[rows], adapter_name).to(result.dtype)
        return result

    def _add_experts(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.training and not self.forward_context.record_in_eval:
            self.store_record(adapter_name, {}, None)
            return self._add_experts_lean(x, result, adapter_name)
        return self._add_experts_recorded(x, result, adapter_name)

    def _add_experts_recorded(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Training (and recorded evaluation): the fused Function, then losses and statistics are recorded."""
        settings = self.comoe_settings[adapter_name]
        down = self.comoe_A[adapter_name]  # (N*r, d_in)
        up = self.comoe_B[adapter_name]  # (d_out, N*r)
        router = self.comoe_router[adapter_name]  # (N, d_in)
        tokens = x.reshape(-1, self.in_features)  # (T, d_in), cast to the adapter dtype inside the Function

        expert_input, router_input = self._expert_and_router_inputs(tokens, adapter_name)
        gated, h, router_logits, topk_idx, probs = RoutedDownProjection.apply(
            expert_input, router_input, down, router, settings.num_experts, settings.top_k
        )  # (T, N*r), (T, N*r), (T, N) float32, (T, k), (T, N)
        if adapter_name in self.comoe_magnitude:  # DoRA experts: rescale W0 x, use [c_j B_j] as B (dora.py)
            result, up = dora_mixture(self, adapter_name, x, result, up, router_logits, topk_idx)
        self._record(adapter_name, settings, h, up, router_logits, probs, topk_idx, x)
        return _add_up_projection(result, gated, up, self.scaling[adapter_name])

    def _add_experts_lean(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Inference: the same output as the recorded path with the fewest operations.

        No autograd Function (plain differentiable ops, so `torch.compile` traces it and gradients still flow),
        no statistics, no float32 copy of a float32 input, and the top-k taken on the logits (softmax is monotonic):
        the k > 1 gates are the softmax over the k chosen logits, which equals the renormalised top-k probabilities.
        The dense (T, N) gate matrix keeps it at two GEMMs for any number of tokens; at decoding sizes (a few tokens)
        the cost is the number of operations, which gathering the chosen experts' weights would only raise.
        """
        settings = self.comoe_settings[adapter_name]
        down = self.comoe_A[adapter_name]  # (N*r, d_in)
        up = self.comoe_B[adapter_name]  # (d_out, N*r)
        router = self.comoe_router[adapter_name]  # (N, d_in)
        tokens = x.reshape(-1, self.in_features)  # (T, d_in)
        experts_x = _as_dtype(tokens, down.dtype)  # (T, d_in); one cast serves the router too when dtypes agree
        logit_dtype = router_dtype(down.dtype)
        router_x = experts_x if experts_x.dtype == logit_dtype else _as_dtype(tokens, logit_dtype)
        logits = router_x @ _as_dtype(router, logit_dtype).t()  # (T, N), float32
        if settings.top_k > 1:
            top_logits, topk_idx = logits.topk(settings.top_k, dim=-1)  # (T, k)
            top_gates = top_logits.softmax(dim=-1)  # (T, k), the renormalised top-k probabilities
        else:
            top_gates, topk_idx = logits.softmax(dim=-1).topk(1, dim=-1)  # (T, 1), the raw probability
        h = experts_x @ down.t()  # (T, N*r)
        gates = torch.zeros(h.shape[0], settings.num_experts, dtype=h.dtype, device=h.device)
        gates = gates.scatter_(1, topk_idx, _as_dtype(top_gates, h.dtype))  # (T, N), zero off the top-k
        gated = (h.view(-1, settings.num_experts, self.r[adapter_name]) * gates.unsqueeze(-1)).view(h.shape)
        if adapter_name in self.comoe_magnitude:  # DoRA experts (dora.py), with plain ops here too
            result, up = dora_mixture(self, adapter_name, x, result, up, logits, topk_idx, lean=True)
        return _add_up_projection(result, gated, up, self.scaling[adapter_name])  # (T, N*r) -> result's shape

    def _expert_and_router_inputs(
        self, tokens: torch.Tensor, adapter_name: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The experts' input (after dropout) and the router's input (after jitter); None for the router's when
        neither is active, which lets `RoutedDownProjection` read x once for both (and gives `torch.compile` no
        tensor passed twice to one Function)."""
        dropout = self.comoe_dropout[adapter_name]
        expert_input = tokens
        if self.training and isinstance(dropout, nn.Dropout):
            expert_input = dropout(self._cast_input_dtype(tokens, self.comoe_A[adapter_name].dtype))  # as peft LoRA
        jitter = self.comoe_settings[adapter_name].router_jitter_noise if self.training else 0.0
        router_input = None if expert_input is tokens else tokens
        if jitter > 0:
            router_input = tokens.to(router_dtype(self.comoe_A[adapter_name].dtype))  # (T, d_in), float32
            router_input = router_input * torch.empty_like(router_input).uniform_(1.0 - jitter, 1.0 + jitter)
        return expert_input, router_input

    def _record(
        self,
        adapter_name: str,
        settings: ExpertSettings,
        h: torch.Tensor,
        up: torch.Tensor,
        router_logits: torch.Tensor,
        probs: torch.Tensor,
        topk_idx: torch.Tensor,
        x: torch.Tensor,
    ) -> None:
        token_mask = self.forward_context.token_mask(x)
        losses: dict[str, torch.Tensor] = {}
        if self.training or self.forward_context.record_in_eval:
            losses["balance"] = load_balancing_loss(router_logits, settings.top_k, token_mask)
            losses["z"] = router_z_loss(router_logits, token_mask)
            if settings.contrastive:
                indices = sample_contrastive_indices(
                    topk_idx, settings.num_experts, settings.anchor, settings.num_negatives
                )
                h_experts = h.view(-1, settings.num_experts, self.r[adapter_name])  # (T, N, r)
                losses["contrastive"] = contrastive_loss(
                    h_experts, up, indices, settings.contrastive_temperature, token_mask
                )
        self.store_record(adapter_name, losses, routing_stats(probs.detach(), topk_idx, token_mask))

    def __repr__(self) -> str:
        return "comoe." + super().__repr__()


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without an operation when it already is (a cast is a dispatch even when it is a no-op)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _add_up_projection(result: torch.Tensor, gated: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * gated @ up^T, out of place, in result's shape and dtype (one addmm when dtypes agree)."""
    out_2d = result.reshape(-1, up.shape[0])  # (T, d_out)
    if out_2d.dtype == gated.dtype:
        out_2d = torch.addmm(out_2d, gated, up.t(), alpha=scaling)  # W0 x + s * B (g h)
    else:
        out_2d = out_2d + (gated @ up.t() * scaling).to(out_2d.dtype)
    return out_2d.view(result.shape)


@torch.no_grad()
def routing_stats(probs: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None) -> RoutingStats:
    """Expert load and routing entropy over the valid tokens (no host synchronisation)."""
    num_tokens, num_experts = probs.shape
    weights = torch.ones(num_tokens, device=probs.device) if token_mask is None else token_mask.float()
    slot_weights = weights.unsqueeze(1).expand_as(topk_idx).reshape(-1)  # (T*k,)
    load = torch.zeros(num_experts, device=probs.device).scatter_add_(0, topk_idx.reshape(-1), slot_weights)
    load = load / load.sum().clamp_min(1e-9)
    entropy = torch.special.entr(probs).sum(dim=-1)  # (T,): -sum p log p, with 0 log 0 = 0
    return RoutingStats(load, masked_mean(entropy, weights), weights.sum())


def raise_merge_error() -> None:
    """CoMoE adapters cannot be merged into the base weight; raise an error that says why and what to do."""
    raise NotImplementedError(
        "CoMoE adapters cannot be merged into the base weights: the experts are chosen per token by the router, so "
        "no single weight matrix equals the adapted layer. Keep the adapter unmerged (it adds the routing and a "
        "small rank-space computation to each adapted layer), or use `unload()` to get the base model back."
    )
