"""CoMoE on bitsandbytes-quantized bases (QLoRA): 4-bit nf4 / fp4 with float32 and bf16 compute, and 8-bit.

The tiny Llama is saved once and reloaded with a `BitsAndBytesConfig` on the CPU (bitsandbytes 0.50
runs both there). Its width is 64, not conftest's 32: on CPUs with AVX512-BF16 (which some tests simulate on any
CPU), bitsandbytes repacks 4-bit weights of a plain model at the first inference forward and needs in_features to be
a multiple of its block size (64), see the tests on bitsandbytes on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import bitsandbytes as bnb  # in the `test` extra
from conftest import multitask_rows, tiny_llama, tiny_tokenizer, token_batch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from reference import block_moe_loop, expert_matrices, moe_lora_loop
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from comoe_peft import CoMoEConfig, CoMoELayer
from comoe_peft.tuner import bnb as comoe_bnb

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
QUANT = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
# (d_in, d_out) of the targets in the width-64 Llama (4 heads, 2 KV heads of 16)
FEATURES = {"q_proj": (64, 64), "v_proj": (64, 32), "o_proj": (64, 64), "down_proj": (128, 64)}


def width64_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("width64-llama")
    tokenizer = tiny_tokenizer()
    width64_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(folder, quant: str | None, dtype: torch.dtype = torch.float32, **quant_overrides):
    """The saved model, quantized with QUANT[quant] and `quant_overrides` (None: unquantized) on the CPU."""
    config = None if quant is None else BitsAndBytesConfig(**{**QUANT[quant], **quant_overrides})
    kwargs = {} if config is None else dict(quantization_config=config, device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def comoe_config(**overrides) -> CoMoEConfig:
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=TARGETS, init_weights=False,
                  contrastive_loss_coef=0.1, router_z_loss_coef=1e-3)
    kwargs.update(overrides)
    return CoMoEConfig(**kwargs)


def batch(vocab: int = 128):
    return token_batch(vocab=vocab)


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def train_steps(model, inputs, steps: int = 2, lr: float = 1e-2) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        out = model(**inputs, labels=inputs["input_ids"])
        loss = out.loss + model.base_model.get_aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def quantized_bytes(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.dtype.is_floating_point}


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("quant", QUANT)
def test_quantized_targets_get_comoe_bnb_layers_with_the_real_shapes(model_dir, quant):
    model = get_peft_model(load(model_dir, quant), comoe_config())
    expected_type = comoe_bnb.Linear8bitLt if quant == "int8" else comoe_bnb.Linear4bit
    expected_base = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CoMoELayer)}
    assert len(layers) == 8
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert type(layer) is expected_type and isinstance(base, expected_base), name
        d_in, d_out = FEATURES[name.rsplit(".", 1)[-1]]
        assert (layer.in_features, layer.out_features) == (d_in, d_out), name
        assert layer.comoe_A["default"].shape == (4 * 4, d_in) and layer.comoe_B["default"].shape == (d_out, 16)
        assert layer.comoe_router["default"].dtype == torch.float32 and layer.comoe_A["default"].dtype == torch.float32
        assert layer.fan_in_fan_out is False
        if quant != "int8":
            assert tuple(base.weight.shape) != (d_out, d_in)  # packed: the shape says nothing about the layer
    assert comoe_bnb.quantized_in_out_features(layers[next(iter(layers))].get_base_layer()) == (64, 64)
    assert repr(next(iter(layers.values()))).startswith("comoe.")


@pytest.mark.parametrize("quant, dtype", [("nf4-fp32", torch.float32), ("nf4-bf16", torch.float32),
                                          ("nf4-bf16", torch.bfloat16), ("fp4-bf16", torch.bfloat16),
                                          ("int8", torch.float32), ("int8", torch.bfloat16)])
def test_layer_output_is_the_base_output_plus_the_experts_in_the_base_dtype(model_dir, quant, dtype):
    model = get_peft_model(load(model_dir, quant, dtype), comoe_config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.comoe_router["default"].dtype == torch.float32  # router fp32 even on a bf16 model
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        base_out = layer.base_layer(x)  # (2, 5, 64)
        out = layer(x)
    assert out.dtype == base_out.dtype == dtype and out.shape == base_out.shape
    pairs, router = expert_matrices(layer)
    expected = moe_lora_loop(x.float(), base_out.float(), pairs, router, 2, layer.scaling["default"])
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the sum is rounded to bf16 once
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(layer(x), base_out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("quant", QUANT)
def test_kbit_preparation_with_non_reentrant_checkpointing_trains_only_the_adapter(model_dir, quant):
    base = prepare_model_for_kbit_training(load(model_dir, quant), use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
    assert base.is_gradient_checkpointing
    model = get_peft_model(base, comoe_config())
    frozen = quantized_bytes(model)
    assert frozen  # the uint8 / int8 weights
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".comoe_" in n for n in trainable)

    model.train()
    inputs = batch(vocab=320)
    out = model(**inputs, labels=inputs["input_ids"])
    aux = model.base_model.get_aux_losses()
    assert set(aux) == {"contrastive", "balance", "z"}
    (out.loss + model.base_model.get_aux_loss()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    losses = train_steps(model, inputs, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(trainable[n], p) for n, p in model.named_parameters() if p.requires_grad)
    for name, value in quantized_bytes(model).items():
        assert torch.equal(value, frozen[name]), name


@pytest.mark.slow
def test_comoe_sft_trainer_takes_steps_on_a_4bit_base_and_keeps_the_router_fp32(model_dir, tmp_path):
    from datasets import Dataset

    from comoe_peft.training.trainer import CoMoESFTConfig, CoMoESFTTrainer

    tokenizer = tiny_tokenizer()
    args = CoMoESFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                          save_strategy="no", report_to="none", bf16=False, use_cpu=True, max_length=48,
                          gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                          seed=0, disable_tqdm=True)
    trainer = CoMoESFTTrainer(model=load(model_dir, "nf4-bf16"), args=args,
                              train_dataset=Dataset.from_list(multitask_rows(4)), processing_class=tokenizer,
                              peft_config=comoe_config(target_modules=["q_proj", "v_proj"]))
    params = dict(trainer.model.named_parameters())
    routers = {n: p for n, p in params.items() if "comoe_router" in n}
    experts = {n: p for n, p in params.items() if "comoe_A" in n}
    assert routers and all(p.dtype == torch.float32 for p in routers.values())  # TRL cast it to bf16; undone
    assert all(p.dtype == torch.bfloat16 for p in experts.values())  # TRL's QLoRA choice for the experts, kept
    before = {n: p.detach().clone() for n, p in routers.items()}
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 2 and all(e["loss"] == e["loss"] for e in steps) and "comoe/contrastive" in steps[0]
    assert any(not torch.equal(before[n], p) for n, p in routers.items())


# ---------------------------------------------------------------------------------------------- peft contract


@pytest.mark.parametrize("quant", ["nf4-fp32", "fp4-bf16", "int8"])
def test_save_load_disable_and_unload_on_a_quantized_base(model_dir, tmp_path, quant):
    inputs = batch(vocab=320)
    model = get_peft_model(load(model_dir, quant), comoe_config())
    train_steps(model, inputs, steps=2)
    expected = logits(model, inputs)
    # the base as a CoMoE model computes it (4-bit weights never repacked) and as bitsandbytes alone does (on a CPU
    # with AVX512-BF16 it repacks them at the first eval forward: other kernels, other roundings; elsewhere equal)
    as_loaded = load(model_dir, quant)
    comoe_bnb.disable_cpu_inference_repacking(as_loaded)
    reference_base, plain_base = logits(as_loaded, inputs), logits(load(model_dir, quant), inputs)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), reference_base, rtol=0, atol=0)
    assert not torch.allclose(expected, reference_base)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(load(model_dir, quant), tmp_path)
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj, CoMoELayer)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    unloaded = loaded.unload()
    assert not any(isinstance(m, CoMoELayer) for m in unloaded.modules())
    kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, kind)
    torch.testing.assert_close(logits(unloaded, inputs), plain_base, rtol=0, atol=0)  # bitsandbytes' own again


def test_two_adapters_on_a_4bit_base(model_dir):
    inputs = batch(vocab=320)
    model = get_peft_model(load(model_dir, "nf4-fp32"), comoe_config())
    first = logits(model, inputs)
    model.add_adapter("other", comoe_config(r=2, num_experts=3, target_modules=["q_proj"]))
    model.set_adapter("other")
    second = logits(model, inputs)
    assert not torch.allclose(first, second)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, comoe_bnb.Linear4bit)
    model.delete_adapter("other")
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), first)


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
def test_mixed_adapter_batch_on_a_quantized_base_equals_each_adapter_alone(model_dir, quant):
    inputs = {k: v.repeat(2, 1)[:3] for k, v in batch(vocab=320).items()}  # 3 rows
    model = get_peft_model(load(model_dir, quant), comoe_config())
    model.add_adapter("other", comoe_config(r=2, num_experts=3, target_modules=["q_proj"]))
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = model.eval()(**inputs, adapter_names=names).logits
    for row, name in enumerate(names):
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, one)
        else:
            model.set_adapter(name)
            alone = logits(model, one)
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-4, atol=1e-4)
    model.set_adapter("default")


# How close the adapter on the float32 original must stay to the adapter on its 4-bit base. The bases themselves
# differ by the quantization error; a token whose top-k flips between the two bases moves by a whole expert, so the
# bounds are on means, plus a loose bound on the maximum. Measured on this model after 10 steps (nf4 / fp4, float32
# and bf16 compute): mean |base_f - base_q| 0.013-0.016, mean |adapted_f - adapted_q| 0.005-0.010, mean
# |contribution_f - contribution_q| 0.013-0.017 for contributions of mean size 0.16-0.17; max |adapted_f -
# adapted_q| 0.04-0.26 for logits of about 1. A lost or garbled adapter misses every bound by an order of magnitude.
MEAN_GAP_OVER_BASE_GAP = 2.0  # mean |adapted_f - adapted_q| <= 2 x mean |base_f - base_q|
CONTRIBUTION_RTOL = 0.2  # mean |contribution_f - contribution_q| <= 0.2 x mean |contribution_q|
MAX_GAP = 0.5  # max |adapted_f - adapted_q|


@pytest.mark.parametrize("quant", ["nf4-fp32", "fp4-bf16"])
def test_adapter_trained_on_4bit_loads_on_the_float32_base(model_dir, tmp_path, quant):
    inputs = batch(vocab=320)
    base = prepare_model_for_kbit_training(load(model_dir, quant),
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
    quantized = get_peft_model(base, comoe_config(init_weights=True))
    train_steps(quantized, inputs, steps=10)
    adapted_q = logits(quantized, inputs)
    with quantized.disable_adapter():
        base_q = logits(quantized, inputs)
    quantized.save_pretrained(tmp_path)

    full = PeftModel.from_pretrained(load(model_dir, None), tmp_path)
    assert type(full.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # comoe.Linear
    adapted_f = logits(full, inputs)
    with full.disable_adapter():
        base_f = logits(full, inputs)
    contribution_q, contribution_f = adapted_q - base_q, adapted_f - base_f
    assert contribution_q.abs().mean() > 0.05  # the adapter matters ...
    assert (adapted_f - adapted_q).abs().mean() <= MEAN_GAP_OVER_BASE_GAP * (base_f - base_q).abs().mean()
    assert (contribution_f - contribution_q).abs().mean() <= CONTRIBUTION_RTOL * contribution_q.abs().mean()
    assert (adapted_f - adapted_q).abs().max() < MAX_GAP  # ... and carries over
    trained = {k: v for k, v in quantized.state_dict().items() if ".comoe_" in k}
    reloaded = {k: v for k, v in full.state_dict().items() if ".comoe_" in k}
    assert trained.keys() == reloaded.keys() and all(torch.equal(trained[k], reloaded[k]) for k in trained)


# ---------------------------------------------------------------------------------------------- bitsandbytes on CPU


@pytest.fixture
def avx512_bf16(monkeypatch):
    """4-bit layers built while this fixture is active act as on a CPU with AVX512-BF16, on any CPU.

    `Linear4bit.__init__` sets `support_avx512bf16_for_cpu` from `has_avx512bf16()`; with it, the layer's first
    eval forward without gradients repacks its weight for the AVX512-BF16 kernel (where the CPU lacks it, the
    repacked layer computes with bitsandbytes' generic kernel instead, whose numbers nobody should use).
    """
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def four_bit_state(layer) -> dict:
    """A 4-bit layer's weight bytes and quantization state: scales, nested scales, offset, code, shape, dtypes."""
    state = layer.weight.quant_state
    return {"weight": layer.weight.data.clone(), "repacked": getattr(state, "packing_format_for_cpu", False),
            **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.as_dict().items()}}


def assert_identical(actual: dict, expected: dict, where: str) -> None:
    """Same keys, and every tensor equal in dtype, shape and every element."""
    assert actual.keys() == expected.keys(), where
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), f"{where}: {key}"
        else:
            assert actual[key] == value, f"{where}: {key}"


@pytest.mark.parametrize("double_quant", [False, True], ids=["single_quant", "double_quant"])
def test_4bit_weights_stay_exactly_as_loaded_through_eval_and_train_cycles(model_dir, avx512_bf16, double_quant):
    """bitsandbytes' CPU inference repacking is not exactly reversible (with double quantisation off, the default,
    its inverse even put the scales on the wrong blocks), so a CoMoE model never lets it happen: weights, their
    state-dict entries and eval outputs stay exactly as loaded however often evaluation and training alternate."""
    base = load(model_dir, "nf4-fp32", bnb_4bit_use_double_quant=double_quant)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and all(m.support_avx512bf16_for_cpu for m in layers)  # the simulation took
    assert all(m.weight.quant_state.nested == double_quant for m in layers)
    loaded = [four_bit_state(m) for m in layers]
    loaded_entries = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    model = get_peft_model(base, comoe_config())
    inputs = batch(vocab=320)
    first = logits(model, inputs)
    for cycle in range(3):
        torch.testing.assert_close(logits(model, inputs), first, rtol=0, atol=0)  # eval, no grad: would repack
        for layer, entries in zip(layers, loaded_entries):
            assert_identical(layer.state_dict(), entries, f"state dict, cycle {cycle}")
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()  # no step: the eval outputs must not move
        for layer, state in zip(layers, loaded):
            assert_identical(four_bit_state(layer), state, f"cycle {cycle}")
    torch.testing.assert_close(logits(model, inputs), first, rtol=0, atol=0)
    model.unload()
    assert all(m.support_avx512bf16_for_cpu for m in layers)  # bitsandbytes' choice given back with the model


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-bf16", "int8"])
def test_dora_experts_on_a_quantized_base_start_as_it_and_train(model_dir, quant):
    """DoRA experts read the dequantized weights: every scale starts at exactly 1 (also where the magnitudes were
    set in a 4-bit layer's bf16 compute dtype and peft cast them to float32 since), so the model starts as the
    quantized base, and it trains (an 8-bit layer keeps its row scales through the dequantizations)."""
    from comoe_peft.tuner.dora import expert_scales

    model = get_peft_model(load(model_dir, quant), comoe_config(init_weights=True, use_dora=True))
    inputs = batch(vocab=320)
    scales = [expert_scales(m, "default") for m in model.modules() if isinstance(m, comoe_bnb._QuantizedLinear)]
    assert len(scales) == 2 * len(TARGETS)
    for scale in scales:
        assert torch.equal(scale, torch.ones_like(scale))
    with model.disable_adapter():
        expected = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert all(torch.isfinite(torch.tensor(train_steps(model, inputs))))
    assert torch.isfinite(logits(model, inputs)).all()


def test_dora_magnitudes_are_read_from_a_repacked_base_once_it_is_unpacked(model_dir, avx512_bf16):
    """A base that bitsandbytes repacked (evaluated before the adapter was added) is converted back before the
    layers are built: DoRA magnitudes read the weights (dequantized), so every scale starts at exactly 1."""
    from comoe_peft.tuner.block_dora import block_scales
    from comoe_peft.tuner.dora import expert_scales

    base = load(model_dir, "nf4-fp32")
    logits(base, batch(vocab=320))  # eval mode: bitsandbytes repacks
    assert all(m.weight.quant_state.packing_format_for_cpu for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    config = CoMoEConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "mlp"], use_dora=True)
    with pytest.warns(UserWarning, match="already repacked"):
        model = get_peft_model(base, config)
    layer = model.base_model.model.model.layers[0]
    scales = [expert_scales(layer.self_attn.q_proj, "default"), *vars(block_scales(layer.mlp, "default")).values()]
    for scale in scales:
        assert torch.equal(scale, torch.ones_like(scale))


@pytest.mark.parametrize("double_quant", [False, True], ids=["single_quant", "double_quant"])
def test_a_base_repacked_before_the_adapter_is_added_is_unpacked_with_a_warning(model_dir, avx512_bf16,
                                                                                 double_quant):
    """Evaluating the plain 4-bit model first lets bitsandbytes repack it; adding the adapter converts it back,
    exact but for the bf16 rounding the repacking gave the scales, and with them in the right blocks."""
    base = load(model_dir, "nf4-fp32", bnb_4bit_use_double_quant=double_quant)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    loaded = [four_bit_state(m) for m in layers]
    inputs = batch(vocab=320)
    with torch.no_grad():
        expected = base.train()(**inputs).logits  # training mode: never repacked
    logits(base, inputs)  # eval mode: bitsandbytes repacks
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    with pytest.warns(UserWarning, match="already repacked"):
        model = get_peft_model(base, comoe_config(init_weights=True))
    for layer, state in zip(layers, loaded):
        now = four_bit_state(layer)
        assert torch.equal(now["weight"], state["weight"]) and not now["repacked"]
        if not double_quant:  # the scales in their blocks, rounded to bf16
            assert torch.equal(now["absmax"], state["absmax"].to(torch.bfloat16).float())
    with model.disable_adapter():
        # 1e-3 from the bf16 scales; bitsandbytes' inverse alone, scales in the wrong blocks, moved them by 0.027
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=5e-3)



def test_bitsandbytes_cpu_inference_repacking_is_recorded(tmp_path):
    """What bitsandbytes 0.50.2 does on CPUs with AVX512-BF16, recorded so that docs/qlora.md stays true.

    At the first forward in eval mode without gradients, a 4-bit layer repacks its weight for a faster CPU kernel
    (with bf16 scales). That refuses a layer whose in_features is not a multiple of the block size (64), and reading
    the state dict (e.g. `save_pretrained`) unpacks the weight with a lossy inverse, so later eval outputs move.
    Without AVX512-BF16 neither happens. Training forwards never repack.
    """
    repacks = bool(bnb.functional.has_avx512bf16())
    tiny_llama().save_pretrained(tmp_path)  # width 32: not a multiple of 64
    model = load(tmp_path, "nf4-fp32").requires_grad_(False)
    inputs = batch()
    if repacks:
        with pytest.raises(RuntimeError, match="is invalid for input of size"), torch.no_grad():
            model(**inputs)
    else:
        logits(model, inputs)
    model.train()
    with torch.no_grad():
        model(**inputs)  # training mode: the unpacked kernel, any width


def test_training_after_an_eval_forward_still_reaches_every_expert(model_dir, avx512_bf16):
    """bitsandbytes repacks 4-bit weights for CPU inference (AVX512-BF16) for a kernel that has no backward; a
    CoMoE model keeps every 4-bit layer from repacking, so no expert loses its gradient after an evaluation."""
    model = get_peft_model(load(model_dir, "nf4-fp32"), comoe_config(init_weights=True))
    inputs = batch(vocab=320)
    logits(model, inputs)  # eval, no grad: where bitsandbytes would repack
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "comoe_B" in n}
    assert len(grads) == 2 * len(TARGETS)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                              if g is None or g.abs().sum() == 0]
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7, "adapted and not adapted 4-bit layers"
    # the untargeted k, gate and up projections pass gradients to the layers below again too
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)


def test_state_dict_read_moves_repacked_eval_outputs_only_with_avx512_bf16(model_dir):
    repacks = bool(bnb.functional.has_avx512bf16())
    model = load(model_dir, "nf4-fp32").requires_grad_(False)
    inputs = batch(vocab=320)
    first = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs), first, rtol=0, atol=0)
    model.state_dict()
    moved = (logits(model, inputs) - first).abs().max().item()
    assert (moved > 1e-4) == repacks, moved
    fresh = load(model_dir, "nf4-fp32").requires_grad_(False)
    torch.testing.assert_close(logits(fresh, inputs), first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- CUDA


def test_bitsandbytes_8bit_optimizer_steps_a_cpu_adapter(model_dir):
    model = get_peft_model(load(model_dir, "nf4-fp32"), comoe_config())
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-2)  # TRL's optim="paged_adamw_8bit"
    inputs = batch(vocab=320)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() and not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", QUANT)
def test_cuda_quantized_base_trains_and_round_trips(model_dir, tmp_path, quant):
    config = BitsAndBytesConfig(**QUANT[quant])
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cuda:0")
    base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, comoe_config())
    inputs = {k: v.cuda() for k, v in batch(vocab=320).items()}
    losses = train_steps(model, inputs, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    reload_base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=copy.deepcopy(config),
                                                       device_map="cuda:0")
    loaded = PeftModel.from_pretrained(reload_base, tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-bf16", "int8"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_block_experts_on_a_quantized_mlp_equal_the_loop_and_train(model_dir, quant, use_dora):
    """Block experts (`target_modules=["mlp"]`) on 4-bit and 8-bit projections: the adapter starts as the
    quantized model, the block equals the loop reference with the same quantized projections (DoRA experts: with
    their weights formed from the dequantized ones), and a training step gives every adapter parameter a finite
    gradient."""
    from comoe_peft.tuner.block import Block
    from comoe_peft.tuner.block_dora import block_scales

    base = load(model_dir, quant)
    batch = token_batch(vocab=base.config.vocab_size)
    with torch.no_grad():
        expected = base(**batch).logits
    config = CoMoEConfig(target_modules=["mlp"], r=4, num_experts=4, top_k=2, use_dora=use_dora)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():  # the gated mix of k equal activations: the quantized block up to rounding
        torch.testing.assert_close(model(**batch).logits, expected, atol=2e-2, rtol=2e-2)
    block = model.base_model.model.model.layers[0].mlp
    assert isinstance(block, Block) and isinstance(block.get_base_layer().down_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    with torch.no_grad():
        if use_dora:  # the norms of the dequantized weights: every scale exactly 1 at initialisation
            scales = block_scales(block, "default")
            assert torch.equal(scales.inputs, torch.ones_like(scales.inputs))
            assert torch.equal(scales.output, torch.ones_like(scales.output))
            for magnitude in (block.comoe_magnitude["default"], block.comoe_magnitude_out["default"]):
                magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))
        for up in (block.comoe_B["default"], block.comoe_B_out["default"]):
            up.normal_(std=0.1)
        x = torch.randn(2, 5, block.in_features)
        # one frozen down-projection on the gated mix against k of them: equal up to the compute dtype's rounding
        # (bf16), and to LLM.int8()'s rounding of its input rows (it quantizes activations too)
        tolerance = {"nf4-fp32": 1e-4, "nf4-bf16": 2e-3, "int8": 1e-2}[quant]
        torch.testing.assert_close(block(x), block_moe_loop(block, x, 2), atol=tolerance, rtol=tolerance)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    (out.loss + model.base_model.get_aux_loss()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("comoe_magnitude_out" in n for n in grads) == use_dora
