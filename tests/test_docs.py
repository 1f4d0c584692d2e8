"""The documentation site: it builds with `mkdocs build --strict`, its code runs, and it covers the whole API.

Rule: every code block on the site either runs in a test or is a notebook cell (the notebooks in tutorials/ run with
`pytest --nbval-lax tutorials/`). Concretely:

* docs/*.md may contain only ```python and ```bash blocks (checked below), and ```yaml blocks with a title on
  integrations.md: axolotl configs, which parse here and which tests/test_axolotl_plugin.py trains with.
* ```python blocks run: the blocks of one page in order, in one namespace, in a fresh subprocess whose working
  directory is a temporary folder (so a later block may read what an earlier one wrote, e.g. the expert-load history
  of train.py on the training page). They build tiny random models; nothing is downloaded.
* ```python examples inside the docstrings that the API reference renders run too, each in a fresh process. As in
  doctest, an example sees the names of its module (and `comoe_peft`'s exports), plus the placeholders the examples
  use (`base_model`, a tiny random Llama, and `dataset`; see DOCSTRING_NAMESPACE).
* ```bash blocks are not run (they install packages, run this test suite or launch training on GPUs). Each line is
  checked instead, by its command:
    - `pip install ...`: the line appears verbatim in README.md (the docs repeat the README's install commands);
    - `python -m pytest ...`: every path it names exists;
    - `mkdocs build ...`: `test_site_builds_strict` runs it;
    - `accelerate launch ...`: parsed with accelerate's own argument parser; its `--config_file` exists and loads
      with accelerate's config loader; its script exists in the repository or is a ```python title="<script>" block
      of the docs;
    - `comoe-peft ...`: parsed with the command's own argument parsers (`comoe_peft_launcher.parse_command`,
      `--config` files named from the repository root);
    - `python benchmarks/X.py ...`: parsed with the script's own parser;
    - `python3 -m pip install --no-index ...`: the air-gapped GPU box's line, `benchmarks/gpu_wheelhouse.py`'s
      BOX_COMMAND;
    - `python -m comoe_peft.integrations.llamafactory CONFIG key=value ...`: the config exists and passes the
      LLaMA-Factory recipe's `check_args` (tests/test_llamafactory_recipe.py runs it with LLaMA-Factory);
    - `axolotl train FILE`: FILE is a ```yaml title="FILE" block of the docs that names the CoMoE plugin;
    - anything else fails the test, so that a new kind of command gets a check.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import comoe_peft

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md"))
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
API_PAGE = DOCS / "api.md"
CONFIG_PAGE = DOCS / "configuration.md"

# Modules of comoe_peft that the API reference does not document, and why. A new module must be added to api.md or
# here, so that nothing is left out by accident.
NOT_DOCUMENTED = {
    "comoe_peft.__main__": "`python -m comoe_peft`, the same as the `comoe-peft` command",
    # the layers' packages only hand their modules' names on (docs/architecture.md describes the layers)
    "comoe_peft.tuner": "re-exports the tuner modules' public names",
    "comoe_peft.training": "re-exports the training modules' public names",
    "comoe_peft.training.trainer": "the trainers' public path: re-exports the names of `mixin` and `sft`",
    "comoe_peft.integrations": "a package docstring only",
    "comoe_peft.experiments": "a package docstring only",
    "comoe_peft.integrations": "a package docstring only",
    # imports axolotl, which the docs build does not install; docs/integrations.md documents it, hook by hook
    "comoe_peft.integrations.axolotl": "the axolotl plugin, on docs/integrations.md",
}

SUBPROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NO_MKDOCS_2_WARNING": "1",
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "CUDA_VISIBLE_DEVICES": "",  # the examples take the CPU path everywhere
}


# ---------------------------------------------------------------------------------------------- code blocks


@dataclasses.dataclass
class Block:
    page: str
    line: int
    language: str
    attributes: str
    code: str

    @property
    def label(self) -> str:
        return f"docs/{self.page}:{self.line}"

    @property
    def title(self) -> str | None:
        match = re.search(r'title="([^"]+)"', self.attributes)
        return match.group(1) if match else None


FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)(?P<attrs>[^\n]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def code_blocks(text: str, page: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        code = textwrap.dedent(match.group("code"))
        blocks.append(Block(page, line, match.group("lang"), match.group("attrs").strip(), code))
    return blocks


def page_blocks(page: Path) -> list[Block]:
    return code_blocks(page.read_text(encoding="utf-8"), page.name)


ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]
PYTHON_PAGES = [page for page in PAGES if any(b.language == "python" for b in page_blocks(page))]

RUNNER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for label, code in blocks:
    print(f"=== {label}", flush=True)
    try:
        exec(compile(code, label, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: {label}", file=sys.stderr)
        sys.exit(1)
"""


def run_blocks(blocks: list[tuple[str, str]], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    (cwd / "blocks.json").write_text(json.dumps(blocks))
    (cwd / "runner.py").write_text(RUNNER)
    env = dict(os.environ, **SUBPROCESS_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "runner.py", "blocks.json"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_docs_have_only_python_and_bash_blocks():
    assert ALL_BLOCKS, "no code blocks found in docs/"
    others = [f"{b.label} ```{b.language}" for b in ALL_BLOCKS if b.language not in ("python", "bash")
              and not (b.language == "text" and "architecture.md" in b.label)  # checked below
              and not (b.language == "yaml" and "integrations.md" in b.label and b.title)]  # checked below
    assert not others, f"code blocks that no test runs or checks: {others}"


def test_axolotl_configs_parse_and_name_the_plugin():
    """The axolotl YAML of docs/integrations.md parses, uses the plugin, and tests/test_axolotl_plugin.py reads it."""
    import yaml

    configs = [b for b in ALL_BLOCKS if b.language == "yaml"]
    assert configs, "docs/integrations.md shows no axolotl YAML"
    for block in configs:
        config = yaml.safe_load(block.code)
        assert config["plugins"] == ["comoe_peft.integrations.axolotl.CoMoEPlugin"], block.label
        assert config["adapter"] == "comoe" and isinstance(config["comoe"], dict), block.label
        assert f'title="{block.title}"' in (ROOT / "tests" / "test_axolotl_plugin.py").read_text(), block.label


def test_architecture_picture_lists_each_layers_modules():
    """The picture of the three layers on docs/architecture.md names exactly the modules each layer has."""
    picture = next(b.code for b in ALL_BLOCKS if "architecture.md" in b.label and b.language == "text")
    listed: dict[str, set[str]] = {}
    layer = None
    for line in picture.splitlines():
        head = re.match(r"\s*comoe_peft\.(tuner|training|integrations|experiments)\s+(.*)", line)
        if head:
            layer, line = head.group(1), head.group(2)
        elif not line.startswith(" " * 20) or layer is None:
            layer = None if not line.startswith(" " * 20) else layer
            continue
        words = re.findall(r"\b([a-z_]+)\b(?![.(])", re.sub(r"\(.*?\)", "", line))
        listed.setdefault(layer, set()).update(words)
    for name in ("tuner", "training", "integrations", "experiments"):
        folder = ROOT / "comoe_peft" / name
        actual = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        assert actual <= listed.get(name, set()), f"docs/architecture.md: {name} lacks {sorted(actual - listed[name])}"


def test_architecture_token_path_names_what_exists():
    """The token's path on docs/architecture.md names tuner objects that exist (module.Name)."""
    path = [b.code for b in ALL_BLOCKS if "architecture.md" in b.label and b.language == "text"][1]
    named = re.findall(r"\b([a-z_]+)\.([A-Za-z_]+)\b", path)
    assert named, "the token's path names no tuner object"
    for module, name in named:
        assert hasattr(importlib.import_module(f"comoe_peft.tuner.{module}"), name), f"{module}.{name}"


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[p.name for p in PYTHON_PAGES])
def test_python_blocks_run(page, tmp_path):
    blocks = [(b.label, b.code) for b in page_blocks(page) if b.language == "python"]
    result = run_blocks(blocks, tmp_path)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------- bash blocks


def bash_commands() -> list[tuple[str, list[str]]]:
    """(label, argv) of every command line in the docs' bash blocks, environment assignments removed."""
    commands = []
    for block in (b for b in ALL_BLOCKS if b.language == "bash"):
        for offset, line in enumerate(block.code.splitlines()):
            argv = shlex.split(line, comments=True)
            while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv:
                commands.append((f"docs/{block.page}:{block.line + 1 + offset}", argv))
    return commands


def titled_scripts() -> set[str]:
    return {b.title for b in ALL_BLOCKS if b.language == "python" and b.title}


def check_accelerate(argv: list[str], label: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert argv[:2] == ["accelerate", "launch"], f"{label}: only `accelerate launch` is documented"
    try:
        args = launch_command_parser().parse_args(argv[2:])
    except SystemExit as error:
        raise AssertionError(f"{label}: accelerate rejects {shlex.join(argv)}") from error
    if args.config_file is not None:
        assert (ROOT / args.config_file).is_file(), f"{label}: no config file {args.config_file}"
        load_config_from_file(str(ROOT / args.config_file))
    script = args.training_script
    assert (ROOT / script).is_file() or script in titled_scripts(), (
        f"{label}: the script {script} is neither a repository file nor a ```python title=\"{script}\" block"
    )


def check_comoe_peft(argv: list[str], label: str) -> None:
    from comoe_peft.experiments.runs import RunError
    from comoe_peft_launcher import parse_command

    cwd = os.getcwd()
    os.chdir(ROOT)  # --config files are named from the repository root
    try:
        parse_command(argv[1:])
    except (SystemExit, RunError) as error:
        raise AssertionError(f"{label}: `comoe-peft` rejects {shlex.join(argv)}") from error
    finally:
        os.chdir(cwd)


def check_pytest(argv: list[str], label: str) -> None:
    for arg in argv[3:]:
        if not arg.startswith("-") and ("/" in arg or arg.endswith(".py")):
            assert (ROOT / arg.split("::")[0]).exists(), f"{label}: {arg} does not exist"


def check_benchmark(argv: list[str], label: str) -> None:
    """`python benchmarks/X.py ARGS`: the script exists and its own parser accepts ARGS (nothing runs)."""
    script = ROOT / argv[1]
    assert script.is_file(), f"{label}: {argv[1]} does not exist"
    sys.path.insert(0, str(script.parent))
    try:
        importlib.import_module(script.stem).parse_args(argv[2:])
    except SystemExit as error:
        raise AssertionError(f"{label}: {argv[1]} refuses `{shlex.join(argv[2:])}`") from error
    finally:
        sys.path.remove(str(script.parent))


def check_gpu_box(argv: list[str], label: str) -> None:
    """The air-gapped GPU box's install-and-run line: the one benchmarks/gpu_wheelhouse.py prints (its BOX_COMMAND),
    optionally with `--dry-run`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        expected = shlex.split(importlib.import_module("gpu_wheelhouse").BOX_COMMAND)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert argv in (expected, [*expected, "--dry-run"]), f"{label}: not gpu_wheelhouse.BOX_COMMAND"


def check_llamafactory(argv: list[str], label: str) -> None:
    """`python -m comoe_peft.integrations.llamafactory CONFIG key=value ...`: the config file exists and, with the
    overrides (read as LLaMA-Factory reads them, YAML values), passes the recipe's own checks (nothing is built)."""
    import yaml

    from comoe_peft.integrations.llamafactory import RecipeError, check_args

    config = ROOT / argv[3]
    assert config.is_file(), f"{label}: no config file {argv[3]}"
    args = yaml.safe_load(config.read_text(encoding="utf-8"))
    for override in argv[4:]:
        key, _, value = override.partition("=")
        assert key and _, f"{label}: `{override}` is not key=value"
        args[key] = yaml.safe_load(value)
    try:
        check_args(args)
    except RecipeError as error:
        raise AssertionError(f"{label}: the recipe refuses {shlex.join(argv)}: {error}") from error


def test_bash_commands_name_what_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    readme_installs = [shlex.split(line, comments=True) for line in readme if line.startswith("pip install")]
    commands = bash_commands()
    assert commands
    seen = set()
    for label, argv in commands:
        line = shlex.join(argv)
        if argv[:2] == ["pip", "install"]:
            assert argv in readme_installs, f"{label}: `{line}` is not one of README.md's install commands"
        elif argv[:3] == ["python", "-m", "pytest"]:
            check_pytest(argv, label)
        elif argv[:2] == ["mkdocs", "build"]:
            assert "--strict" in argv, f"{label}: document the strict build"
        elif argv[0] == "accelerate":
            check_accelerate(argv, label)
        elif argv[0] == "comoe-peft":
            check_comoe_peft(argv, label)
        elif argv[:3] == ["python", "-m", "comoe_peft.integrations.llamafactory"]:
            check_llamafactory(argv, label)
        elif argv[0] == "axolotl":
            assert argv[1:2] == ["train"] and len(argv) == 3, f"{label}: only `axolotl train FILE` is documented"
            assert argv[2] in {b.title for b in ALL_BLOCKS if b.language == "yaml"}, (
                f"{label}: {argv[2]} is not a ```yaml title=\"{argv[2]}\" block of the docs")
        elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
            check_benchmark(argv, label)
        elif argv[:5] == ["python3", "-m", "pip", "install", "--no-index"]:
            check_gpu_box(argv, label)
        else:
            raise AssertionError(f"{label}: no check for `{line}`; add one to tests/test_docs.py")
        seen.add(argv[0] if argv[0] != "python" else "pytest")
    assert {"pip", "accelerate", "comoe-peft"} <= seen


def test_accelerate_configs_are_all_documented_and_load():
    from accelerate.commands.config.config_args import load_config_from_file

    documented = " ".join(shlex.join(argv) for _, argv in bash_commands())
    for config in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        load_config_from_file(str(config))
        assert str(config.relative_to(ROOT)) in documented, f"{config.name} is not on the scaling page"


# ---------------------------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site once: `NO_MKDOCS_2_WARNING=1 mkdocs build --strict` into a temporary folder."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, **SUBPROCESS_ENV)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    return result, out


def test_site_builds_strict(site):
    result, out = site
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "WARNING" not in result.stderr, result.stderr[-6000:]
    for page in ["index.html", "api/index.html", "configuration/index.html", "changelog/index.html",
                 "cli/index.html", "analysis/index.html", "benchmarks/index.html",
                 "tutorials/01_quickstart/index.html", "tutorials/02_sft_with_trl/index.html",
                 "tutorials/03_expert_specialisation/index.html", "tutorials/04_bring_your_own_data/index.html"]:
        assert (out / page).is_file(), page
    assert "Changelog" in (out / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "CoMoESFTTrainer" in (out / "tutorials" / "02_sft_with_trl" / "index.html").read_text(encoding="utf-8")


def html(site, page: str) -> str:
    result, out = site
    assert result.returncode == 0, "the site did not build"
    return (out / page / "index.html").read_text(encoding="utf-8")


def documented_modules() -> list[str]:
    """Modules rendered by a `::: name` directive on any page (a directive for a class counts for its module)."""
    modules = []
    for page in PAGES:
        for name in re.findall(r"^::: (comoe_peft(?:\.\w+)*)\s*$", page.read_text(encoding="utf-8"), flags=re.MULTILINE):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                name = name.rsplit(".", 1)[0]
            if name not in modules:
                modules.append(name)
    return modules


def public_objects(module_name: str) -> list[str]:
    """Classes and functions defined (not imported) in a module, without a leading underscore."""
    module = importlib.import_module(module_name)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module_name]


def test_every_module_is_documented_or_excused():
    modules = {m.name for m in pkgutil.walk_packages(comoe_peft.__path__, prefix="comoe_peft.")}
    documented = set(documented_modules())
    missing = sorted(modules - documented - set(NOT_DOCUMENTED))
    assert not missing, f"add these modules to docs/api.md (or to NOT_DOCUMENTED with a reason): {missing}"
    assert documented <= modules, f"api.md names modules that do not exist: {sorted(documented - modules)}"


def test_api_reference_covers_every_public_name(site):
    api = html(site, "api")
    configuration = html(site, "configuration")
    api_source = API_PAGE.read_text(encoding="utf-8")
    for name in comoe_peft.__all__:
        assert f"`{name}`" in api_source, f"comoe_peft.{name} (in __all__) is not on the API page"
    missing = []
    for module_name in documented_modules():
        for name in public_objects(module_name):
            anchor = f'id="{module_name}.{name}"'
            if anchor not in api and anchor not in configuration:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"not rendered in the API reference: {missing}"


def test_configuration_page_documents_every_field(site):
    from peft import PeftConfig

    from comoe_peft.tuner.config import CoMoEConfig

    page = html(site, "configuration")
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    own = [f for f in dataclasses.fields(CoMoEConfig) if f.name not in inherited]
    assert len(own) > 20
    for field in own:
        help_text = field.metadata.get("help", "")
        assert help_text, f"CoMoEConfig.{field.name} has no metadata help"
        assert f'id="comoe_peft.tuner.config.CoMoEConfig.{field.name}"' in page, field.name
        first_words = " ".join(help_text.split()[:4])
        assert first_words.replace("'", "&#39;") in page or first_words in page, f"help of {field.name} not shown"
    table = CONFIG_PAGE.read_text(encoding="utf-8")
    for name in inherited:
        assert f"`{name}`" in table, f"inherited field {name} is not in the configuration page's table"


# ---------------------------------------------------------------------------------------------- docstring examples

DOCSTRING_NAMESPACE = r"""
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
_tokenizer = ByT5Tokenizer()
_tokenizer.save_pretrained("tokenizer")
base_model = LlamaForCausalLM(LlamaConfig(
    vocab_size=len(_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=_tokenizer.pad_token_id))
base_model.config._name_or_path = "tokenizer"  # so that TRL finds a tokenizer when an example passes none
base_model.name_or_path = "tokenizer"
tokenizer = _tokenizer
dataset = Dataset.from_list([{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(8) for b in range(4)])
"""


def docstring_examples() -> list[tuple[str, str]]:
    """(label, code) of every ```python block in the docstrings of the documented modules' public objects."""
    examples = []
    for module_name in documented_modules():
        module = importlib.import_module(module_name)
        objects = [(module_name, module)] + [(f"{module_name}.{n}", getattr(module, n))
                                             for n in public_objects(module_name)]
        for qualname, obj in list(objects):
            if inspect.isclass(obj):
                objects += [(f"{qualname}.{n}", m) for n, m in vars(obj).items()
                            if not n.startswith("_") and inspect.isfunction(m)]
        for qualname, obj in objects:
            for block in code_blocks(inspect.getdoc(obj) or "", qualname):
                if block.language == "python":
                    # like doctest: the example sees its module's names (and the package's exports)
                    prelude = f"from comoe_peft import *\nfrom {module_name} import *\n"
                    examples.append((f"{qualname} (docstring line {block.line})", prelude + block.code))
    return examples


# Docstring examples known not to run as written, with the reason. strict: the test fails once one is fixed, so that
# its entry gets removed here.
KNOWN_BROKEN_EXAMPLES: dict[str, str] = {}
DOCSTRING_EXAMPLES = [
    pytest.param(label, code, id=label, marks=[pytest.mark.xfail(reason=KNOWN_BROKEN_EXAMPLES[owner], strict=True)]
                 if (owner := label.split(" (")[0]) in KNOWN_BROKEN_EXAMPLES else [])
    for label, code in docstring_examples()
]


@pytest.mark.parametrize("label,code", DOCSTRING_EXAMPLES)
def test_docstring_examples_run(label, code, tmp_path):
    ast.parse(code)
    result = run_blocks([("namespace", DOCSTRING_NAMESPACE), (label, code)], tmp_path)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------- notebooks


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.name for p in TUTORIALS])
def test_notebooks_are_stored_clean(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    assert any("assert" in cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert f"tutorials/{path.name}" in (ROOT / "mkdocs.yml").read_text(), f"{path.name} is not in the site's nav"
