"""What each install brings: the library needs no plotting or experiment packages, the `experiments` extra brings
them, the `test` extra everything the tests import; the imports of each layer are declared in pyproject.toml."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

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
    assert core == {"torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors"}
    assert {"matplotlib", "scipy", "tqdm", "gguf"} <= names(EXTRAS["experiments"])
    assert not core & names(EXTRAS["experiments"])


def test_every_import_of_each_layer_is_declared():
    core, experiments = names(PROJECT["dependencies"]), names(EXTRAS["experiments"])
    library = third_party_imports("tuner") | third_party_imports("training")
    assert library - OPTIONAL_IN_LIBRARY <= core, "the tuner or the trainer imports an undeclared package"
    assert third_party_imports("experiments") - OPTIONAL_IN_LIBRARY <= core | experiments


def test_the_test_extra_brings_the_experiments_and_the_docs():
    own = [Requirement(line) for line in EXTRAS["test"] if Requirement(line).name == "comoe-peft"]
    assert len(own) == 1 and {"experiments", "docs"} <= own[0].extras
    assert {"pytest", "nbval", "ipykernel", "bitsandbytes"} <= names(EXTRAS["test"])
    assert "models" not in EXTRAS  # the default model is fetched on first use, not installed
