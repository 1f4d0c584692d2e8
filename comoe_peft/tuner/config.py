"""`CoMoEConfig`: the configuration of a CoMoE adapter (routed LoRA experts plus the contrastive loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .peft_type import COMOE

ANCHOR_RULES = ("random", "all")
BIAS_OPTIONS = ("none", "all", "comoe_only")
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "num_experts_pattern")


@dataclass
class CoMoEConfig(PeftConfig):
    """Configuration of a CoMoE adapter.

    Every targeted linear layer gets `num_experts` LoRA experts of rank `r` and a per-token router that activates
    the `top_k` most probable experts. While training, the contrastive loss of the CoMoE paper (Feng et al.,
    EMNLP 2025 Findings) pulls the outputs of the activated experts of a token together and pushes them away from
    the inactivated ones; `contrastive_loss_coef` weighs it against the task loss.

    The fields that share a name with `peft.LoraConfig` (`r`, `lora_alpha`, `lora_dropout`, `target_modules`, ...)
    mean the same thing. Invalid values raise a `ValueError` that names the field.

    Example:
        ```python
        from peft import get_peft_model
        from comoe_peft import CoMoEConfig

        config = CoMoEConfig(r=8, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(base_model, config)
        ```
    """

    r: int = field(default=8, metadata={"help": "Rank of every LoRA expert."})
    lora_alpha: float = field(
        default=16, metadata={"help": "LoRA scaling numerator: expert outputs are scaled by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input (not the router's)."})
    num_experts: int = field(default=4, metadata={"help": "Number of LoRA experts per adapted layer (N)."})
    top_k: int = field(default=2, metadata={"help": "Number of experts each token activates (k)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex (full match) to adapt, or 'all-linear' for every linear "
            "layer except the output head. If None, the default of the model architecture is used (as in LoRA)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex that must not be adapted."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Adapt only these layer indices (as in LoRA)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers' or 'h'), used with layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules that are fully trained and saved with the adapter."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Token indices whose embeddings are trained (peft's trainable tokens)."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True if the base layers store their weight as (in, out), like GPT-2's Conv1D. Each layer uses "
            "the orientation of its own type (Conv1D: True, torch.nn.Linear: False), so a model may mix both; a value "
            "that disagrees with a layer's type warns, as in peft LoRA, and this config is never changed."
        },
    )
    bias: Literal["none", "all", "comoe_only"] = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all', or 'comoe_only' (adapted layers)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: experts' B start at zero, so the adapter starts as the identity (recommended). "
            "False: B is random too (for tests)."
        },
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the router's normal initialisation."})
    router_jitter_noise: float = field(
        default=0.0,
        metadata={"help": "Multiplicative uniform noise on the router input while training (as in Mixtral); 0 = off."},
    )
    contrastive_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight lambda of the contrastive loss (the paper's best: 0.01); 0 = off."}
    )
    contrastive_temperature: float = field(
        default=0.1, metadata={"help": "Temperature tau of the contrastive logits (cosine / tau)."}
    )
    num_negatives: int | None = field(
        default=None,
        metadata={
            "help": "Inactive experts sampled per token as negatives; None = all N - k inactive experts. Sampled "
            "negatives are reweighted so the denominator stays unbiased."
        },
    )
    anchor: Literal["random", "all"] = field(
        default="random",
        metadata={
            "help": "'random': one random activated expert per token is the anchor (the paper's Algorithm 1); "
            "'all': every activated expert is an anchor in turn (the paper's Eq. 12)."
        },
    )
    contrastive_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layer indices that compute the contrastive loss (experts stay everywhere); None = all."},
    )
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the Switch-Transformer load-balancing loss; 0 = off (the paper)."}
    )
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the router z-loss; 0 = off."})
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "Make every expert a DoRA update of the frozen weight (the paper's CoMoE-DoRA): expert j has its "
            "own magnitude vector m_j and its layer is m_j * (W0 + s B_j A_j) / ||W0 + s B_j A_j|| (row norms, "
            "treated as constants in backward, as in peft's DoRA). Starts equal to the base layer."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={
            "help": "Rank-stabilised LoRA: scale the experts by lora_alpha / sqrt(r) instead of lora_alpha / r "
            "(with each layer's own r and alpha)."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer ranks that differ from r: {module name or regex: rank}, matched as in peft's "
            "LoraConfig (the key must match the end of the module name), e.g. {'layers.0.self_attn.q_proj': 16}."
        },
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer alphas that differ from lora_alpha: {module name or regex: alpha}, matched like "
            "rank_pattern."
        },
    )
    num_experts_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer numbers of experts that differ from num_experts (layer-wise allocation as in MoLA): "
            "{module name or regex: N}, matched like rank_pattern. top_k is the same everywhere."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = COMOE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.contrastive_layers is not None:
            self.contrastive_layers = sorted({int(i) for i in self.contrastive_layers})
        for name in PATTERN_FIELDS:
            value = getattr(self, name)
            _require(value is None or isinstance(value, dict), name, f"must be a dict, got {value!r}")
            setattr(self, name, dict(value or {}))  # a copy: the caller's dict is never changed
        self._validate()

    @property
    def uses_contrastive_loss(self) -> bool:
        """Whether the contrastive term is computed while training."""
        return self.contrastive_loss_coef > 0

    def check_layer_experts(self, num_experts: int, contrastive: bool, field_name: str, where: str) -> None:
        """Raise a ValueError naming `field_name` and `where` (the modules concerned) if a layer with `num_experts`
        experts cannot route top_k of them, or, when it computes the contrastive loss, has no inactive expert as a
        negative or fewer than num_negatives."""
        top_k = self.top_k
        _require(
            top_k <= num_experts,
            field_name,
            f"gives {where} {num_experts} experts, fewer than top_k={top_k}; use at least top_k experts there",
        )
        if not contrastive:
            return
        _require(
            top_k < num_experts,
            field_name,
            f"gives {where} {num_experts} experts while contrastive_loss_coef > 0 and top_k={top_k}: an inactive "
            "expert is needed as a negative, so that layer needs more than top_k experts",
        )
        _require(
            self.num_negatives is None or self.num_negatives <= num_experts - top_k,
            field_name,
            f"gives {where} {num_experts} experts, so {num_experts - top_k} inactive expert(s) per token, fewer "
            f"than num_negatives={self.num_negatives}",
        )

    def _validate(self) -> None:
        _require(isinstance(self.r, int) and self.r > 0, "r", f"must be a positive integer, got {self.r!r}")
        _require(self.lora_alpha > 0, "lora_alpha", f"must be positive, got {self.lora_alpha!r}")
        _require(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        _require(
            isinstance(self.num_experts, int) and self.num_experts >= 2,
            "num_experts",
            f"must be an integer >= 2 (a single expert is plain LoRA), got {self.num_experts!r}",
        )
        _require(
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}",
        )
        _require(self.bias in BIAS_OPTIONS, "bias", f"must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        _require(self.anchor in ANCHOR_RULES, "anchor", f"must be one of {ANCHOR_RULES}, got {self.anchor!r}")
        _require(self.router_init_std > 0, "router_init_std", f"must be positive, got {self.router_init_std!r}")
        _require(
            0 <= self.router_jitter_noise < 1,
            "router_jitter_noise",
            f"must be in [0, 1), got {self.router_jitter_noise!r}",
        )
        for name in ("contrastive_loss_coef", "router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            _require(value >= 0, name, f"must be >= 0 (0 turns the loss off), got {value!r}")
        _require(
            self.contrastive_temperature > 0,
            "contrastive_temperature",
            f"must be positive, got {self.contrastive_temperature!r}",
        )
        if self.uses_contrastive_loss:
            self._validate_contrastive_routing()
        self._validate_patterns()
        if self.contrastive_layers is not None:
            _require(
                all(i >= 0 for i in self.contrastive_layers),
                "contrastive_layers",
                f"must be non-negative layer indices, got {self.contrastive_layers!r}",
            )

    def _validate_patterns(self) -> None:
        for key, rank in self.rank_pattern.items():
            _require(_is_positive_int(rank), "rank_pattern", f"entry {key!r} must be a positive integer, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            _require(
                isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
                "alpha_pattern",
                f"entry {key!r} must be positive, got {alpha!r}",
            )
        for key, num_experts in self.num_experts_pattern.items():
            _require(
                _is_positive_int(num_experts) and num_experts >= 2,
                "num_experts_pattern",
                f"entry {key!r} must be an integer >= 2 (a single expert is plain LoRA), got {num_experts!r}",
            )
            # contrastive_layers set: whether this layer computes the loss is known only at injection
            contrastive = self.uses_contrastive_loss and self.contrastive_layers is None
            self.check_layer_experts(num_experts, contrastive, "num_experts_pattern", f"the modules matching {key!r}")

    def _validate_contrastive_routing(self) -> None:
        _require(
            self.top_k >= 2,
            "top_k",
            f"must be >= 2 while contrastive_loss_coef > 0: the anchor needs another activated expert as its "
            f"positive (got top_k={self.top_k}); set contrastive_loss_coef=0 for top-1 routing",
        )
        _require(
            self.top_k < self.num_experts,
            "top_k",
            f"must be < num_experts while contrastive_loss_coef > 0: an inactive expert is needed as a negative "
            f"(got top_k={self.top_k}, num_experts={self.num_experts})",
        )
        max_negatives = self.num_experts - self.top_k
        _require(
            self.num_negatives is None
            or (isinstance(self.num_negatives, int) and 1 <= self.num_negatives <= max_negatives),
            "num_negatives",
            f"must be None (all inactive experts) or an integer in [1, num_experts - top_k = {max_negatives}], "
            f"got {self.num_negatives!r}",
        )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"CoMoEConfig.{field_name} {message}.")
