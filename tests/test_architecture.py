"""The package's three layers: imports run one way (experiments -> training -> tuner), without circles, and the
library import stays light (no trl, no matplotlib) while the public names still come from the top level. The
integrations (the axolotl plugin) sit beside the experiments: they may import training and tuner, and neither
they nor the experiments import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "comoe_peft"
LAYERS = ["tuner", "training", "experiments"]  # lowest first
SIDE_BY_SIDE = {"integrations": "experiments"}  # a package at the level of a layer, which must not import that layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every comoe_peft module a file imports, at top level or inside functions, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(
        block.test) for n in ast.walk(block)}  # imports for annotations only run in type checkers
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {name for name in found if name.startswith("comoe_peft")}


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in SIDE_BY_SIDE:
        return LAYERS.index(SIDE_BY_SIDE[parts[1]])
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def package_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and (parts[1] in LAYERS or parts[1] in SIDE_BY_SIDE) else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if layer_of(m) is None and m not in ("comoe_peft", "comoe_peft.__main__")]
    assert loose == [], f"modules outside tuner/training/experiments/integrations: {loose}"


@pytest.mark.parametrize("module", [m for m in MODULES if layer_of(m) is not None])
def test_imports_run_downwards(module):
    own = layer_of(module)
    upward = sorted(n for n in imported_modules(MODULES[module]) if (layer_of(n) or -1) > own)
    assert upward == [], f"{module} imports a layer above it: {upward}"
    sideways = sorted(n for n in imported_modules(MODULES[module])
                      if layer_of(n) == own and package_of(n) not in (package_of(module), None))
    assert sideways == [], f"{module} imports a package beside it: {sideways}"


def test_no_import_circle():
    graph = {m: {n for n in imported_modules(p) if n in MODULES and n != m} for m, p in MODULES.items()
             if m not in ("comoe_peft", "comoe_peft.__main__")}
    for m in graph:  # a module importing a package's __init__ (e.g. `comoe_peft` for its version) is not a circle
        graph[m] = {n for n in graph[m] if not MODULES[n].name == "__init__.py"}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip()


def test_import_comoe_peft_is_light():
    heavy = ["trl", "matplotlib", "axolotl", "comoe_peft.training", "comoe_peft.experiments", "comoe_peft.integrations"]
    loaded = run_python(f"import sys, comoe_peft\nprint(','.join(m for m in {heavy!r} if m in sys.modules))")
    assert loaded == "", f"`import comoe_peft` imported: {loaded}"


def test_tuner_layer_imports_neither_trl_nor_the_layers_above():
    code = ("import sys, comoe_peft.tuner, comoe_peft.tuner.bnb, comoe_peft.tuner.dora\n"
            "print(','.join(m for m in sys.modules if m == 'trl' or m.startswith(('comoe_peft.training', "
            "'comoe_peft.experiments', 'matplotlib'))))")
    assert run_python(code) == ""


def test_public_names_from_the_top_level():
    code = ("import comoe_peft\n"
            "from comoe_peft import CoMoEConfig, CoMoEModel, CoMoESFTTrainer, CoMoETrainerMixin, CoMoESFTConfig\n"
            "from comoe_peft.training import CoMoESFTTrainer as T\n"
            "from peft import PeftType\n"
            "assert T is CoMoESFTTrainer and issubclass(CoMoESFTTrainer, CoMoETrainerMixin)\n"
            "assert PeftType.COMOE == 'COMOE' and 'CoMoESFTTrainer' in dir(comoe_peft)\n"
            "print(sorted(set(comoe_peft.__all__) - set(dir(comoe_peft))))")
    assert run_python(code) == "[]"


def test_unknown_top_level_name_is_an_attribute_error():
    import comoe_peft

    with pytest.raises(AttributeError, match="no_such_name"):
        comoe_peft.no_such_name  # noqa: B018


def test_lazy_top_level_names_are_the_training_layers_exports():
    import comoe_peft
    import comoe_peft.training

    assert set(comoe_peft._LAZY) == set(comoe_peft.training.__all__)
    assert all(getattr(comoe_peft, name) is getattr(comoe_peft.training, name) for name in comoe_peft._LAZY)
