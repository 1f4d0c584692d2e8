"""Expert specialisation, measured: per-task routing, expert diversity and the InfoNCE bound of a CoMoE model.

The CoMoE paper shows specialisation only qualitatively (per-task expert-load bars, a 2-D scatter of expert
outputs). `analyze_model` turns it into numbers. It feeds every task's texts (`format_prompt(row) + " " + answer`)
through the model and, with forward hooks on the CoMoE layers, measures per module and task:

- **expert load**: share of the valid tokens' top-k slots that went to each expert (sums to 1);
- **routing entropy**: mean entropy (nats) of the tokens' full router distributions; log N = uniform, 0 = one-hot;
- **load CV**: std / mean of the expert load; 0 = perfectly balanced, sqrt(N - 1) = one expert takes all;
- **pairwise cosine**: mean cosine between the expert outputs o_j = B_j A_j x (all N experts, pairs i < j, per
  token, then mean over tokens); 1 = redundant experts, 0 = orthogonal;
- **contrastive loss**: the paper's L_con per anchor, every activated expert an anchor in turn, all N - k inactive
  experts as negatives (deterministic: the mean of Algorithm 1 over its anchors);
- **InfoNCE bound**: log(M) - L_con with M = N - k: the paper's lower bound on the mutual-information gap between
  activated and inactive experts (higher = more specialised);

and across tasks the Jensen-Shannon divergence between the tasks' expert loads (0 = same experts for every task,
log 2 = disjoint experts), per module, per layer and averaged over modules. Runs trained without the contrastive
term are measured the same way: that is the comparison the numbers are for.

`write_report` saves the result as `analysis.json`, a markdown summary `analysis.md` and heatmaps
(`plot_expert_load`, `plot_js_matrix`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import re
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .analysis_metrics import (
    infonce_bound,
    load_coefficient_of_variation,
    pairwise_js_matrix,
    routing_entropy,
)
from .data import format_prompt, pad_token_id
from comoe_peft.tuner.block import Block
from comoe_peft.tuner.dora import contrasted_up_projection
from comoe_peft.tuner.fused_down import route, router_dtype
from comoe_peft.tuner.layer import CoMoELayer
from comoe_peft.tuner.losses import (
    NORM_EPS,
    contrastive_loss,
    contrastive_loss_from_outputs,
    sample_contrastive_indices,
)
from comoe_peft.tuner.model import layer_index

TOKENS_PER_MODULE_PER_BATCH = 256  # tokens kept per module and batch for the cosine and the contrastive loss
JSON_FILE = "analysis.json"
MARKDOWN_FILE = "analysis.md"
JS_FILE = "js_matrix.png"

METRIC_HELP = {
    "routing_entropy": "mean entropy (nats) of each token's router distribution over all experts; "
    "log N means uniform routing, 0 means every token is sure of its experts.",
    "load_cv": "coefficient of variation (std / mean) of the expert load, the share of top-k slots each expert "
    "receives; 0 is perfectly balanced, sqrt(N - 1) means one expert takes everything.",
    "mean_pairwise_cosine": "mean cosine similarity between the outputs B_j A_j x of every pair of experts on the "
    "same token; 1 means redundant experts, lower means more diverse (specialised) experts.",
    "contrastive_loss": "the paper's contrastive loss L_con per anchor (activated experts as positives, the N - k "
    "inactive experts as negatives), measured whether or not the run trained with it.",
    "infonce_bound": "log(M) - L_con with M = N - k negatives: the paper's lower bound on the mutual-information gap "
    "between activated and inactive experts; higher means more specialised experts.",
    "js": "Jensen-Shannon divergence (nats) between two tasks' expert loads, per module then averaged; 0 means the "
    "tasks use the same experts, log 2 = 0.693 means disjoint experts.",
}


# ------------------------------------------------------------------ per-module accumulation


class _ModuleAccumulator:
    """Running sums of one module's statistics for one task, fed batch by batch from the forward hook."""

    def __init__(self, num_experts: int) -> None:
        self.load_counts = torch.zeros(num_experts, dtype=torch.float64)  # top-k slots per expert
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64)  # summed router probabilities
        self.entropy_sum = 0.0
        self.num_tokens = 0
        self.cosine_sum = 0.0
        self.contrastive_sum = 0.0
        self.num_sampled = 0

    def result(self, num_experts: int, top_k: int) -> dict[str, Any]:
        load = (self.load_counts / self.load_counts.sum().clamp_min(1.0)).tolist()
        has_tokens = self.num_tokens > 0
        contrastive = None
        if self.num_sampled and _contrastive_defined(num_experts, top_k):
            contrastive = self.contrastive_sum / self.num_sampled
        return {
            "expert_load": load,
            "mean_router_probs": (self.prob_sum / max(self.num_tokens, 1)).tolist(),
            "routing_entropy": self.entropy_sum / self.num_tokens if has_tokens else None,
            "load_cv": load_coefficient_of_variation(load) if has_tokens else None,
            "mean_pairwise_cosine": self.cosine_sum / self.num_sampled if self.num_sampled else None,
            "contrastive_loss": contrastive,
            "infonce_bound": infonce_bound(num_experts - top_k, contrastive) if contrastive is not None else None,
            "num_tokens": self.num_tokens,
            "num_sampled_tokens": self.num_sampled,
        }


def _contrastive_defined(num_experts: int, top_k: int) -> bool:
    """L_con needs a positive (k >= 2) and a negative (k < N) for every anchor."""
    return 2 <= top_k < num_experts


def token_expert_cosines(outputs: torch.Tensor) -> torch.Tensor:
    """Per-token mean cosine over expert pairs i < j of explicit expert outputs (T, N, d): (T,). An output shorter
    than `NORM_EPS` has no direction: its cosines count as 0."""
    num_experts = outputs.shape[1]
    norms = outputs.norm(dim=-1, keepdim=True)  # (T, N, 1)
    unit = torch.where(norms > NORM_EPS, outputs / norms.clamp_min(NORM_EPS), torch.zeros_like(outputs))
    cosines = unit @ unit.transpose(1, 2)  # (T, N, N)
    upper = torch.triu_indices(num_experts, num_experts, offset=1, device=outputs.device)
    return cosines[:, upper[0], upper[1]].mean(dim=-1)  # (T,)


def expert_outputs_cosine(h: torch.Tensor, expert_up: torch.Tensor) -> torch.Tensor:
    """Per-token mean cosine over expert pairs i < j of o_j = B_j h_j: (T,).

    `h` (T, N, r) holds the rank-space activations A_j x, `expert_up` (d_out, N*r) the stacked B. The d_out-wide
    outputs are built explicitly (analysis only, on a few hundred tokens). As in the contrastive loss, an output
    shorter than `NORM_EPS` (every expert when B = 0 at initialisation) has no direction: its cosines count as 0.
    """
    _, num_experts, rank = h.shape
    up = expert_up.to(h.dtype).view(-1, num_experts, rank)  # (d_out, N, r)
    return token_expert_cosines(torch.einsum("tnr,dnr->tnd", h, up))  # from (T, N, d_out)


class _Recorder:
    """Forward hooks on every CoMoE layer of a model, accumulating statistics into the current task's slot."""

    def __init__(self, layers: dict[str, CoMoELayer], adapter: str, temperature: float | None, seed: int) -> None:
        self.layers = layers
        self.adapter = adapter
        self.temperature = temperature
        self.seed = seed
        self.stats: dict[str, dict[str, _ModuleAccumulator]] = defaultdict(dict)  # task -> module -> sums
        self.task: str | None = None
        self.attention_mask: torch.Tensor | None = None
        self.generator = torch.Generator()

    def start_task(self, task: str) -> None:
        self.task = task
        self.generator.manual_seed(self.seed)  # a task's token subsample does not depend on the other tasks

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module: CoMoELayer, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._accumulate(name, module, args[0])

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, layer: CoMoELayer, x: torch.Tensor) -> None:
        adapter = self.adapter
        settings = layer.comoe_settings[adapter]
        num_experts, top_k, rank = settings.num_experts, settings.top_k, layer.r[adapter]
        tokens = x.reshape(-1, x.shape[-1])  # (T, d_in), batch and sequence flattened
        mask = self.attention_mask
        if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            tokens = tokens[mask.reshape(-1).to(tokens.device).bool()]  # (V, d_in): valid tokens only
        if tokens.shape[0] == 0:
            return
        acc = self.stats[self.task].get(name)
        if acc is None:
            acc = self.stats[self.task][name] = _ModuleAccumulator(num_experts)

        # routing of every valid token, in float32
        router = layer.comoe_router[adapter]  # (N, d_in)
        compute = router_dtype(tokens.dtype)
        logits = tokens.to(compute) @ router.to(compute).t()  # (V, N)
        probs, topk_idx, _ = route(logits, top_k)  # (V, N), (V, k)
        acc.load_counts += torch.bincount(topk_idx.reshape(-1), minlength=num_experts).double().cpu()
        acc.prob_sum += probs.sum(dim=0).double().cpu()
        acc.entropy_sum += routing_entropy(probs) * probs.shape[0]
        acc.num_tokens += probs.shape[0]

        # expert outputs on a seeded subsample of the valid tokens
        keep = torch.randperm(tokens.shape[0], generator=self.generator)[:TOKENS_PER_MODULE_PER_BATCH]
        keep = keep.to(tokens.device)
        if isinstance(layer, Block):
            self._accumulate_block_outputs(acc, layer, tokens[keep], topk_idx[keep], settings)
            return
        sample = tokens[keep].to(compute)  # (S, d_in)
        down = layer.comoe_A[adapter].to(compute)  # (N*r, d_in)
        up = contrasted_up_projection(layer, adapter)  # (d_out, N*r): B_cat, or [c_j B_j] for DoRA experts
        h = (sample @ down.t()).view(-1, num_experts, rank)  # (S, N, r)
        acc.cosine_sum += float(expert_outputs_cosine(h, up.to(compute)).sum())
        if _contrastive_defined(num_experts, top_k):
            tau = self.temperature if self.temperature is not None else settings.contrastive_temperature
            # every activated expert an anchor, every inactive one a negative: deterministic
            indices = sample_contrastive_indices(topk_idx[keep], num_experts, "all", None)
            per_token = contrastive_loss(h, up, indices, tau)  # mean over tokens of the sum over the k anchors
            acc.contrastive_sum += float(per_token) / top_k * h.shape[0]  # per anchor, summed over tokens
        acc.num_sampled += h.shape[0]


    def _accumulate_block_outputs(self, acc: _ModuleAccumulator, layer: Block, sample: torch.Tensor,
                                  topk_idx: torch.Tensor, settings: Any) -> None:
        """Block experts: cosines and the contrastive loss from explicit E_j(x) - MLP(x) (no Gram trick there)."""
        outputs = layer.expert_outputs(sample, self.adapter).float()  # (S, N, d)
        acc.cosine_sum += float(token_expert_cosines(outputs).sum())
        num_experts, top_k = settings.num_experts, settings.top_k
        if _contrastive_defined(num_experts, top_k):
            tau = self.temperature if self.temperature is not None else settings.contrastive_temperature
            indices = sample_contrastive_indices(topk_idx, num_experts, "all", None)
            chosen = torch.cat([topk_idx, indices.negative_idx], dim=1)  # (S, N): active, then inactive
            ordered = outputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))  # (S, N, d)
            per_token = contrastive_loss_from_outputs(ordered, indices, tau)
            acc.contrastive_sum += float(per_token) / top_k * outputs.shape[0]
        acc.num_sampled += outputs.shape[0]


# ------------------------------------------------------------------ feeding the model


def _active_adapter(model: torch.nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(
                f"analyze_model measures one adapter at a time; {list(active)} are active. Use set_adapter."
            )
        active = active[0]
    if not isinstance(active, str):
        raise TypeError(
            "analyze_model needs a PeftModel with an active CoMoE adapter (get_peft_model(..., CoMoEConfig))."
        )
    return active


def _comoe_layers(model: torch.nn.Module, adapter: str) -> dict[str, CoMoELayer]:
    layers = {
        _short_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, CoMoELayer) and adapter in module.comoe_A
    }
    if not layers:
        raise ValueError(f"No CoMoE layer holds the adapter {adapter!r}; is this a PeftModel with a CoMoE adapter?")
    return layers


def _short_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def projection_name(module_name: str) -> str:
    """The projection type of a module (`model.layers.3.self_attn.q_proj` -> `q_proj`)."""
    return module_name.rsplit(".", 1)[-1]


def _rows_by_task(dataset: Any, max_examples: int | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by task in order of first appearance; a seeded subset (original order) above the cap."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in dataset:
        by_task.setdefault(row["task"], []).append(row)
    if not by_task:
        raise ValueError("The dataset is empty; pass rows with columns task, prompt, choices and answer.")
    if max_examples is not None:
        for task, rows in by_task.items():
            if len(rows) > max_examples:
                keep = sorted(random.Random(f"{seed}/{task}").sample(range(len(rows)), max_examples))
                by_task[task] = [rows[i] for i in keep]
    return by_task


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text; longer texts keep their last `max_length` tokens (the answer stays)."""
    encoded = tokenizer(list(texts))["input_ids"]
    return [ids[-max_length:] for ids in encoded]


def _right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, S)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, S), 1 = real token
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Skip what the analysis does not need: the KV cache and (where supported) all but one position's logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    kwargs: dict[str, Any] = {}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


# ------------------------------------------------------------------ the entry point


def analyze_model(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    max_examples_per_task: int | None = 64,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    temperature: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure expert specialisation of the active CoMoE adapter of `model`, per task and per adapted module.

    Args:
        model: a `PeftModel` with a CoMoE adapter; the active adapter is analysed. Its training flag is restored.
        tokenizer: the model's tokenizer (its padding side does not matter: padding is done here, on the right).
        dataset: rows with columns task, prompt, choices, answer (a `datasets.Dataset` or a list of dicts).
        max_examples_per_task: rows used per task (a seeded subset above it); None uses all.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (its last ones, so the answer stays).
        seed: seeds the row subset and the tokens sampled for the cosine and the contrastive loss.
        temperature: tau of the contrastive logits; None uses the adapter's `contrastive_temperature`.
        progress: show a progress bar per task.

    Returns:
        A JSON-serialisable dict:

        - `"config"`: adapter, num_experts, top_k, num_negatives (M = N - k), temperature and the arguments.
        - `"per_task"`: {task: {num_examples, num_tokens, routing_entropy, load_cv, mean_pairwise_cosine,
            contrastive_loss, infonce_bound}}, each metric averaged over modules.
        - `"per_module"`: {module: {layer, projection, js_matrix (T x T), tasks: {task: {expert_load,
            mean_router_probs, routing_entropy, load_cv, mean_pairwise_cosine, contrastive_loss, infonce_bound,
            num_tokens, num_sampled_tokens}}}}.
        - `"js_matrix"`: {"tasks": [...], "values": T x T}: the JS divergence of the expert loads, mean over modules.
        - `"js_by_layer"`: {"tasks": [...], "layers": {layer: T x T}}: the same, mean over each layer's modules.
        - `"summary"`: means over tasks and modules of routing_entropy, load_cv, mean_pairwise_cosine,
            contrastive_loss, infonce_bound, and the mean JS over task pairs (None with one task).

        Contrastive values are None when k < 2 or k = N (no positive or no negative exists).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    adapter = _active_adapter(model)
    layers = _comoe_layers(model, adapter)
    settings = next(iter(layers.values())).comoe_settings[adapter]
    by_task = _rows_by_task(dataset, max_examples_per_task, seed)
    recorder = _Recorder(layers, adapter, temperature, seed)
    device = next(model.parameters()).device
    pad_id, forward_kwargs = pad_token_id(tokenizer), _forward_kwargs(model)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder.hooks():
            for task, rows in by_task.items():
                recorder.start_task(task)
                texts = [format_prompt(row) + " " + row["answer"] for row in rows]
                encoded = _encode(tokenizer, texts, max_length)
                starts = range(0, len(encoded), batch_size)
                for start in tqdm(starts, desc=f"analysing {task}", disable=not progress):
                    input_ids, attention_mask = _right_pad(encoded[start : start + batch_size], pad_id)
                    recorder.attention_mask = attention_mask
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **forward_kwargs)
    finally:
        recorder.attention_mask = None
        model.train(was_training)

    tau = temperature if temperature is not None else settings.contrastive_temperature
    config = {
        "adapter": adapter,
        "num_experts": settings.num_experts,
        "top_k": settings.top_k,
        "num_negatives": settings.num_experts - settings.top_k,
        "temperature": tau,
        "max_examples_per_task": max_examples_per_task,
        "max_length": max_length,
        "seed": seed,
        "tokens_per_module_per_batch": TOKENS_PER_MODULE_PER_BATCH,
    }
    return _summarise(recorder.stats, layers, adapter, by_task, config)


# ------------------------------------------------------------------ summaries


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _off_diagonal_mean(matrix: np.ndarray) -> float | None:
    if matrix.shape[0] < 2:
        return None
    upper = np.triu_indices(matrix.shape[0], k=1)
    return float(matrix[upper].mean())


PER_TASK_METRICS = ("routing_entropy", "load_cv", "mean_pairwise_cosine", "contrastive_loss", "infonce_bound")


def _summarise(
    stats: dict[str, dict[str, _ModuleAccumulator]],
    layers: dict[str, CoMoELayer],
    adapter: str,
    by_task: dict[str, list[dict[str, Any]]],
    config: dict[str, Any],
) -> dict[str, Any]:
    tasks = list(by_task)
    top_k = config["top_k"]
    per_module: dict[str, dict[str, Any]] = {}
    js_matrices: dict[str, np.ndarray] = {}
    for name in layers:
        num_experts = layers[name].comoe_settings[adapter].num_experts  # may differ by layer (num_experts_pattern)
        results = {task: stats[task][name].result(num_experts, top_k) for task in tasks if name in stats[task]}
        if len(results) != len(tasks):
            continue  # the module never ran (e.g. a layer the forward pass skips)
        js = pairwise_js_matrix({task: results[task]["expert_load"] for task in tasks})
        js_matrices[name] = js
        per_module[name] = {
            "layer": layer_index(name),
            "projection": projection_name(name),
            "tasks": results,
            "js_matrix": js.tolist(),
        }
    if not per_module:
        raise RuntimeError("No CoMoE layer ran during the forward passes; nothing to analyse.")

    per_task = {}
    for task in tasks:
        entries = [module["tasks"][task] for module in per_module.values()]
        per_task[task] = {
            "num_examples": len(by_task[task]),
            "num_tokens": entries[0]["num_tokens"],
            **{metric: _mean([e[metric] for e in entries]) for metric in PER_TASK_METRICS},
        }

    js_mean = np.mean(list(js_matrices.values()), axis=0)
    by_layer: dict[str, list[np.ndarray]] = defaultdict(list)
    for name, matrix in js_matrices.items():
        index = per_module[name]["layer"]
        by_layer[str(index) if index is not None else name].append(matrix)
    summary = {metric: _mean([per_task[t][metric] for t in tasks]) for metric in PER_TASK_METRICS}
    summary["mean_js_between_tasks"] = _off_diagonal_mean(js_mean)
    summary["num_modules"] = len(per_module)
    summary["num_tasks"] = len(tasks)
    return {
        "config": config,
        "per_task": per_task,
        "per_module": per_module,
        "js_matrix": {"tasks": tasks, "values": js_mean.tolist()},
        "js_by_layer": {
            "tasks": tasks,
            "layers": {layer: np.mean(ms, axis=0).tolist() for layer, ms in _sorted_layers(by_layer)},
        },
        "summary": summary,
    }


def _sorted_layers(by_layer: dict[str, list[np.ndarray]]) -> list[tuple[str, list[np.ndarray]]]:
    """Numbered layers in numeric order, then modules without a layer index by name."""
    return sorted(
        by_layer.items(), key=lambda item: (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0, item[0])
    )


# ------------------------------------------------------------------ files


def _atomic_write(path: Path, write: Any) -> None:
    """Call `write(temporary_path)` on a file beside `path`, then move it into place with `os.replace`.

    The temporary name is unique per process and thread; the file is created by `write`, so it gets the usual
    permissions (the umask), not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(str(temporary))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _atomic_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        _atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


TITLE_WIDTH = 16  # characters per line of a subplot title


def short_task_name(task: str, width: int = TITLE_WIDTH) -> str:
    """A task name for a plot: without its source prefix (`bigbench:`, `synthetic:`), a line break after a `/`
    (task / subtask) when the name is longer than `width`, and longer parts wrapped after `_`
    (`bigbench:multiemo/all_sentence_en` -> `multiemo/` and `all_sentence_en`)."""
    name = task.partition(":")[2] if re.fullmatch(r"[a-z]+:.+", task) else task
    if len(name) <= width:
        return name
    lines: list[str] = []
    for part in re.findall(r"[^/]+/?|/", name):  # task/ and subtask, each keeping its separator
        lines.append("")
        for piece in re.findall(r"[^_]+_?|_", part):
            if lines[-1] and len(lines[-1]) + len(piece) > width:
                lines.append("")
            lines[-1] += piece
    return "\n".join(lines)


def expert_load_figures(result: dict[str, Any]) -> dict[str, Any]:
    """One matplotlib figure per projection type: a subplot per task showing the expert load with layers as rows
    and experts as columns, on one colour scale (0 to the largest load) shared by the figure. Titles are the short
    task names (`short_task_name`); the full names are in the report's tables."""
    plt = _pyplot()
    tasks = result["js_matrix"]["tasks"]
    by_projection: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for name, module in result["per_module"].items():
        by_projection[module["projection"]].append((name, module))
    figures = {}
    for projection, modules in sorted(by_projection.items()):
        modules.sort(key=lambda item: (item[1]["layer"] is None, item[1]["layer"] or 0, item[0]))
        loads = np.array([[m["tasks"][t]["expert_load"] for _, m in modules] for t in tasks])  # (tasks, rows, N)
        rows = [str(m["layer"]) if m["layer"] is not None else name for name, m in modules]
        num_experts = loads.shape[-1]
        panel_width = max(0.4 * num_experts, 1.6)  # wide enough for a TITLE_WIDTH title at fontsize 9
        figure, axes = plt.subplots(
            1, len(tasks), figsize=(1.5 + panel_width * len(tasks), 2.2 + 0.22 * len(rows)),
            squeeze=False, sharey=True, layout="constrained",
        )
        vmax = max(float(loads.max()), 1e-9)
        for axis, task, image in zip(axes[0], tasks, loads):
            shown = axis.imshow(image, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            axis.set_title(short_task_name(task), fontsize=9)
            axis.set_xlabel("expert")
            axis.set_xticks(range(num_experts))
            axis.set_yticks(range(len(rows)))
            axis.set_yticklabels(rows, fontsize=7)
        axes[0][0].set_ylabel("layer")
        figure.colorbar(shown, ax=axes[0].tolist(), label="share of top-k slots")
        figure.suptitle(f"Expert load per task: {projection}")
        figures[projection] = figure
    return figures


def plot_expert_load(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Save `expert_load_figures` as one PNG per projection type (`expert_load_q_proj.png`, ...)."""
    paths = []
    for projection, figure in expert_load_figures(result).items():
        path = Path(out_dir) / f"expert_load_{_safe(projection)}.png"
        _save_figure(figure, path)
        paths.append(path)
    return paths


def js_matrix_figure(result: dict[str, Any]) -> Any:
    """The task x task Jensen-Shannon matrix (mean over modules) as a matplotlib figure, values in the cells.

    The colour scale runs from 0 to the largest value in the matrix (not to the bound log 2, which real runs are
    far below, so a fixed scale would show a uniformly dark map); the colourbar says so.
    """
    plt = _pyplot()
    tasks, values = result["js_matrix"]["tasks"], np.array(result["js_matrix"]["values"])
    names = [short_task_name(t).replace("\n", "") for t in tasks]
    size = 2.5 + 0.9 * len(tasks)
    figure, axis = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    vmax = max(float(values.max()), 1e-9)
    shown = axis.imshow(values, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            colour = "black" if values[i, j] > 0.6 * vmax else "white"
            axis.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color=colour, fontsize=9)
    axis.set_xticks(range(len(tasks)))
    axis.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(tasks)))
    axis.set_yticklabels(names, fontsize=8)
    axis.set_xlabel("task")
    axis.set_ylabel("task")
    axis.set_title("JS divergence of expert load (nats; log 2 = disjoint)", fontsize=10)
    figure.colorbar(shown, ax=axis, label=f"JS (nats), scale 0 to max {vmax:.3g}")
    return figure


def plot_js_matrix(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Save `js_matrix_figure` as `js_matrix.png` in `out_dir`."""
    path = Path(out_dir) / JS_FILE
    _save_figure(js_matrix_figure(result), path)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _markdown(result: dict[str, Any], images: dict[str, Path]) -> str:
    config, summary, tasks = result["config"], result["summary"], result["js_matrix"]["tasks"]
    lines = [
        "# CoMoE expert-specialisation report",
        "",
        (
            f"Adapter `{config['adapter']}`: N = {config['num_experts']} experts, top-k = {config['top_k']}, "
            f"M = {config['num_negatives']} negatives, tau = {config['temperature']}; "
            f"{summary['num_modules']} adapted modules, {summary['num_tasks']} tasks."
        ),
        "",
        "## What the numbers mean",
        "",
        *[f"- **{name}**: {text}" for name, text in METRIC_HELP.items()],
        "",
        "## Summary (means over tasks and modules)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {key} | {_cell(value)} |" for key, value in summary.items()],
        "",
        "## Per task (means over modules)",
        "",
        "| task | examples | tokens | routing entropy | load CV | pairwise cosine | L_con | InfoNCE bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, row in result["per_task"].items():
        cells = [task, row["num_examples"], row["num_tokens"], *(row[m] for m in PER_TASK_METRICS)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        "## Jensen-Shannon divergence between tasks (mean over modules, nats)",
        "",
        "| | " + " | ".join(_cell(t) for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for task, row in zip(tasks, result["js_matrix"]["values"]):
        lines.append(f"| {_cell(task)} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{key}]({path.name})" for key, path in images.items()]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write `analysis.json`, `analysis.md` and the PNG heatmaps into `out_dir`, each file atomically.

    Returns the written paths: `"json"`, `"markdown"`, `"js_matrix"` and `"expert_load_<projection>"`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {f"expert_load_{p.stem[len('expert_load_') :]}": p for p in plot_expert_load(result, out)}
    images["js_matrix"] = plot_js_matrix(result, out)
    paths = {"json": out / JSON_FILE, "markdown": out / MARKDOWN_FILE}
    _atomic_text(paths["json"], json.dumps(result, indent=2) + "\n")
    _atomic_text(paths["markdown"], _markdown(result, images))
    return {**paths, **images}
