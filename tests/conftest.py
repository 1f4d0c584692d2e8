"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

import comoe_peft  # noqa: F401  (registers the COMOE peft type)


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


TOKENIZER_CORPUS = [
    "review: a wonderful film, full of life. sentiment: positive",
    "review: dull and far too long. sentiment: negative",
    "question: what is 12 plus 7? answer: 19",
    "question: what is 30 minus 4? answer: 26",
    "premise: the cat sleeps. hypothesis: an animal rests. label: entailment",
    "premise: it rains. hypothesis: the sky is clear. label: contradiction",
    "turn left, take 3 steps, turn around. do you return to the start? answer: no",
]


def tiny_tokenizer(corpus=None, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS if corpus is None else corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def shut_down_process_group() -> None:
    """End a multi-process test script: free what holds the process group (call after the script's `main` has
    returned, so its trainer or FSDP model is gone) while every rank is still in it, wait for all ranks, then
    destroy the group. Destroying the group first and freeing those objects at exit hung one gloo rank now and
    then (and, before that, aborted one)."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def multitask_rows(n_per_task: int = 16, seed: int = 0):
    """A small prompt-completion dataset mixing four task families."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_task):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"prompt": f"question: what is {a} plus {b}? answer:", "completion": f" {a + b}"})
        good = rng.random() < 0.5
        text = "a wonderful film, full of life" if good else "dull and far too long"
        rows.append({"prompt": f"review: {text}. sentiment:", "completion": " positive" if good else " negative"})
        same = rng.random() < 0.5
        hyp = "an animal rests" if same else "the sky is clear"
        rows.append({"prompt": f"premise: the cat sleeps. hypothesis: {hyp}. label:",
                     "completion": " entailment" if same else " contradiction"})
        steps = rng.randint(1, 9)
        rows.append({"prompt": f"turn left, take {steps} steps, turn around. do you return to the start? answer:",
                     "completion": " no"})
    return rows


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved to a folder, for CLI runs."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    """A JSONL file of 48 rows in two tasks (one multiple choice, one generation), for CLI runs."""
    path = tmp_path_factory.mktemp("data") / "examples.jsonl"
    rows = []
    for i in range(24):
        rows.append({"task": "sentiment", "prompt": f"review {i}: a wonderful film", "choices": ["positive", "negative"],
                     "answer": "positive" if i % 3 else "negative"})
        rows.append({"task": "arithmetic", "prompt": f"what is {i} plus 1?", "choices": [], "answer": str(i + 1)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
