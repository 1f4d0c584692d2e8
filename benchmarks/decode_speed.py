"""Inference cost: prefill time and time per generated token for the base model, peft LoRA and CoMoE.

Greedy decoding with the key-value cache, prompts of `--prompt-len` tokens (no padding), `--new-tokens` generated
tokens, at every batch size of `--batches`. Adapters on q, k, v, o of every layer; B matrices random (std 0.02), so
the adapters change the output as trained ones do.

Arms (one copy of the model each, one process, interleaved round by round like `layer_speed.py`):

    base         the model without an adapter
    lora_kr      peft LoRA at r = k*r (CoMoE's active rank)
    comoe        CoMoE, N experts, top-k (eval mode: the lean inference path)
    (--compile)  base_compiled, lora_kr_compiled, comoe_compiled: the same models with `torch.compile` over the
                 transformers model and a `StaticCache`, so that every decoding step has the same shapes

Models: `smollm2` (the converted SmolLM2-135M from `comoe_peft.experiments.pretrained`, skipped when missing) and config-built
models of real shapes with random weights (nothing is downloaded): `smollm2-shape` (SmolLM2-135M's config),
`llama-1b-shape` (Llama-3.2-1B's layer shapes, `--shape-layers` layers) and `llama-7b-shape` (Llama-2-7B's).

Reported per model and batch size: median seconds of the prefill and per generated token, their median per-round
ratios to lora_kr (and of compiled arms to compiled lora_kr and to their own eager arm), and the peak memory of
one generation above the weights (CUDA: `max_memory_allocated`; CPU: the live bytes of the tensors the generation
creates, counted in a `TorchDispatchMode`, in an untimed pass; not for compiled arms, which cannot run under one).
CPU: torch.set_num_threads(1) and time.thread_time; CUDA: the wall clock after `torch.cuda.synchronize()`.
Targets (CPU): decode <= 1.10x lora_kr at every batch size, prefill <= 1.15x.

    python benchmarks/decode_speed.py --out benchmarks/results/decode_speed_cpu.json \
        --markdown benchmarks/results/decode_speed_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_speed

from comoe_peft import CoMoEConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EAGER_ARMS = ("base", "lora_kr", "comoe")
DECODE_TARGET, PREFILL_TARGET = 1.10, 1.15
QUICK = {"models": ["smollm2-shape"], "batches": [1], "prompt_len": 16, "new_tokens": 4, "rounds": 2,
         "shape_layers": 2}
FULL = {"models": ["smollm2", "smollm2-shape", "llama-1b-shape"], "batches": [1, 8], "prompt_len": 64,
        "new_tokens": 32, "rounds": 5, "shape_layers": 4}

# Layer shapes of public model configs (no weights needed).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),  # for smoke tests
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
FULL_DEPTH_SHAPES = ("tiny", "smollm2-shape")  # the others take --shape-layers layers (the cost per layer counts)


# ---------------------------------------------------------------------------------------------- models and arms


def shape_model(name: str, layers: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random Llama with the layer shapes of `name` (SHAPES)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(SHAPES[name])
    if name not in FULL_DEPTH_SHAPES:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def load_model(name: str, args: argparse.Namespace) -> nn.Module | None:
    if name != "smollm2":
        return shape_model(name, args.shape_layers, args.dtype)
    model = _smollm2(args.dtype)
    if model is None:
        print("smollm2 skipped: the converted SmolLM2-135M is not available (comoe_peft.experiments.pretrained)", flush=True)
    return model


def _smollm2(dtype: torch.dtype) -> nn.Module | None:
    try:
        from comoe_peft.experiments.pretrained import ensure_default_model

        folder = ensure_default_model()
    except (ImportError, FileNotFoundError):
        return None
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _randomise_up_projections(model: nn.Module, names: tuple[str, ...], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in names):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build_arms(base_model: nn.Module, args: argparse.Namespace) -> dict[str, nn.Module]:
    """base, lora_kr and comoe, each on its own copy of `base_model`, on the benchmark's device, in eval mode."""
    from peft import LoraConfig, get_peft_model

    lora_r = args.top_k * args.r
    lora = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                                target_modules=list(TARGETS)))
    _randomise_up_projections(lora, ("lora_B",), seed=1)
    comoe = get_peft_model(copy.deepcopy(base_model), CoMoEConfig(
        r=args.r, lora_alpha=2 * args.r, num_experts=args.num_experts, top_k=args.top_k,
        target_modules=list(TARGETS)))
    _randomise_up_projections(comoe, ("comoe_B",), seed=1)
    arms = {"base": base_model, "lora_kr": lora, "comoe": comoe}
    return {name: module.to(args.device).eval() for name, module in arms.items()}


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def compile_arm(model: nn.Module) -> nn.Module:
    """The same model with its transformers forward compiled (the tuner's hooks stay outside the graph).

    The arms share one forward function, and each (arm, batch size, prefill or decode step) is its own graph: the
    recompile limit is raised so that none of them falls back to eager.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    inner = inner_model(model)
    inner.forward = torch.compile(inner.forward, fullgraph=True, dynamic=False)
    return model


# ---------------------------------------------------------------------------------------------- generation


def make_prompt(vocab: int, batch: int, length: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator).to(device)


def new_cache(model: nn.Module, static: bool, batch: int, max_len: int, device: str):
    from transformers import DynamicCache, StaticCache

    config = inner_model(model).config
    if not static:
        return DynamicCache(config=config)
    return StaticCache(config=config, max_cache_len=max_len)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache, clock: Callable[[], float]):
    """Greedy decoding with the cache; returns (prefill seconds, decode seconds, generated ids)."""
    began = clock()
    logits = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    prefilled = clock()
    tokens = [token]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    finished = clock()
    return prefilled - began, finished - prefilled, torch.cat(tokens, dim=1)


def make_clock(device: str) -> Callable[[], float]:
    if device != "cuda":
        return time.thread_time

    def cuda_clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return cuda_clock


def peak_memory(run: Callable[[], object], device: str) -> int:
    """Peak bytes of the tensors one call creates and holds at once (weights and other earlier tensors excluded):
    CUDA allocator statistics on a GPU, a dispatch-mode count of live tensor storages on a CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveTensorBytes() as tracker:
        run()
    return tracker.peak


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode while tensors that use them are alive.

    An op's output that shares storage with one of its inputs (views, in-place ops) adds nothing new; a storage is
    released when the last tensor from the mode that uses it is garbage-collected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _is_dense(t)}
        for tensor in tree_flatten(out)[0]:
            if _is_dense(tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, input_storages: set[int]) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        entry = self._storages.get(pointer)
        if entry is None:
            if pointer in input_storages or storage.nbytes() == 0:
                return  # a view or in-place result of a tensor made before the mode
            entry = self._storages[pointer] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        entry = self._storages.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._storages[pointer]


def _is_dense(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type != "meta"


# ---------------------------------------------------------------------------------------------- one model


def run_model(name: str, base_model: nn.Module, args: argparse.Namespace) -> dict:
    arms = build_arms(base_model, args)
    if args.compile:
        for arm in EAGER_ARMS:
            arms[f"{arm}_compiled"] = compile_arm(copy.deepcopy(arms[arm]))
    names = tuple(arms)
    clock = make_clock(args.device)
    max_len = args.prompt_len + args.new_tokens
    results = []
    for batch in args.batches:
        prompt = make_prompt(base_model.config.vocab_size, batch, args.prompt_len, args.device)

        def run(arm: str):
            cache = new_cache(arms[arm], arm.endswith("_compiled"), batch, max_len, args.device)
            return generate(arms[arm], prompt, args.new_tokens, cache, clock)

        began = time.perf_counter()
        warm = {arm: run(arm) for arm in names}  # compiles the compiled arms, warms caches
        compile_seconds = time.perf_counter() - began
        memory = {arm: None if arm.endswith("_compiled") and args.device == "cpu"  # no dispatch mode under compile
                  else peak_memory(lambda arm=arm: run(arm), args.device) for arm in names}
        prefill: dict[str, list[float]] = {arm: [] for arm in names}
        decode: dict[str, list[float]] = {arm: [] for arm in names}
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for arm in names[shift:] + names[:shift]:
                seconds_prefill, seconds_decode, _ = run(arm)
                prefill[arm].append(seconds_prefill)
                decode[arm].append(seconds_decode / max(args.new_tokens - 1, 1))
        results.append(_batch_result(batch, names, prefill, decode, memory, warm, compile_seconds))
    return {"model": name, "params": sum(p.numel() for p in base_model.parameters()), "results": results}


def _batch_result(batch, names, prefill, decode, memory, warm, compile_seconds) -> dict:
    arms = {}
    for arm in names:
        reference = "lora_kr_compiled" if arm.endswith("_compiled") else "lora_kr"
        values = {
            "prefill_seconds": statistics.median(prefill[arm]),
            "decode_seconds_per_token": statistics.median(decode[arm]),
            "prefill_ratio_to_lora_kr": layer_speed.median_ratio(prefill, arm, reference),
            "decode_ratio_to_lora_kr": layer_speed.median_ratio(decode, arm, reference),
            "peak_memory_bytes": memory[arm],
            "prefill_seconds_per_round": prefill[arm],
            "decode_seconds_per_round": decode[arm],
        }
        if arm.endswith("_compiled"):
            eager = arm.removesuffix("_compiled")
            values["prefill_ratio_to_eager"] = layer_speed.median_ratio(prefill, arm, eager)
            values["decode_ratio_to_eager"] = layer_speed.median_ratio(decode, arm, eager)
        arms[arm] = values
    comoe = arms["comoe"]
    same_tokens = {arm: bool(torch.equal(warm[arm][2], warm[arm.removesuffix("_compiled")][2]))
                   for arm in names if arm.endswith("_compiled")}
    return {
        "batch": batch,
        "arms": arms,
        "warmup_seconds": compile_seconds,
        "compiled_generates_the_eager_tokens": same_tokens,
        "targets": {
            f"decode_le_{DECODE_TARGET}x_lora_kr": comoe["decode_ratio_to_lora_kr"] <= DECODE_TARGET,
            f"prefill_le_{PREFILL_TARGET}x_lora_kr": comoe["prefill_ratio_to_lora_kr"] <= PREFILL_TARGET,
        },
    }


# ---------------------------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Inference: prefill and decoding with the key-value cache",
        "",
        (
            f"{meta['device_name']}; torch {meta['torch']}; {meta['dtype']}; timer: {meta['timer']}; threads: "
            f"{meta['threads']}; prompt {meta['prompt_len']} tokens, {meta['new_tokens']} generated (greedy); "
            f"CoMoE N={meta['num_experts']}, k={meta['top_k']}, r={meta['r']}; LoRA r={meta['top_k'] * meta['r']}; "
            f"targets q, k, v, o; medians of per-round ratios over {meta['rounds']} interleaved rounds. "
            f"Command: `python benchmarks/decode_speed.py {' '.join(meta['argv'])}`."
        ),
        "",
        "| model | batch | arm | prefill (ms) | vs LoRA | ms / token | vs LoRA | vs eager | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in report["results"]:
        label = f"{model['model']} ({model['params'] / 1e6:.0f}M)"
        for result in model["results"]:
            for arm, v in result["arms"].items():
                memory = "n/a" if v["peak_memory_bytes"] is None else f"{v['peak_memory_bytes'] / 1e6:.1f}"
                eager = f"{v['decode_ratio_to_eager']:.3f}" if "decode_ratio_to_eager" in v else ""
                lines.append(
                    f"| {label} | {result['batch']} | {arm} | {v['prefill_seconds'] * 1e3:.1f} "
                    f"| {v['prefill_ratio_to_lora_kr']:.3f} | {v['decode_seconds_per_token'] * 1e3:.2f} "
                    f"| {v['decode_ratio_to_lora_kr']:.3f} | {eager} | {memory} |"
                )
    lines += [""]
    for model in report["results"]:
        for result in model["results"]:
            same = result["compiled_generates_the_eager_tokens"]
            if same:
                lines.append(f"- {model['model']}, batch {result['batch']}: compiled arms generate the eager arms' "
                             f"tokens: {', '.join(f'{arm} {ok}' for arm, ok in same.items())}")
    lines += ["", f"Targets: CoMoE decode <= {DECODE_TARGET}x LoRA r=k*r, prefill <= {PREFILL_TARGET}x "
              "(compiled arms against compiled LoRA).", ""]
    for model in report["results"]:
        for result in model["results"]:
            for arm in (a for a in ("comoe", "comoe_compiled") if a in result["arms"]):
                v = result["arms"][arm]
                decode_ok = v["decode_ratio_to_lora_kr"] <= DECODE_TARGET
                prefill_ok = v["prefill_ratio_to_lora_kr"] <= PREFILL_TARGET
                lines.append(
                    f"- {model['model']}, batch {result['batch']}, {arm}: decode {v['decode_ratio_to_lora_kr']:.3f} "
                    f"({'met' if decode_ok else 'MISSED'}), prefill {v['prefill_ratio_to_lora_kr']:.3f} "
                    f"({'met' if prefill_ok else 'MISSED'})"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a small smoke run: {QUICK}")
    parser.add_argument("--models", nargs="+", choices=["smollm2", *SHAPES])
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--shape-layers", type=int, help="layers of the config-built shapes other than SmolLM2's")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd arms (StaticCache)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("prompt_len", "new_tokens", "rounds", "shape_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    if not 1 <= args.top_k < args.num_experts:
        parser.error(f"--top-k must be in [1, --num-experts - 1], got {args.top_k} with {args.num_experts} experts")
    args.dtype_name, args.dtype = args.dtype, getattr(torch, args.dtype)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = "cpu" if device == "auto" else device
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    meta = {
        **layer_speed.machine(args.device, args.argv),
        "dtype": args.dtype_name,
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "r": args.r,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "compile": args.compile,
    }
    if args.device == "cuda":
        meta["timer"] = "wall clock after torch.cuda.synchronize()"
    report = {"meta": meta, "results": []}
    for name in args.models:
        model = load_model(name, args)
        if model is None:
            continue
        began = time.perf_counter()
        result = run_model(name, model, args)
        result["wall_seconds"] = time.perf_counter() - began
        report["results"].append(result)
        for batch_result in result["results"]:
            comoe = batch_result["arms"]["comoe"]
            print(f"{name} batch {batch_result['batch']}: comoe decode {comoe['decode_ratio_to_lora_kr']:.3f}x, "
                  f"prefill {comoe['prefill_ratio_to_lora_kr']:.3f}x lora_kr ({result['wall_seconds']:.0f} s)",
                  flush=True)
    layer_speed.write_report(report, markdown(report), args.out, args.markdown)
    return report


if __name__ == "__main__":
    main()
