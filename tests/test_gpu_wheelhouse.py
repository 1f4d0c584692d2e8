"""The GPU check on an air-gapped box (benchmarks/gpu_wheelhouse.py): the wheelhouse's pins and sources, and the
check's import path on a simulated box that has only torch, transformers, accelerate (with their dependencies) and
the wheelhouse. Every other installed package is hidden from the check's processes, as if it were not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_wheelhouse  # noqa: E402

NOT_ON_THE_BOX = {"datasets", "trl", "lm_eval", "matplotlib", "scipy"}

# Run in every process of the check (a sitecustomize on PYTHONPATH): the import system finds no hidden module, as on
# the box, and at exit a process reports any module of NOT_ON_THE_BOX that got imported all the same.
SITECUSTOMIZE = """\
import atexit, importlib.machinery, json, os, sys

HIDDEN = frozenset(json.loads(os.environ["GPU_BOX_HIDDEN"]))
NOT_ON_THE_BOX = frozenset(json.loads(os.environ["GPU_BOX_MISSING"]))


class BoxPathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [BoxPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


@atexit.register
def _report():
    leaked = sorted(NOT_ON_THE_BOX & {name.partition(".")[0] for name in sys.modules})
    if leaked:
        print("GPU-BOX-LEAK", leaked, file=sys.stderr)
"""


def requirement_closure(names) -> set[str]:
    """The installed distributions `names` need, themselves included (extras left out)."""
    found, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        found.add(name)
        todo += [req.name for req in map(Requirement, requires)
                 if req.marker is None or req.marker.evaluate({"extra": ""})]
    return found


def box_environment(tmp_path: Path) -> dict[str, str]:
    """Environment variables for a process that sees only the box's packages and the wheelhouse's."""
    allowed = requirement_closure(gpu_wheelhouse.BOX) | {canonicalize_name(name) for name in gpu_wheelhouse.WHEELS}
    allowed.add("comoe-peft")  # the package's own wheel
    hidden = sorted(module for module, dists in metadata.packages_distributions().items()
                    if not {canonicalize_name(dist) for dist in dists} & allowed)
    site = tmp_path / "box-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(site), str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "GPU_BOX_HIDDEN": json.dumps(hidden),
            "GPU_BOX_MISSING": json.dumps(sorted(NOT_ON_THE_BOX)), "OMP_NUM_THREADS": "1"}


def test_the_simulated_box_lacks_what_the_check_must_not_import(tmp_path):
    env = box_environment(tmp_path)
    assert {"trl", "datasets", "matplotlib", "scipy"} <= set(json.loads(env["GPU_BOX_HIDDEN"])), \
        "the test suite's environment has them installed, so the box must hide them"
    done = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'matplotlib'" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import torch, transformers, accelerate, pytest"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_gpu_check_dry_run_needs_only_the_box_and_the_wheelhouse(tmp_path):
    """Every step's modules (the speed scripts, and the CUDA test files through pytest's collection) import with
    nothing but the box and the wheelhouse, and none of them imports datasets, trl, lm-eval, matplotlib or scipy."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out-dir", str(tmp_path / "gpu")],
                          cwd=REPOSITORY, env=box_environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "GPU-BOX-LEAK" not in done.stderr, done.stderr
    assert "cuda_tests: pytest collects" in done.stdout and "nothing was run" in done.stdout
    assert not (tmp_path / "gpu").exists()


def test_the_wheels_are_pinned_as_ci_tests_them():
    pins = {}
    for line in (REPOSITORY / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            pins[canonicalize_name(name)] = version
    for name, version in gpu_wheelhouse.WHEELS.items():
        assert pins.get(canonicalize_name(name), version) == version, name
    assert {"peft", "pytest", "bitsandbytes"} <= set(gpu_wheelhouse.WHEELS)
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    (peft,) = [Requirement(line) for line in project["dependencies"] if Requirement(line).name == "peft"]
    assert peft.specifier.contains(gpu_wheelhouse.WHEELS["peft"]), "the shipped peft is one the package supports"
    assert not set(gpu_wheelhouse.WHEELS) & requirement_closure(gpu_wheelhouse.BOX), "the box has it already"


def test_the_download_asks_for_wheels_of_the_box_python_without_dependencies(tmp_path):
    command = gpu_wheelhouse.download_command(tmp_path, "3.12")
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--only-binary=:all:", "--no-deps", "manylinux2014_x86_64"} <= set(command)
    assert command[command.index("--python-version") + 1] == "3.12" and command[command.index("--abi") + 1] == "cp312"
    assert command[command.index("-d") + 1] == str(tmp_path)
    assert {f"{name}=={version}" for name, version in gpu_wheelhouse.WHEELS.items()} <= set(command)


def test_the_sources_are_the_scripts_and_tests_without_the_package(tmp_path):
    archive = gpu_wheelhouse.write_sources(tmp_path)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "benchmarks/gpu_check.py", "benchmarks/layer_speed.py", "benchmarks/train_step.py",
            "benchmarks/decode_speed.py", "tests/conftest.py", "tests/reference.py"} <= names
    assert set(gpu_check.cuda_test_files()) <= names
    assert not any(name.startswith("comoe_peft") for name in names), "the check runs the installed wheel"


def test_a_wheelhouse_is_written_only_into_an_empty_folder(tmp_path):
    (tmp_path / "peft-0.20.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(SystemExit, match="not empty"):
        gpu_wheelhouse.main(["--out", str(tmp_path)])
    (tmp_path / "big.whl").write_bytes(b"\0" * (gpu_wheelhouse.LIMIT_BYTES + 1))
    with pytest.raises(SystemExit, match="over the 64 MiB limit"):
        gpu_wheelhouse.check_size(tmp_path)
