"""What each install brings: the library needs no plotting or experiment packages, the `experiments` extra brings
them, the `test` extra everything the tests import; the imports of each layer are declared in pyproject.toml."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS = PROJECT["optional-dependencies"]
DISTRIBUTION = {"yaml": "pyyaml", "lm_eval": "lm-eval"}  # module -> distribution, where the names differ
OPTIONAL_IN_LIBRARY = {"bitsandbytes"}  # imported only for quantized bases; the user installs it with them


def names(requirements: list[str]) -> set[str]:
    return {Requirement(line).name.lower() for line in requirements}


def third_party_imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / "comoe_peft" / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {DISTRIBUTION.get(m, m) for m in found if m not in sys.stdlib_module_names and m != "comoe_peft"}


def test_the_library_depends_on_no_plotting_or_experiment_package():
    core = names(PROJECT["dependencies"])
    assert core == {"torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "packaging"}
    assert {"matplotlib", "scipy", "tqdm", "gguf"} <= names(EXTRAS["experiments"])
    assert core & names(EXTRAS["experiments"]) == {"trl"}  # narrowed there to CoMoESFTTrainer's trl >= 1.9


def test_every_import_of_each_layer_is_declared():
    core, experiments = names(PROJECT["dependencies"]), names(EXTRAS["experiments"])
    library = third_party_imports("tuner") | third_party_imports("training")
    assert library - OPTIONAL_IN_LIBRARY <= core, "the tuner or the trainer imports an undeclared package"
    assert third_party_imports("experiments") - OPTIONAL_IN_LIBRARY <= core | experiments
    assert third_party_imports("integrations") <= core | names(EXTRAS["axolotl"]) | names(EXTRAS["llamafactory"])


def test_the_test_extra_brings_the_experiments_and_the_docs():
    own = [Requirement(line) for line in EXTRAS["test"] if Requirement(line).name == "comoe-peft"]
    assert len(own) == 1 and {"experiments", "docs"} <= own[0].extras
    assert {"pytest", "nbval", "ipykernel", "bitsandbytes", "build"} <= names(EXTRAS["test"])
    assert "models" not in EXTRAS  # the default model is fetched on first use, not installed


# what an installed package needs beyond its modules: the console script's module, the presets, train --help's text
PACKAGE_FILES = ["comoe_peft_launcher.py", "comoe_peft/experiments/presets/default.yaml",
                 "comoe_peft/experiments/presets/quick.yaml", "comoe_peft/experiments/presets/mixlora.yaml",
                 "comoe_peft/experiments/train_help.txt",
                 "comoe_peft/tuner/model.py", "comoe_peft/training/trainer.py", "comoe_peft/experiments/cli.py"]


@pytest.mark.slow
def test_the_sdist_and_the_wheel_carry_the_package_its_data_and_its_command(tmp_path):
    """`python -m build` on the tracked files makes an sdist and a wheel with every module, the presets, the
    shipped help and the `comoe-peft` console script, requiring what pyproject.toml declares."""
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = PROJECT["version"]
    wheel = zipfile.ZipFile(tmp_path / "dist" / f"comoe_peft-{version}-py3-none-any.whl")
    in_wheel = set(wheel.namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "comoe_peft").rglob("*.py")}
    assert modules | set(PACKAGE_FILES) <= in_wheel
    assert not any(name.startswith(("tests/", "benchmarks/", "docs/")) for name in in_wheel)
    dist_info = f"comoe_peft-{version}.dist-info"
    assert "comoe-peft = comoe_peft_launcher:main" in wheel.read(f"{dist_info}/entry_points.txt").decode()
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    required = {Requirement(line.split(":", 1)[1]).name for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert required == names(PROJECT["dependencies"])
    with tarfile.open(tmp_path / "dist" / f"comoe_peft-{version}.tar.gz") as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert set(PACKAGE_FILES) | {"pyproject.toml", "README.md"} <= in_sdist
