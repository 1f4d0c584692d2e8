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
