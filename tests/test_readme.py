"""The README's code runs as written: its python blocks in order, in a fresh process with the real small model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path):
    code = "\n\n".join(blocks("python"))
    assert "CoMoESFTTrainer" in code and "get_peft_model" in code
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "runs" / "readme" / "expert_load_history.json").is_file()


def test_bash_blocks_name_what_exists():
    commands = "\n".join(blocks("bash"))
    assert "python -m pytest" in commands
    for name in re.findall(r"-c (\S+)", commands):
        assert (ROOT / name).is_file(), name
    subcommands = set(re.findall(r"comoe-peft (\w+)", commands))
    assert subcommands == {"train", "eval", "analyze"}
    test_command = re.search(r"## Test\n\n```bash\n(.*?)\n```", README, flags=re.DOTALL).group(1).strip()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines  # CI runs exactly the README's test command


def test_the_test_command_sets_a_fresh_machine_up_by_itself():
    test_command = re.search(r"## Test\n\n```bash\n(.*?)\n```", README, flags=re.DOTALL).group(1).strip()
    assert "\n" not in test_command
    steps = test_command.split(" && ")
    assert steps[0] == "pip install -c constraints.txt torch==2.13.0"  # torch first: no CUDA build on a CPU machine
    assert steps[1] == 'pip install -c constraints.txt -e ".[test]"'
    assert steps[-1].endswith("python -m pytest")
    main_job = next(line for line in blocks("bash")[-1:] + README.splitlines() if "comoe-peft train --output-dir" in line)
    assert 'pip install -c constraints.txt -e ".[experiments]"' in main_job


def test_nothing_is_installed_without_its_dependencies():
    ci = (ROOT / ".ci" / "run").read_text()
    for text in ("\n".join(blocks("bash")), ci, (ROOT / "docs" / "installation.md").read_text()):
        assert not re.search(r"pip install[^\n]*--no-deps", text)
    assert "python -m pip check\n" in ci and "grep -v" not in ci  # pip check must be clean, no exceptions
