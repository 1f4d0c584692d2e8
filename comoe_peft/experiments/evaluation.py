"""Evaluate a causal LM on task examples: multiple choice by log-likelihood, generation by exact match.

Rows follow the project's example schema (see `comoe_peft.experiments.data`):

```text
{"task": str, "prompt": str, "choices": list[str], "answer": str}
```

`choices` is empty for generation tasks. The text the model sees is `prompt_fn(row)`
(normally `comoe_peft.experiments.data.format_prompt`); it is a parameter so this module does not
depend on how prompts are formatted.

Multiple choice: each choice is scored by the summed log-probability of the continuation
`" " + choice` after the prompt; the highest-scoring choice is the prediction. Padding is
done by hand (right padding for scoring, left padding for generation), so the tokenizer's
`padding_side` does not matter.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import pad_token_id

PromptFn = Callable[[Mapping[str, Any]], str]
Results = dict[str, dict[str, Any]]

OVERALL = "overall"


# small helpers


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode under `torch.no_grad` and restore its training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the (base) model's forward takes `argument` (a peft wrapper passes its keyword arguments on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _pad(seqs: Sequence[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one length; return `input_ids` and `attention_mask`, both [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


# multiple choice: tokenising prompt + continuation


def split_context_continuation(prompt: str, choice: str) -> tuple[str, str]:
    """Return the (context, continuation) strings whose log-likelihood scores `choice`.

    The continuation is `" " + choice`. Trailing spaces of the prompt are dropped so the
    separator is the single space that starts the continuation (BPE tokenisers attach a
    leading space to the next word). After a prompt ending in a newline the choice follows
    directly, without a space.
    """
    if prompt.endswith("\n"):
        return prompt, choice
    return prompt.rstrip(" "), " " + choice


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation such that their concatenation is the whole text.

    The whole text is encoded once and split after the context's tokens, which keeps the
    tokenisation the model would see. If the tokeniser merges across the boundary (the
    context's tokens are not a prefix of the whole), the two parts are encoded separately.
    The context keeps the tokeniser's special tokens (e.g. BOS); it is never empty.
    """
    context_ids = tokenizer(context).input_ids
    whole_ids = tokenizer(context + continuation).input_ids
    n = len(context_ids)
    if whole_ids[:n] == context_ids and len(whole_ids) > n:
        continuation_ids = whole_ids[n:]
    else:
        continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    if not continuation_ids:
        raise ValueError(f"The continuation {continuation!r} encodes to no tokens; choices must be non-empty.")
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("Empty prompt and the tokenizer has no BOS/EOS token to condition on.")
        context_ids = [start]
    return context_ids, continuation_ids


def _truncate_left(context_ids: list[int], continuation_ids: list[int], limit: int | None) -> list[int]:
    """Drop the oldest context tokens so context + continuation fits in `limit` positions."""
    if limit is None or len(context_ids) + len(continuation_ids) <= limit:
        return context_ids
    keep = limit - len(continuation_ids)
    if keep < 1:
        raise ValueError(f"A choice of {len(continuation_ids)} tokens does not fit the model's {limit} positions.")
    return context_ids[-keep:]


def _continuation_logprobs(
    model: torch.nn.Module, pad_id: int, requests: Sequence[tuple[list[int], list[int]]]
) -> list[float]:
    """Summed log p(continuation | context) for each (context_ids, continuation_ids), each pair one right-padded
    sequence of one forward. The fallback for models that return no key-value cache."""
    seqs = [ctx + cont for ctx, cont in requests]
    ids, mask = _pad(seqs, pad_id, side="right")
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
    scores = []
    for i, (ctx, cont) in enumerate(requests):
        start, end = len(ctx), len(ctx) + len(cont)
        # logits at position t predict token t + 1
        step_logits = logits[i, start - 1 : end - 1].float()  # [len(cont), V]
        logp = torch.log_softmax(step_logits, dim=-1)
        target = ids[i, start:end].to(device).unsqueeze(-1)  # [len(cont), 1]
        scores.append(logp.gather(-1, target).sum().item())
    return scores


def _shared_context_logprobs(
    model: torch.nn.Module, pad_id: int, groups: Sequence[tuple[list[int], list[list[int]]]]
) -> list[list[float]] | None:
    """Summed log p(continuation | context) for every continuation of every (context, continuations) group.

    Each context is run once (left-padded, with explicit position ids); its last logits score every continuation's
    first token. Continuations longer than one token then run, all at once, on the contexts' key-value cache
    (selected per continuation), right-padded after the context. Returns None when the model gives no cache.
    """
    device = _device(model)
    ids, mask = _pad([ctx for ctx, _ in groups], pad_id, side="left")  # [B, Lc]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, Lc]: left padding does not shift positions
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}  # skip the LM head elsewhere
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **last_only,
    )
    cache = out.get("cache") if hasattr(out, "get") else None  # transformers' model outputs name it `cache`
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: predicts each continuation's 1st token
    scores = [[first[b, cont[0]].item() for cont in conts] for b, (_, conts) in enumerate(groups)]
    longer = [(b, c) for b, (_, conts) in enumerate(groups) for c, cont in enumerate(conts) if len(cont) > 1]
    if not longer:
        return scores
    owner = torch.tensor([b for b, _ in longer])  # [P]: the group of each long continuation
    tails = [groups[b][1][c] for b, c in longer]
    tail_ids, tail_mask = _pad([t[:-1] for t in tails], pad_id, side="right")  # [P, W]: inputs predict tokens 1..
    tail_positions = mask[owner].sum(-1, keepdim=True) + torch.arange(tail_ids.shape[1])  # [P, W]
    cache.batch_select_indices(owner.to(device))
    logits = model(
        input_ids=tail_ids.to(device),
        attention_mask=torch.cat([mask[owner], tail_mask], dim=1).to(device),  # [P, Lc + W]
        position_ids=tail_positions.to(device),
        cache=cache,
        use_cache=True,
    ).logits  # [P, W, V]
    for p, ((b, c), tail) in enumerate(zip(longer, tails)):
        logp = torch.log_softmax(logits[p, : len(tail) - 1].float(), dim=-1)  # [len - 1, V]
        target = torch.tensor(tail[1:], device=device).unsqueeze(-1)  # [len - 1, 1]
        scores[b][c] += logp.gather(-1, target).sum().item()
    return scores


def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    prompt_fn: PromptFn,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """Summed log-likelihood of each choice of each row, given the row's prompt.

    The choices of a row share its prompt, so each prompt is run once and its key-value cache scores all of its
    choices (`batch_size` prompts per forward pass, longest first). A model that returns no cache is scored on one
    full sequence per (row, choice) instead (`batch_size` sequences per forward pass).

    Returns:
        One list per row, with one float per choice (natural log).
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    requests, owners = [], []
    for r, row in enumerate(rows):
        if not row["choices"]:
            raise ValueError(f"Row {r} (task {row.get('task')!r}) has no choices; use generate_answers for it.")
        prompt = prompt_fn(row)
        for choice in row["choices"]:
            ctx, cont = encode_pair(tokenizer, *split_context_continuation(prompt, choice))
            requests.append((_truncate_left(ctx, cont, limit), cont))
            owners.append(r)

    flat = [0.0] * len(requests)
    pad_id = pad_token_id(tokenizer)
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context ids -> indices into `requests`
    for k, (ctx, _) in enumerate(requests):
        by_context[tuple(ctx)].append(k)
    contexts = sorted(by_context, key=len, reverse=True)
    with _eval_mode(model):
        batches = list(_batches(contexts, batch_size))
        for index, batch in enumerate(tqdm(batches, desc="scoring choices", disable=not progress)):
            groups = [(list(ctx), [requests[k][1] for k in by_context[ctx]]) for ctx in batch]
            scores = _shared_context_logprobs(model, pad_id, groups)
            if scores is None:  # no key-value cache: score full sequences, for this and every later batch
                remaining = [k for ctx in contexts[index * batch_size :] for k in by_context[ctx]]
                _score_full_sequences(model, pad_id, requests, remaining, batch_size, flat)
                break
            for ctx, group_scores in zip(batch, scores):
                for k, score in zip(by_context[ctx], group_scores):
                    flat[k] = score

    per_row: list[list[float]] = [[] for _ in rows]
    for k, r in enumerate(owners):
        per_row[r].append(flat[k])
    return per_row


def _score_full_sequences(
    model: torch.nn.Module,
    pad_id: int,
    requests: Sequence[tuple[list[int], list[int]]],
    indices: Sequence[int],
    batch_size: int,
    flat: list[float],
) -> None:
    """Fill `flat[k]` for each k in `indices` with `_continuation_logprobs`, longest sequences first."""
    order = sorted(indices, key=lambda k: -sum(map(len, requests[k])))
    for batch in _batches(order, batch_size):
        for k, score in zip(batch, _continuation_logprobs(model, pad_id, [requests[k] for k in batch])):
            flat[k] = score


def score_choices(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    prompt_fn: PromptFn,
    batch_size: int = 16,
    progress: bool = False,
) -> list[int]:
    """Predict each row's choice: the index of the choice with the highest log-likelihood.

    See `choice_loglikelihoods` for how choices are scored; ties go to the first choice.
    """
    scores = choice_loglikelihoods(model, tokenizer, rows, prompt_fn, batch_size, progress)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


# generation


def clean_generation(text: str) -> str:
    """The answer part of generated text: everything before the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    prompt_fn: PromptFn,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers for each row: generate after the prompt, cut at the first newline, strip.

    Prompts are left-padded by hand, so batching does not depend on `tokenizer.padding_side`.
    """
    from transformers import GenerationConfig

    pad_id = pad_token_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos or None
    )
    prompts = [tokenizer(prompt_fn(row)).input_ids for row in rows]
    answers: list[str] = []
    device = _device(model)
    with _eval_mode(model):
        for batch in tqdm(list(_batches(prompts, batch_size)), desc="generating", disable=not progress):
            ids, mask = _pad(batch, pad_id, side="left")
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            new_tokens = out[:, ids.shape[1] :]  # [B, <= max_new_tokens]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(clean_generation(t) for t in texts)
    return answers


# evaluation over tasks


def _task_kind(task: str, rows: Sequence[Mapping[str, Any]]) -> str:
    has_choices = {bool(row["choices"]) for row in rows}
    if len(has_choices) > 1:
        raise ValueError(
            f"Task {task!r} mixes rows with and without choices; a task must be all multiple choice "
            "or all generation (split it into two tasks)."
        )
    return "multiple_choice" if has_choices.pop() else "generation"


def _check_answers(rows: Sequence[Mapping[str, Any]]) -> None:
    for i, row in enumerate(rows):
        if row["answer"].strip() not in [c.strip() for c in row["choices"]]:
            raise ValueError(
                f"Task {row['task']!r}, row {i}: the answer {row['answer']!r} is not one of the "
                f"choices {row['choices']!r}; fix the data so the answer is a choice."
            )


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    dataset: Iterable[Mapping[str, Any]],
    prompt_fn: PromptFn,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: int = 16,
) -> Results:
    """Accuracy of `model` on each task of `dataset` (a list of rows or a `datasets.Dataset`).

    Multiple-choice tasks are scored with `score_choices` (correct when the chosen
    choice equals the answer), generation tasks with `generate_answers` (exact match
    after stripping).

    Returns:
        `{task: {"accuracy": float, "n": int, "kind": "multiple_choice" | "generation"}}` for
        each task, plus `"overall"`: `{"accuracy": macro mean over tasks, "n": total rows,
        "kind": "macro_mean"}`.
    """
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in dataset:
        by_task[row["task"]].append(row)
    if not by_task:
        raise ValueError("The dataset is empty; nothing to evaluate.")
    if OVERALL in by_task:
        raise ValueError(f"A task is named {OVERALL!r}, which is reserved for the summary; rename it.")
    kinds = {task: _task_kind(task, rows) for task, rows in by_task.items()}

    choice_rows = [row for task, rows in by_task.items() if kinds[task] == "multiple_choice" for row in rows]
    generation_rows = [row for task, rows in by_task.items() if kinds[task] == "generation" for row in rows]
    _check_answers(choice_rows)

    correct: list[bool] = []
    if choice_rows:
        picks = score_choices(model, tokenizer, choice_rows, prompt_fn, batch_size, progress)
        correct += [row["choices"][k].strip() == row["answer"].strip() for row, k in zip(choice_rows, picks)]
    if generation_rows:
        texts = generate_answers(model, tokenizer, generation_rows, prompt_fn, max_new_tokens, batch_size, progress)
        correct += [text == row["answer"].strip() for row, text in zip(generation_rows, texts)]

    hits: dict[str, list[bool]] = defaultdict(list)
    for row, ok in zip(choice_rows + generation_rows, correct):
        hits[row["task"]].append(ok)
    results: Results = {
        task: {"accuracy": sum(hits[task]) / len(hits[task]), "n": len(hits[task]), "kind": kinds[task]}
        for task in sorted(by_task)
    }
    results[OVERALL] = {
        "accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
        "n": sum(r["n"] for r in results.values()),
        "kind": "macro_mean",
    }
    return results


# printing


def _is_single(results: Mapping[str, Any]) -> bool:
    return all(isinstance(v, Mapping) and "accuracy" in v for v in results.values())


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of per-task accuracy, `overall` last.

    `results` is either one `evaluate` result, or several keyed by method name (e.g.
    `{"comoe": ..., "moe": ..., "lora": ...}`), which gives one accuracy column per method.
    A task missing from a method shows `-`.
    """
    if not results:
        raise ValueError("No results to format.")
    methods = {"accuracy": results} if _is_single(results) else dict(results)
    tasks = sorted({t for res in methods.values() for t in res if t != OVERALL})
    if any(OVERALL in res for res in methods.values()):
        tasks.append(OVERALL)

    def cell(task: str, key: str) -> str:
        for res in methods.values():
            if task in res:
                return str(res[task][key])
        return "-"

    header = ["task", "kind", "n", *methods]
    body = [
        [task, cell(task, "kind"), cell(task, "n")]
        + [f"{res[task]['accuracy']:.3f}" if task in res else "-" for res in methods.values()]
        for task in tasks
    ]
    widths = [max(len(str(r[c])) for r in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        first = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        rest = [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(first + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
