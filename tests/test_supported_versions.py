"""The tested version ranges say the same thing everywhere: pyproject.toml admits every venv CI tests, each venv
pins what it says, .ci/run tests each one, and the docs' table and the one-line minimum checks agree with them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from comoe_peft.tuner.versions import MIN_PEFT, MIN_TRL

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {Requirement(line).name: Requirement(line) for line in PROJECT["dependencies"]}
VENVS = {"main": ROOT / "constraints.txt", "axolotl": ROOT / ".ci" / "axolotl.txt",
         "llamafactory": ROOT / ".ci" / "llamafactory.txt"}
PACKAGES = ["torch", "peft", "transformers", "trl", "accelerate", "datasets"]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            found[requirement.name.lower()] = spec.version
    return found


@pytest.mark.parametrize("venv", VENVS)
def test_pyproject_admits_every_tested_venv(venv):
    versions = pins(VENVS[venv])
    for package in PACKAGES:
        assert versions[package] in CORE[package].specifier, (venv, package, versions[package])


def test_the_lowest_tested_versions_are_the_floors():
    tested = {package: min(Version(pins(path)[package]) for path in VENVS.values()) for package in PACKAGES}
    assert tested["peft"] == Version(MIN_PEFT) and f">={MIN_PEFT}" in str(CORE["peft"].specifier)
    assert tested["transformers"] == Version("5.6.0") and ">=5.6" in str(CORE["transformers"].specifier)
    assert tested["trl"] == Version("0.24.0") and ">=0.24" in str(CORE["trl"].specifier)  # the Trainer path
    sft_tested = min(Version(pins(VENVS[v])["trl"]) for v in ("main", "axolotl"))  # where the SFT tests run
    assert sft_tested == Version(MIN_TRL + ".0")
    experiments = {Requirement(line).name: Requirement(line) for line in PROJECT["optional-dependencies"]["experiments"]}
    assert str(experiments["trl"].specifier) == str(CORE["trl"].specifier).replace(">=0.24", f">={MIN_TRL}")


def test_the_frameworks_pins():
    """axolotl is installed at its version; LLaMA-Factory is not (its torchvision has only CUDA builds on PyPI, which
    break transformers beside the CPU torch), its upper bounds are pinned instead."""
    assert pins(VENVS["axolotl"])["axolotl"] == "0.19.0"
    assert "llamafactory" not in pins(VENVS["llamafactory"])
    assert "0.9.5" in VENVS["llamafactory"].read_text().splitlines()[0]


def test_ci_runs_the_tuner_and_trainer_tests_in_each_framework_venv():
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")  # continued lines joined
    calls = re.findall(r"^compat_venv (\w+) (.*)$", ci, flags=re.MULTILINE)
    assert sorted(name for name, _ in calls) == ["axolotl", "llamafactory"]
    tuner_tests = re.search(r"TUNER_TESTS=\((.*?)\)", ci, flags=re.DOTALL).group(1).split()
    assert {"tests/test_peft_contract.py", "tests/test_transformers_trainer.py", "tests/test_layer.py"} <= set(tuner_tests)
    assert all((ROOT / path).is_file() for path in tuner_tests)
    lines = dict(calls)
    assert "tests/test_trainer.py" in lines["axolotl"] and "tests/test_axolotl_plugin.py" in lines["axolotl"]
    assert "tests/test_trainer.py" not in lines["llamafactory"]  # trl 0.24 there: below CoMoESFTTrainer's minimum
    assert "tests/test_llamafactory_recipe.py" not in lines["llamafactory"]  # llamafactory is not installed there


def test_the_docs_table_lists_each_venvs_versions():
    table = (ROOT / "docs" / "installation.md").read_text().split("## Supported versions")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[2:] == PACKAGES
    for row, path in zip(rows[1:], VENVS.values()):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert path.name in cells[0], row
        assert cells[2:] == [pins(path)[package] for package in PACKAGES], row
