"""The expert-specialisation analysis on tiny random models (nothing is downloaded)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer
from datasets import Dataset
from peft import get_peft_model

import comoe_peft.tuner.model
from comoe_peft import CoMoEConfig
from comoe_peft.experiments.analysis import (
    analyze_model,
    expert_load_figures,
    expert_outputs_cosine,
    js_matrix_figure,
    layer_index,
    plot_expert_load,
    plot_js_matrix,
    projection_name,
    short_task_name,
    write_report,
)
from comoe_peft.experiments.analysis_metrics import mean_pairwise_cosine
from comoe_peft.experiments.data import format_prompt
from comoe_peft.tuner.dora import contrasted_up_projection, expert_scales
from comoe_peft.tuner.losses import CONTRASTIVE_EPS

LOG2 = math.log(2)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def comoe_llama(tokenizer, seed: int = 0):
    model = tiny_llama(seed=seed, vocab=len(tokenizer))
    config = CoMoEConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(model, config)


def letters_dataset(n_per_task: int = 6, seed: int = 0) -> Dataset:
    """Two tasks whose prompts use disjoint letters (their texts share only the "Answer:" scaffolding)."""
    rng = random.Random(seed)
    rows = []
    for task, letters in (("task_a", "xyz"), ("task_b", "qjw")):
        for _ in range(n_per_task):
            words = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 3))) for _ in range(5))
            rows.append({"task": task, "prompt": words, "choices": [], "answer": rng.choice(letters)})
    return Dataset.from_list(rows)


def run(model, tokenizer, dataset, **kwargs):
    kwargs = {"progress": False, "max_length": 48, **kwargs}
    return analyze_model(model, tokenizer, dataset, **kwargs)


def layers(peft_model):
    return peft_model.base_model.model.model.layers


def test_result_structure_and_loads_sum_to_one(tokenizer):
    model = comoe_llama(tokenizer)
    model.train()
    result = run(model, tokenizer, letters_dataset(), batch_size=4)
    json.dumps(result)  # JSON-serialisable as is
    assert model.training  # the training flag is restored
    assert set(result) == {"config", "per_task", "per_module", "js_matrix", "js_by_layer", "summary"}
    assert result["js_matrix"]["tasks"] == ["task_a", "task_b"]
    assert set(result["per_module"]) == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    assert set(result["js_by_layer"]["layers"]) == {"0", "1"}
    for module in result["per_module"].values():
        for stats in module["tasks"].values():
            assert sum(stats["expert_load"]) == pytest.approx(1.0)
            assert sum(stats["mean_router_probs"]) == pytest.approx(1.0)
            assert 0.0 <= stats["routing_entropy"] <= math.log(4) + 1e-6
            assert -1.0 <= stats["mean_pairwise_cosine"] <= 1.0
            assert stats["infonce_bound"] == pytest.approx(math.log(2) - stats["contrastive_loss"])
        js = np.array(module["js_matrix"])
        assert np.allclose(js, js.T) and np.allclose(np.diag(js), 0.0) and (js <= LOG2 + 1e-9).all()
    for stats in result["per_task"].values():
        assert stats["num_examples"] == 6 and stats["num_tokens"] > 0
    summary = result["summary"]
    assert summary["num_modules"] == 4 and summary["num_tasks"] == 2
    assert summary["mean_js_between_tasks"] == pytest.approx(result["js_matrix"]["values"][0][1])
    for key in ("routing_entropy", "load_cv", "mean_pairwise_cosine", "contrastive_loss", "infonce_bound"):
        assert isinstance(summary[key], float)


def test_loads_match_the_layers_own_routing_stats(tokenizer):
    """With one text, the accumulated load equals the layer's own record of that forward."""
    model = comoe_llama(tokenizer)
    dataset = letters_dataset(n_per_task=1)
    result = run(model, tokenizer, dataset.select([0]), batch_size=1)
    ids = tokenizer(format_prompt(dataset[0]) + " " + dataset[0]["answer"], return_tensors="pt")
    with torch.no_grad(), model.base_model.recording():
        model(**ids)
    for name, stats in model.base_model.get_routing_stats().items():
        ours = result["per_module"][name]["tasks"]["task_a"]
        assert ours["expert_load"] == pytest.approx(stats.expert_load.tolist(), abs=1e-6)
        assert ours["routing_entropy"] == pytest.approx(float(stats.routing_entropy), abs=1e-5)
        assert ours["num_tokens"] == int(stats.num_tokens)


def test_forced_router_gives_disjoint_tasks(tokenizer):
    """Task A's tokens go to experts {0, 1}, task B's to {2, 3}: JS = log 2 and near-zero entropy.

    Layer 0 sees each token alone, so the few tokens both tasks share cannot be told apart there. Layer 0 is rigged
    to carry the task into the residual stream: dimension 0 of the embedding is +1 for task-A tokens, -1 for task-B
    tokens, 0 for shared ones; attention copies the (sign-preserving) average of dimension 0 over the prefix into
    dimension 0, scaled up. Layer 1's routers read only dimension 0, so every valid token of layer 1 is routed by
    its task.
    """
    dataset = letters_dataset()
    model = comoe_llama(tokenizer)
    token_sets = {}
    for row in dataset:
        ids = tokenizer(format_prompt(row) + " " + row["answer"])["input_ids"]
        token_sets.setdefault(row["task"], set()).update(ids)
    only_a, only_b = token_sets["task_a"] - token_sets["task_b"], token_sets["task_b"] - token_sets["task_a"]
    assert only_a and only_b and token_sets["task_a"] & token_sets["task_b"]  # some tokens are shared

    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 0] = 0.0
        embedding[list(only_a), 0] = 1.0
        embedding[list(only_b), 0] = -1.0
        block = layers(model)[0]
        block.self_attn.v_proj.base_layer.weight[0].zero_()
        block.self_attn.v_proj.base_layer.weight[0, 0] = 1.0  # value channel 0 = normalised dimension 0
        block.self_attn.v_proj.comoe_B["default"][0].zero_()  # the experts leave value channel 0 alone
        block.self_attn.o_proj.weight[0].zero_()
        block.self_attn.o_proj.weight[0, 0] = 50.0  # head 0, channel 0 -> residual dimension 0, scaled up
        block.mlp.down_proj.weight[0].zero_()
        router_rows = torch.tensor([2.0, 1.0, -1.0, -2.0]) * 10.0
        for projection in ("q_proj", "v_proj"):
            router = getattr(layers(model)[1].self_attn, projection).comoe_router["default"]
            router.zero_()
            router[:, 0] = router_rows  # A (dimension 0 > 0): experts 0, 1; B: experts 3, 2

    result = run(model, tokenizer, dataset, batch_size=4)
    for projection in ("q_proj", "v_proj"):
        module = result["per_module"][f"model.layers.1.self_attn.{projection}"]
        load_a, load_b = module["tasks"]["task_a"]["expert_load"], module["tasks"]["task_b"]["expert_load"]
        assert load_a == pytest.approx([0.5, 0.5, 0.0, 0.0]) and load_b == pytest.approx([0.0, 0.0, 0.5, 0.5])
        assert module["js_matrix"][0][1] == pytest.approx(LOG2, abs=1e-9)
        for task in ("task_a", "task_b"):
            assert module["tasks"][task]["routing_entropy"] < 1e-3
            assert module["tasks"][task]["load_cv"] == pytest.approx(1.0)  # two of four experts share the load
    assert result["js_by_layer"]["layers"]["1"][0][1] == pytest.approx(LOG2, abs=1e-9)
    assert result["js_by_layer"]["layers"]["1"][1][0] == pytest.approx(LOG2, abs=1e-9)
    assert 0.0 < result["js_matrix"]["values"][0][1] <= LOG2


def test_identical_experts_give_cosine_one_and_the_expected_bound(tokenizer):
    model = comoe_llama(tokenizer)
    rank, num_experts, top_k, tau = 4, 4, 2, 0.5
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "comoe_A") and "default" in module.comoe_A:
                down, up = module.comoe_A["default"], module.comoe_B["default"]
                down.copy_(down[:rank].repeat(num_experts, 1))
                up.copy_(up[:, :rank].repeat(1, num_experts))
    result = run(model, tokenizer, letters_dataset(n_per_task=3), batch_size=2, temperature=tau)
    positives, negatives = top_k - 1, num_experts - top_k
    scale = math.exp(1.0 / tau)  # every cosine is 1, so every logit is 1 / tau
    expected_loss = -math.log(positives * scale / ((positives + negatives) * scale + CONTRASTIVE_EPS))
    expected_bound = math.log(negatives) - expected_loss
    assert result["config"]["temperature"] == tau and result["config"]["num_negatives"] == negatives
    for module in result["per_module"].values():
        for stats in module["tasks"].values():
            assert stats["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-5)
            assert stats["contrastive_loss"] == pytest.approx(expected_loss, abs=1e-4)
            assert stats["infonce_bound"] == pytest.approx(expected_bound, abs=1e-4)
    assert result["summary"]["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["summary"]["infonce_bound"] == pytest.approx(expected_bound, abs=1e-4)


def test_padding_does_not_change_the_statistics(tokenizer):
    """One text per batch (no padding) and four per batch (right padding) give the same loads and entropies."""
    model = comoe_llama(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.pad_token_id] = 5.0  # padding counted would show
    dataset = letters_dataset(n_per_task=4)
    lengths = {len(tokenizer(format_prompt(r) + " " + r["answer"])["input_ids"]) for r in dataset}
    assert len(lengths) > 1  # the batches of four are padded
    alone = run(model, tokenizer, dataset, batch_size=1)
    padded = run(model, tokenizer, dataset, batch_size=4)
    for name, module in alone["per_module"].items():
        for task, stats in module["tasks"].items():
            other = padded["per_module"][name]["tasks"][task]
            assert other["num_tokens"] == stats["num_tokens"]
            assert other["expert_load"] == pytest.approx(stats["expert_load"], abs=1e-9)
            assert other["routing_entropy"] == pytest.approx(stats["routing_entropy"], abs=1e-5)
    assert padded["per_task"]["task_a"]["num_tokens"] == alone["per_task"]["task_a"]["num_tokens"]


def test_seed_makes_the_analysis_deterministic(tokenizer):
    model = comoe_llama(tokenizer)
    dataset = letters_dataset(n_per_task=8)
    first = run(model, tokenizer, dataset, batch_size=4, max_examples_per_task=5, seed=3)
    second = run(model, tokenizer, dataset, batch_size=4, max_examples_per_task=5, seed=3)
    assert first == second
    assert first["per_task"]["task_a"]["num_examples"] == 5


def test_cosine_matches_the_metric_helper():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 2, generator=generator)  # (T, N, r)
    up = torch.randn(6, 8, generator=generator)  # (d_out, N*r)
    outputs = torch.einsum("tnr,dnr->tnd", h, up.view(6, 4, 2))
    expected = [mean_pairwise_cosine(o) for o in outputs]
    assert expert_outputs_cosine(h, up).tolist() == pytest.approx(expected, abs=1e-6)
    assert expert_outputs_cosine(h, torch.zeros(6, 8)).tolist() == pytest.approx([0.0] * 3)  # B = 0: no NaN


def test_module_names():
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("transformer.h.0.attn.c_attn") == 0
    assert layer_index("lm_adapter") is None
    assert layer_index("model.layers.1.mlp.experts.0.up_proj") == 1  # the first index (peft's rule), not the last
    assert layer_index is comoe_peft.tuner.model.layer_index  # one helper, also behind contrastive_layers
    assert projection_name("model.layers.12.self_attn.q_proj") == "q_proj"


def test_report_files_and_plots(tokenizer, tmp_path):
    model = comoe_llama(tokenizer)
    result = run(model, tokenizer, letters_dataset(n_per_task=3), batch_size=3)
    paths = write_report(result, tmp_path / "report")
    assert set(paths) == {"json", "markdown", "js_matrix", "expert_load_q_proj", "expert_load_v_proj"}
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(result))
    markdown = paths["markdown"].read_text()
    for task in result["per_task"]:
        assert task in markdown
    assert "InfoNCE" in markdown and "](js_matrix.png)" in markdown and "](expert_load_q_proj.png)" in markdown
    for key in ("js_matrix", "expert_load_q_proj", "expert_load_v_proj"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_gpt2_conv1d_and_three_tasks(tokenizer, tmp_path):
    model = get_peft_model(
        tiny_gpt2(vocab=len(tokenizer)),
        CoMoEConfig(r=2, num_experts=3, top_k=2, target_modules=["c_attn"], init_weights=False),
    )
    rows = list(letters_dataset(n_per_task=2)) + [
        {"task": "task | c", "prompt": "turn left", "choices": ["yes", "no"], "answer": "no"}
    ]
    result = run(model, tokenizer, rows, batch_size=2)
    assert result["js_matrix"]["tasks"] == ["task_a", "task_b", "task | c"]
    assert np.array(result["js_matrix"]["values"]).shape == (3, 3)
    assert {m["projection"] for m in result["per_module"].values()} == {"c_attn"}
    paths = plot_expert_load(result, tmp_path)
    assert [p.name for p in paths] == ["expert_load_c_attn.png"]
    assert plot_js_matrix(result, tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_contrastive_numbers_are_none_without_a_positive(tokenizer):
    model = get_peft_model(
        tiny_llama(vocab=len(tokenizer)),
        CoMoEConfig(
            r=2, num_experts=3, top_k=1, target_modules=["q_proj"], init_weights=False, contrastive_loss_coef=0.0
        ),
    )
    result = run(model, tokenizer, letters_dataset(n_per_task=2), batch_size=2)
    assert result["summary"]["infonce_bound"] is None and result["summary"]["contrastive_loss"] is None
    assert result["summary"]["mean_pairwise_cosine"] is not None
    json.dumps(result)


def test_dora_experts_with_a_different_number_of_experts_per_layer(tokenizer):
    """Each module is measured with its own N (its bound uses log(N - k)); DoRA experts are compared through the
    scaled outputs c_j * B_j h_j that the contrastive loss uses."""
    model = get_peft_model(tiny_llama(vocab=len(tokenizer)), CoMoEConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_weights=False, use_dora=True,
        num_experts_pattern={"v_proj": 6}))
    with torch.no_grad():
        for layer in layers(model):
            magnitude = layer.self_attn.q_proj.comoe_magnitude["default"]
            magnitude.mul_(1 + torch.rand_like(magnitude))  # move the scales c_j away from 1
    result = run(model, tokenizer, letters_dataset(), batch_size=4)
    for name, module in result["per_module"].items():
        negatives = 4 if name.endswith("v_proj") else 2
        for stats in module["tasks"].values():
            assert len(stats["expert_load"]) == negatives + 2
            assert stats["infonce_bound"] == pytest.approx(math.log(negatives) - stats["contrastive_loss"])

    q_proj = layers(model)[0].self_attn.q_proj
    scaled = contrasted_up_projection(q_proj, "default")
    scales = expert_scales(q_proj, "default")  # (N, d_out)
    expected = q_proj.comoe_B["default"] * scales.t().repeat_interleave(4, dim=1)
    torch.testing.assert_close(scaled, expected)
    assert not torch.allclose(scaled, q_proj.comoe_B["default"])


def fake_result(tasks, num_layers=30, num_experts=4, js_scale=0.03):
    """A result dict of the shape `analyze_model` returns, enough for the plots."""
    rng = np.random.default_rng(0)
    per_module = {}
    for layer in range(num_layers):
        loads = {t: (rng.dirichlet(np.ones(num_experts))).tolist() for t in tasks}
        per_module[f"model.layers.{layer}.self_attn.q_proj"] = {
            "layer": layer, "projection": "q_proj", "tasks": {t: {"expert_load": loads[t]} for t in tasks}}
    js = rng.uniform(0, js_scale, (len(tasks), len(tasks)))
    js = np.triu(js, 1) + np.triu(js, 1).T
    return {"js_matrix": {"tasks": list(tasks), "values": js.tolist()}, "per_module": per_module}


DEFAULT_TASK_NAMES = ["bigbench:multiemo/all_sentence_en", "bigbench:epistemic_reasoning",
                      "bigbench:sports_understanding", "bigbench:navigate", "bigbench:arithmetic/3_digit_addition"]


def test_short_task_names_drop_the_source_and_wrap():
    assert short_task_name("bigbench:navigate") == "navigate"
    assert short_task_name("bigbench:multiemo/all_sentence_en") == "multiemo/\nall_sentence_en"
    assert short_task_name("task | c") == "task | c"  # not a source:name string: left alone
    for task in DEFAULT_TASK_NAMES:
        assert all(len(line) <= 16 for line in short_task_name(task).splitlines()), task


def test_expert_load_titles_do_not_overlap():
    import matplotlib.pyplot as plt

    (figure,) = expert_load_figures(fake_result(DEFAULT_TASK_NAMES)).values()
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        panels = [axis for axis in figure.axes if axis.get_title()]
        assert [axis.get_title() for axis in panels] == [short_task_name(t) for t in DEFAULT_TASK_NAMES]
        boxes = [axis.title.get_window_extent(renderer) for axis in panels]
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, "neighbouring titles overlap"
        assert all(box.x0 >= 0 and box.x1 <= figure.bbox.width for box in boxes)
    finally:
        plt.close(figure)


def test_js_colour_scale_is_fitted_to_the_data():
    import matplotlib.pyplot as plt

    result = fake_result(DEFAULT_TASK_NAMES, js_scale=0.04)
    figure = js_matrix_figure(result)
    try:
        image = figure.axes[0].images[0]
        assert image.get_clim() == (0.0, pytest.approx(np.max(result["js_matrix"]["values"])))
        assert image.get_clim()[1] < 0.04 < math.log(2)
        colourbar = figure.axes[1]
        assert "max" in colourbar.get_ylabel() and "nats" in colourbar.get_ylabel()
    finally:
        plt.close(figure)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_block_experts_are_analysed_from_their_explicit_outputs(tokenizer, builder):
    """FFN-block experts (`target_modules=["mlp"]`): one entry per block; identical experts give cosine 1 and the
    loss of all-equal logits; random ones a cosine below 1."""
    from comoe_peft.tuner.block import Block

    rank, num_experts, top_k, tau = 4, 4, 2, 0.5
    config = CoMoEConfig(r=rank, num_experts=num_experts, top_k=top_k, target_modules=["mlp"], init_weights=False)
    model = get_peft_model(builder(vocab=len(tokenizer)), config)
    random_result = run(model, tokenizer, letters_dataset(n_per_task=3), batch_size=2, temperature=tau)
    assert set(random_result["per_module"]) == {name.removeprefix("base_model.model.") for name, module in
                                                model.named_modules() if isinstance(module, Block)}
    assert random_result["summary"]["mean_pairwise_cosine"] < 0.99
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Block):
                for name in ("comoe_A", "comoe_A_out"):
                    down = getattr(module, name)["default"]
                    experts = down.view(-1, num_experts, rank, down.shape[-1])  # (n, N, r, d)
                    experts.copy_(experts[:, :1].expand_as(experts).clone())
                up = module.comoe_B["default"].view(module.comoe_B["default"].shape[0], -1, num_experts, rank)
                up.copy_(up[:, :, :1].expand_as(up).clone())
                up_out = module.comoe_B_out["default"].view(-1, num_experts, rank)
                up_out.copy_(up_out[:, :1].expand_as(up_out).clone())
    result = run(model, tokenizer, letters_dataset(n_per_task=3), batch_size=2, temperature=tau)
    positives, negatives = top_k - 1, num_experts - top_k
    scale = math.exp(1.0 / tau)
    expected_loss = -math.log(positives * scale / ((positives + negatives) * scale + CONTRASTIVE_EPS))
    assert result["summary"]["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-5)
    for module in result["per_module"].values():
        for stats in module["tasks"].values():
            assert stats["contrastive_loss"] == pytest.approx(expected_loss, abs=1e-4)
