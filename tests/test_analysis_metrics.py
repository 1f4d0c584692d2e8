"""Analysis metrics on hand-computable inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comoe_peft.experiments.analysis_metrics import (
    infonce_bound,
    jensen_shannon,
    load_coefficient_of_variation,
    mean_pairwise_cosine,
    pairwise_js_matrix,
    routing_entropy,
)


def test_routing_entropy_uniform_is_log_n_and_one_hot_is_zero():
    assert routing_entropy(torch.full((3, 5, 4), 0.25)) == pytest.approx(math.log(4))
    assert routing_entropy(np.eye(4)) == pytest.approx(0.0)


def test_routing_entropy_is_the_mean_over_tokens():
    probs = [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]  # log 2 and 0
    assert routing_entropy(probs) == pytest.approx(math.log(2) / 2)
    assert routing_entropy([[2.0, 2.0]]) == pytest.approx(math.log(2))  # counts are normalised


def test_routing_entropy_rejects_negative_probabilities():
    with pytest.raises(ValueError, match="non-negative"):
        routing_entropy([[1.5, -0.5]])


def test_jensen_shannon_identical_disjoint_and_symmetric():
    p, q = [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(math.log(2))
    assert jensen_shannon(p, q) == pytest.approx(jensen_shannon(q, p))
    assert 0 < jensen_shannon(p, q) < math.log(2)


def test_jensen_shannon_hand_computed():
    # p = [1, 0], q = [0.5, 0.5]: m = [0.75, 0.25]
    kl_pm = math.log(1 / 0.75)
    kl_qm = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert jensen_shannon(torch.tensor([1.0, 0.0]), [0.5, 0.5]) == pytest.approx((kl_pm + kl_qm) / 2)


def test_jensen_shannon_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        jensen_shannon([0.5, 0.5], [1 / 3, 1 / 3, 1 / 3])


def test_pairwise_js_matrix_is_symmetric_in_dict_order():
    dists = {"a": [1, 0], "b": [0, 1], "c": [1, 0]}
    matrix = pairwise_js_matrix(dists)
    expected = math.log(2) * np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(matrix, expected, atol=1e-12)


def test_mean_pairwise_cosine():
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)
    assert mean_pairwise_cosine([[1, 1], [2, 2], [3, 3]]) == pytest.approx(1.0)
    # pairs: (a, b) = 1, (a, c) = 0, (b, c) = 0
    assert mean_pairwise_cosine([[1, 0], [5, 0], [0, 2]]) == pytest.approx(1 / 3)
    assert mean_pairwise_cosine([[1, 0], [-1, 0]]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_cosine([[1, 0]])


def test_load_coefficient_of_variation():
    assert load_coefficient_of_variation([5, 5, 5, 5]) == pytest.approx(0.0)
    assert load_coefficient_of_variation([4, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert load_coefficient_of_variation([1, 3]) == pytest.approx(0.5)  # std 1, mean 2
    per_layer = load_coefficient_of_variation(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    np.testing.assert_allclose(per_layer, [0.5, 0.0])
    with pytest.raises(ValueError, match="positive"):
        load_coefficient_of_variation([0, 0])


def test_infonce_bound():
    assert infonce_bound(8, 0.0) == pytest.approx(math.log(8))
    assert infonce_bound(8, math.log(8)) == pytest.approx(0.0)
    assert infonce_bound(4, torch.tensor(0.5)) == pytest.approx(math.log(4) - 0.5)
    with pytest.raises(ValueError, match="num_negatives"):
        infonce_bound(0, 1.0)


def test_jensen_shannon_is_the_divergence_not_scipys_distance():
    from scipy.spatial.distance import jensenshannon

    p, q = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    by_hand = sum(0.5 * a * math.log(a / c) + 0.5 * b * math.log(b / c) for a, b, c in zip(p, q, m))
    assert jensen_shannon(p, q) == pytest.approx(by_hand)
    assert jensen_shannon(p, q) == pytest.approx(jensenshannon(p, q) ** 2)
    assert jensen_shannon(p, q) != pytest.approx(jensenshannon(p, q))
