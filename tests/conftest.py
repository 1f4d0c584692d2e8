"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

import comoe_peft  # noqa: E402,F401  (registers the COMOE peft type)


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 128):
    """A random Llama: hidden 32, `layers` layers, 4 heads / 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 128):
    """A random GPT-2 (Conv1D projections): hidden 32, 2 layers, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def token_batch(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1, pad_left: int = 3):
    """Random input ids with the first `pad_left` positions of row 0 masked out."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :pad_left] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def batch():
    return token_batch()
