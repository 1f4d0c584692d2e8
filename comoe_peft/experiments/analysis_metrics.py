"""Numbers for the expert-specialisation analysis: entropies, divergences, similarities, load balance.

Pure functions: torch tensors, numpy arrays or nested lists in; Python floats or numpy arrays
out (computed in float64). All logarithms are natural, so entropies and divergences are in nats:
the entropy of a uniform distribution over N experts is ``log N`` and the Jensen-Shannon
divergence lies in ``[0, log 2]``. Entropies and divergences come from scipy
(``scipy.stats.entropy``, ``scipy.spatial.distance.jensenshannon``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences of numbers


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of ``x`` (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _normalise(p: np.ndarray, what: str) -> np.ndarray:
    """Scale the last axis of ``p`` to sum to 1; reject negative entries and all-zero rows."""
    if p.ndim == 0 or p.shape[-1] == 0:
        raise ValueError(f"{what} must have a non-empty last axis (one entry per expert), got shape {p.shape}.")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{what} must be finite and non-negative (probabilities or counts).")
    total = p.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError(f"Every distribution in {what} needs a positive sum; found an all-zero row.")
    return p / total


# routing


def routing_entropy(probs: ArrayLike) -> float:
    """Mean entropy (nats) of the routing distributions in ``probs``, shape ``[..., num_experts]``.

    Each row over the last axis is one token's distribution over experts; rows are normalised
    to sum to 1, so top-k gates or counts work too. Uniform routing over N experts gives
    ``log N``; one-hot routing gives 0.
    """
    p = _normalise(_to_numpy(probs), "probs")
    return float(entropy(p, axis=-1).mean())


def load_coefficient_of_variation(load: ArrayLike) -> float | np.ndarray:
    """Coefficient of variation ``std / mean`` of expert load over the last axis.

    ``load`` holds per-expert token counts or mean routing probabilities, shape ``[num_experts]``
    (a float comes back) or ``[..., num_experts]`` (an array, one value per leading index).
    Uses the population standard deviation (ddof=0): 0 for perfectly balanced load,
    ``sqrt(N - 1)`` when one of N experts takes everything.
    """
    x = _to_numpy(load)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"load needs one entry per expert on its last axis, got shape {x.shape}.")
    mean = x.mean(axis=-1)
    if np.any(mean <= 0):
        raise ValueError("The mean load must be positive; pass per-expert counts or probabilities.")
    cv = x.std(axis=-1) / mean
    return float(cv) if cv.ndim == 0 else cv


# divergence between distributions


def jensen_shannon(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence (natural log) between two distributions over the same experts.

    ``JS(p, q) = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``. Inputs are normalised
    to sum to 1. Symmetric; 0 for equal distributions; ``log 2`` for disjoint supports. Divide by
    ``log 2`` for bits. scipy's ``jensenshannon`` returns the Jensen-Shannon *distance*, the square
    root of this divergence: its square is returned here.
    """
    p_ = _normalise(_to_numpy(p), "p")
    q_ = _normalise(_to_numpy(q), "q")
    if p_.shape != q_.shape or p_.ndim != 1:
        raise ValueError(f"p and q must be 1-D with the same length, got shapes {p_.shape} and {q_.shape}.")
    value = float(jensenshannon(p_, q_)) ** 2  # natural log (scipy's default base)
    return float(min(max(value, 0.0), math.log(2)))  # clip rounding noise


def pairwise_js_matrix(dists: Mapping[str, ArrayLike]) -> np.ndarray:
    """Symmetric matrix of Jensen-Shannon divergences between named distributions.

    ``dists`` maps a name (e.g. a task) to its distribution over experts (e.g. mean routing
    probabilities). Rows and columns follow the order of ``list(dists)``; the diagonal is 0.
    """
    names = list(dists)
    if not names:
        raise ValueError("dists is empty; pass at least one named distribution.")
    matrix = np.zeros((len(names), len(names)))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            matrix[i, j] = matrix[j, i] = jensen_shannon(dists[names[i]], dists[names[j]])
    return matrix


# similarity between experts


def mean_pairwise_cosine(vectors: ArrayLike) -> float:
    """Mean cosine similarity over all pairs ``i < j`` of the rows of ``vectors`` ``[N, D]``.

    Typical input: each expert's flattened LoRA update (or its mean output). 1 when all rows
    point the same way, 0 when they are mutually orthogonal.
    """
    x = _to_numpy(vectors)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"vectors must be [N, D] with N >= 2, got shape {x.shape}.")
    norms = np.linalg.norm(x, axis=1)
    if np.any(norms == 0):
        raise ValueError("Cosine similarity is undefined for a zero vector; drop all-zero rows first.")
    unit = x / norms[:, None]
    sims = unit @ unit.T  # [N, N]
    upper = np.triu_indices(x.shape[0], k=1)
    return float(sims[upper].mean())


# contrastive objective


def infonce_bound(num_negatives: int, contrastive_loss: float) -> float:
    """Lower bound on mutual information implied by an InfoNCE loss: ``log(M) - L`` (nats).

    Follows the CoMoE paper, where ``M`` is the number of negatives in the contrastive
    objective and ``L`` the (mean) InfoNCE loss. A loss of ``log M`` means the bound is 0.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}.")
    loss = float(_to_numpy(contrastive_loss))
    if not math.isfinite(loss):
        raise ValueError(f"contrastive_loss must be finite, got {loss}.")
    return math.log(num_negatives) - loss
